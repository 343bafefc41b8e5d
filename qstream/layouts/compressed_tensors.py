"""The compressed-tensors layout's ``quantization_config``: config groups and the
ignore list, with module names every runtime resolves alike (transformers /
compressed-tensors by the checkpoint's names, vLLM after its architecture's
``hf_to_vllm_mapper``; see :func:`_generalize`)."""

from __future__ import annotations

import re

from ..errors import QStreamError
from ..plan.ops import Op
from ..roles import Family
from ..schemes import ATTN_SCHEMES, SCHEMES, fp8_group_args

def _generalize(names: list[str], forbidden: list[str], family: Family) -> list[str]:
    """Compact module names into ``re:`` patterns that every runtime resolves alike.

    Layer indices become ``\\d+`` and names differing only in their last component
    share one alternation. A pattern is anchored at the end only, and starts at a
    dot (``re:(?:.*\\.)?tail$``), with the shortest tail that matches every member
    and no forbidden module under both namings: transformers' (the checkpoint's
    names) and vLLM's (the architecture's ``hf_to_vllm_mapper``, which vLLM applies
    to plain config names but not to ``re:`` entries). Where no tail does, the
    exact names are kept (a plain name that vLLM cannot map onto its own module
    name, such as ``lm_head`` of a multimodal model, becomes a pattern instead).
    """
    def aliases(n: str) -> set[str]:
        return {n, family.vllm_module(n)}

    forb = {a for f in forbidden for a in aliases(f)}

    def safe(pat: str, members: list[str]) -> bool:
        rx = re.compile(pat)
        return all(rx.match(a) for m in members for a in aliases(m)) and not any(rx.match(f) for f in forb)

    def tail_pattern(comps: list[str], last_re: str, members: list[str]) -> str | None:
        for k in range(len(comps), -1, -1):  # shortest tail first, with one named component if any
            if k == len(comps) and comps or all(c == "<N>" for c in comps[k:]) and any(c != "<N>" for c in comps):
                continue
            tail = "".join(re.escape(c).replace(re.escape("<N>"), r"\d+") + r"\." for c in comps[k:])
            pat = r"(?:.*\.)?" + tail + last_re + "$"
            if safe(pat, members):
                return pat
        return None

    by_head: dict[str, dict[str, list[str]]] = {}
    for n in names:
        head, _, last = n.rpartition(".")
        ghead = re.sub(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.)", "<N>", head)
        by_head.setdefault(ghead, {}).setdefault(last, []).append(n)
    out: list[str] = []
    for ghead, lasts in by_head.items():
        members = [n for ns in lasts.values() for n in ns]
        if len(members) == 1 and "<N>" not in ghead and family.vllm_plain_entry(members[0]) == family.vllm_module(members[0]):
            out.append(members[0])
            continue
        alts = sorted(lasts)
        last_re = re.escape(alts[0]) if len(alts) == 1 else "(" + "|".join(re.escape(a) for a in alts) + ")"
        pat = tail_pattern(ghead.split(".") if ghead else [], last_re, members)
        if pat is not None:
            out.append("re:" + pat)
            continue
        for m in members:
            if family.vllm_plain_entry(m) == family.vllm_module(m):
                out.append(m)
            else:
                one = tail_pattern(m.split(".")[:-1], re.escape(m.rpartition(".")[2]), [m])
                if one is None:
                    raise QStreamError(f"module {m!r}: no config name resolves it to the right scheme in both "
                                       "transformers and vLLM; please report this model.")
                out.append("re:" + one)
    return out


def _group_for(key: str) -> dict:
    if key in SCHEMES:
        sch = SCHEMES[key]
        return {"weights": dict(sch.weights_args), "input_activations": None, "format": sch.format}
    for enc in ATTN_SCHEMES.values():
        if enc.key == key:
            return enc.group()
    parts = key.split(":")  # fp8:<layout>[:static][:RxC]
    block = None
    if re.fullmatch(r"\d+x\d+", parts[-1]):
        block = tuple(int(x) for x in parts[-1].split("x"))
    return fp8_group_args(parts[1], block, static_input="static" in parts)


def quantization_config(ops: list[Op], config: dict, family: Family) -> dict | None:
    described = [op for op in ops if op.module_scheme is not None]
    if not described:
        return None
    keys = sorted({op.module_scheme for op in described})
    q_modules = [op.module for op in described]
    unq = [
        op.module
        for op in ops
        if op.module_scheme is None
        and op.kind in ("copy", "dequantize")
        and op.outputs[0].name.endswith(".weight")
        and len(op.source.shape) == 2
        and op.role not in ("embedding", "norm")
    ]
    # A tied lm_head has no tensor of its own but is still a Linear module.
    if "lm_head" not in q_modules and "lm_head" not in unq:
        unq.append("lm_head")
    ignore = _generalize(unq, q_modules, family)
    groups = {}
    for i, key in enumerate(keys):
        if len(keys) == 1:
            targets = ["Linear"]
        else:
            targets = _generalize([op.module for op in described if op.module_scheme == key],
                                  [op.module for op in described if op.module_scheme != key] + unq, family)
        g = _group_for(key)
        groups[f"group_{i}"] = {
            "targets": targets,
            "weights": g["weights"],
            "input_activations": g["input_activations"],
            "output_activations": None,
            "format": g["format"],
        }
    formats = {g["format"] for g in groups.values()}
    fmt = formats.pop() if len(formats) == 1 else "mixed-precision"
    return {
        "config_groups": groups,
        "format": fmt,
        "global_compression_ratio": None,
        "ignore": ignore,
        "kv_cache_scheme": None,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
        "sparsity_config": {},
        "transform_config": {},
        "version": "0.20.0",
    }
