"""A ModelOpt NVFP4 checkpoint as a source: its packed modules are planned as repacks to
compressed-tensors NVFP4 (the packed bytes and block scales copied, ``weight_scale_2`` turned
into ``weight_global_scale``), not requantized. The layout itself (names, scales, configs) is
:mod:`qstream.layouts.modelopt`."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from ..errors import QStreamError
from ..layouts.modelopt import GROUP_SIZE, HF_QUANT_CONFIG, READ_ALGOS, global_scale
from ..plan.ops import Copy, Op, OutTensor


@dataclass
class SourcePlan:
    ops: dict = field(default_factory=dict)  # X.weight -> the ops that repack module X
    consumed: set = field(default_factory=set)  # tensors those ops read, or dropped


def source_config(src) -> dict | None:
    """{quant_algo, kv_cache} of a ModelOpt source (config.json ``quant_method: modelopt``, else
    hf_quant_config.json), or None."""
    qc = src.config.get("quantization_config")
    if isinstance(qc, dict) and str(qc.get("quant_method", "")).lower().startswith("modelopt"):
        return {"quant_algo": str(qc.get("quant_algo") or "").upper(), "kv_cache": qc.get("kv_cache_scheme"),
                "where": "config.json"}
    if isinstance(qc, dict) and qc.get("quant_method"):
        return None  # config.json names another method: a leftover hf_quant_config.json does not count
    path = src.root / HF_QUANT_CONFIG
    if path.is_file():
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise QStreamError(f"{path}: cannot be read as JSON ({e}); fix or re-download it.") from e
        q = obj.get("quantization") if isinstance(obj, dict) else None
        if isinstance(q, dict):
            return {"quant_algo": str(q.get("quant_algo") or "").upper(), "kv_cache": q.get("kv_cache_quant_algo"),
                    "where": HF_QUANT_CONFIG}
    return None


def plan_source(src, opts, classifier, ignore_res, warnings: list[str]) -> SourcePlan:
    """Repack ops for the NVFP4 modules of a ModelOpt checkpoint (empty for any other source):
    ``X.weight`` -> ``X.weight_packed`` and ``X.weight_scale`` copied byte for byte,
    ``X.weight_scale_2`` -> ``X.weight_global_scale`` (:func:`global_scale`); ``input_scale``
    (W4A4) and KV-cache scales are dropped: the output is weight-only NVFP4."""
    res = SourcePlan()
    cfg = source_config(src)
    t = src.tensors
    modules = [n.removesuffix(".weight") for n, i in t.items()
               if n.endswith(".weight") and i.dtype == "U8" and n.removesuffix(".weight") + ".weight_scale" in t]
    if cfg is None and not modules:
        return res
    where = f"{src.root} ({cfg['where']})" if cfg else str(src.root)
    if cfg is not None and cfg["quant_algo"] not in READ_ALGOS:
        if not modules and cfg["quant_algo"] in ("FP8", "FP8_PER_CHANNEL_PER_TOKEN"):
            return res  # ModelOpt FP8: qstream's FP8 source path reads it
        raise QStreamError(f"{where}: ModelOpt quant_algo {cfg['quant_algo'] or 'missing'}; qstream reads ModelOpt "
                           f"NVFP4 checkpoints ({', '.join(READ_ALGOS)}) only.")
    if not modules:
        raise QStreamError(f"{where}: says ModelOpt {cfg['quant_algo']} but no tensor X.weight (uint8) with "
                           "X.weight_scale was found; the checkpoint is incomplete.")
    awq = next((n for n in t if n.endswith(".pre_quant_scale")), None)
    if awq is not None:
        raise QStreamError(f"{where}: tensor {awq!r} is an AWQ pre-quantization scale; qstream reads plain "
                           "ModelOpt NVFP4 only.")
    if getattr(opts, "format", "compressed-tensors") != "compressed-tensors":
        raise QStreamError(f"{where} is already a ModelOpt NVFP4 checkpoint; convert it with --format "
                           "compressed-tensors (a repack), or use it as it is.")
    if opts.mlp == "mxfp4":
        raise QStreamError(f"{where} is a ModelOpt NVFP4 checkpoint: qstream repacks it to compressed-tensors "
                           "NVFP4 without rounding; pass --mlp nvfp4 (requantizing NVFP4 to MXFP4 is not supported).")
    dropped_inputs = 0
    for m in modules:
        w, s, s2 = t[m + ".weight"], t[m + ".weight_scale"], t.get(m + ".weight_scale_2")
        if s.dtype != "F8_E4M3":
            raise QStreamError(f"tensor {s.name!r} ({s.path.name}) has dtype {s.dtype}; ModelOpt NVFP4 block scales "
                               "are F8_E4M3 (other ModelOpt 4-bit formats, MXFP4 and INT4 AWQ, are not read).")
        if s2 is None or s2.dtype != "F32" or s2.numel != 1:
            raise QStreamError(f"tensor {w.name!r} ({w.path.name}) is packed NVFP4 but {m}.weight_scale_2 is "
                               f"{'missing' if s2 is None else f'{s2.dtype} {list(s2.shape)}'}; ModelOpt NVFP4 needs "
                               "a float32 scalar there.")
        if len(w.shape) != 2 or len(s.shape) != 2 or tuple(s.shape) != (w.shape[0], 2 * w.shape[1] // GROUP_SIZE) \
                or (2 * w.shape[1]) % GROUP_SIZE:
            raise QStreamError(f"tensors {w.name!r} {list(w.shape)} and {s.name!r} {list(s.shape)} do not have "
                               f"NVFP4 shapes [out, in/2] and [out, in/{GROUP_SIZE}].")
        if any(r.search(w.name) for r in ignore_res):
            warnings.append(f"{w.name}: matches --ignore but is NVFP4 in the source; it stays NVFP4 (repacked)")
        role = classifier.role(w.name)
        mk = dict(scheme="nvfp4", layout="modelopt", out_module=m)
        res.ops[w.name] = [
            Copy(role, w, [OutTensor(m + ".weight_packed", "U8", tuple(w.shape))], module_scheme="nvfp4", **mk),
            Copy(role, s, [OutTensor(m + ".weight_scale", "F8_E4M3", tuple(s.shape))], **mk),
            GlobalScaleRepack(role, s2, [OutTensor(m + ".weight_global_scale", "F32", (1,))], **mk),
        ]
        res.consumed |= {s.name, s2.name}
        inp = t.get(m + ".input_scale")
        if inp is not None:
            res.consumed.add(inp.name)
            dropped_inputs += 1
    if dropped_inputs:
        warnings.append(f"{dropped_inputs} activation scale(s) (input_scale) of the W4A4 source dropped: the output "
                        "is weight-only NVFP4 (activations stay BF16)")
    kv = [n for n in t if n.endswith((".k_scale", ".v_scale")) and t[n].numel == 1]
    if kv:
        res.consumed.update(kv)
        warnings.append(f"{len(kv)} KV-cache scale(s) (k_scale / v_scale) dropped: the output has no KV-cache "
                        "quantization (kv_cache_scheme null)")
    return res


@dataclass
class GlobalScaleRepack(Op):
    """ModelOpt ``weight_scale_2`` -> compressed-tensors ``weight_global_scale``."""

    kind: ClassVar[str] = "repack"

    def items(self, ex, w):
        info, out = self.source, self.outputs[0]
        yield lambda: w.pwrite(out.offset, np.asarray([global_scale(ex.reader.read(info).reshape(-1)[0], info.name)],
                                                      dtype=np.float32))
