"""Plan a conversion from headers and config alone (no tensor data is read).

A :class:`Plan` lists every output tensor with its action, source, output
shard and byte offset, so the output size and every shard header are known
before a byte is written. ``inspect`` and ``--dry-run`` print it; ``convert``
executes it; resume compares a stored plan fingerprint with a new one.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from .. import __version__, activations
from ..sources.checkpoint import Checkpoint
from ..errors import QStreamError
from .ops import Cast, Copy, Dequantize, Fp8Encode, Op, OutShard, OutTensor, Quantize, Repack, Slice, View
from ..layouts import modelopt, openai_mxfp4
from ..layouts.compressed_tensors import quantization_config
from .checks import (check_something_quantized, check_source_quantization, group_warnings, oversized_tensors,
                     runtime_warnings, unknown_family_warning, unloadable_experts, unmatched_ignores)
from ..roles import ROLES, Classifier, Recipe, load_families, select_family
from ..safetensors_io import FLOAT_SOURCE_DTYPES, TensorInfo, build_header
from ..schemes import ATTN_SCHEMES, SCHEMES, Scheme
from ..schemes.reference import SEARCH_MODES
from ..sources import modelopt as modelopt_source
from ..sources.fp8 import Fp8Weight, find_fp8_weights

SHARD_METADATA = {"format": "pt"}


@dataclass(frozen=True)
class Options:
    mlp: str = "mxfp4"
    attn: str = "keep"  # keep | bf16 (dequantize FP8 attention) | a name in schemes.ATTN_SCHEMES (fp8: FP8_DYNAMIC)
    ignore: tuple[str, ...] = ()
    recipe: str | None = None
    max_shard_size: int = 5 * 10**9
    scale_search: str = "mse"  # none: compressed-tensors' rounding, byte for byte (README: "Scale search")
    format: str = "compressed-tensors"  # or "modelopt" (qstream/layouts/modelopt.py)
    activations: str = "none"  # W4A4: none | mxfp4 | nvfp4 (qstream/activations.py)
    input_amax: tuple[tuple[str, float], ...] = ()  # (module, calibrated input absmax), for nvfp4 activations
    calibrate_label: str | None = None  # the calibration text's file name (the card)
    calibration: str | None = None  # --calibrate: identity of the calibration tokens (qstream/calibrate.py)
    allow_unloadable: bool = False  # write a layout no runtime loads (checks.unloadable_experts); bytes unchanged

    def key(self) -> dict:
        w4a4 = {"activations": self.activations, "input_amax": [list(p) for p in self.input_amax],
                "calibrate": self.calibrate_label} if self.activations != "none" else {}
        return ({"format": self.format} if self.format != "compressed-tensors" else {}) | w4a4 | (
            {"calibration": self.calibration} if self.calibration else {}) | {
            "mlp": self.mlp,
            "attn": self.attn,
            "ignore": list(self.ignore),
            "recipe": Path(self.recipe).read_text(encoding="utf-8") if self.recipe else None,
            "max_shard_size": self.max_shard_size,
            "scale_search": self.scale_search,
        }


@dataclass
class RoleSummary:
    tensors: int = 0
    quantized: int = 0
    bytes_in: int = 0
    bytes_out: int = 0


@dataclass
class Plan:
    source: Checkpoint
    options: Options
    family: str
    ops: list[Op]
    shards: list[OutShard]
    scale_groups: dict[str, list[str]]
    quantization_config: dict | None
    warnings: list[str]
    command: str = ""  # the command line, for the model card
    serve_name: str | None = None  # the Hub repo pushed to, for the card's `vllm serve` line
    base_model: str | None = None  # --base-model: the card's base_model (else inferred, see card.base_model_of)

    @property
    def bytes_in(self) -> int:
        return self.source.total_bytes

    @property
    def bytes_out(self) -> int:
        return sum(op.bytes_out for op in self.ops)

    def by_role(self) -> dict[str, RoleSummary]:
        out = {r: RoleSummary() for r in ROLES}
        for op in self.ops:
            s = out[op.role]
            s.tensors += 1
            s.quantized += op.quantized
            s.bytes_in += op.bytes_in
            s.bytes_out += op.bytes_out
        return {r: s for r, s in out.items() if s.tensors}

    @property
    def quantized(self) -> int:  # how many tensors are quantized (Op.quantized)
        return sum(op.quantized for op in self.ops)

    def schemes(self, converted_only: bool = False) -> list[str]:  # formats of the quantized weights, sorted
        return sorted({op.module_scheme.split(":")[0] for op in self.ops if op.converted or op.quantized > converted_only})

    def fingerprint(self) -> str:
        """Identity of the output this plan produces: source identity, options, version."""
        h = hashlib.sha256()
        h.update(self.source.fingerprint().encode())
        h.update(json.dumps(self.options.key(), sort_keys=True).encode())
        h.update(__version__.encode())
        for s in self.shards:
            h.update(s.header)
        return h.hexdigest()

    def index(self) -> dict:
        return {
            "metadata": {"total_size": sum(s.data_bytes for s in self.shards)},
            "weight_map": {t.name: s.filename for s in self.shards for t in s.tensors},
        }


def parse_size(text: str | int) -> int:
    """'5GB' -> 5e9, '500MiB' -> 500*2**20, '1000' -> 1000 (as Hugging Face does)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*", text, re.I)
    if not m:
        raise QStreamError(f"max shard size {text!r} is not a size like 5GB or 500MB.")
    num = float(m.group(1))
    unit = (m.group(2) or "").upper()
    mult = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
            "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    if unit not in mult:
        raise QStreamError(f"max shard size {text!r} has an unknown unit; use B, KB, MB, GB, KiB, MiB or GiB.")
    return int(num * mult[unit])


def _scheme_for(role: str, opts: Options, recipe: Recipe | None) -> Scheme | None:
    name = None
    if role == "mlp":
        name = opts.mlp
    if recipe and role in recipe.schemes:
        name = recipe.schemes[role]
    if name in (None, "none", "keep"):
        return None
    if name not in SCHEMES:
        raise QStreamError(f"unknown scheme {name!r} for role {role}; choose one of {', '.join(SCHEMES)} or none.")
    return SCHEMES[name]


def make_plan(src: Checkpoint, opts: Options) -> Plan:
    families = load_families()
    family = select_family(src.config, families)
    recipe = Recipe.load(Path(opts.recipe)) if opts.recipe else None
    classifier = Classifier(family, families["generic"], recipe)
    ignore_res = []
    for pat in list(opts.ignore) + (recipe.ignore if recipe else []):
        try:
            ignore_res.append(re.compile(pat))
        except re.error as e:
            raise QStreamError(f"--ignore {pat!r} is not a valid regex ({e}).") from e
    warnings: list[str] = []
    if family.name == "generic":
        warnings.append(unknown_family_warning(src.config))
    check_source_quantization(src)
    fp8 = find_fp8_weights(src.tensors, src.config)
    consumed = {t.name for f in fp8.values() for t in (f.scale, f.input_scale) if t is not None}

    experts = plan_fused_experts(src, family, classifier, opts, recipe, ignore_res, warnings)
    consumed |= experts.consumed
    # a ModelOpt NVFP4 source: its packed modules are repacked, not requantized
    mo = modelopt_source.plan_source(src, opts, classifier, ignore_res, warnings)
    experts.ops.update(mo.ops)
    consumed |= mo.consumed

    ops: list[Op] = []
    for info in src.tensors.values():
        if info.name in consumed:
            continue
        if info.name in experts.ops:
            ops.extend(experts.ops[info.name])
            continue
        role = classifier.role(info.name)
        scheme = _scheme_for(role, opts, recipe)
        ops.extend(_plan_tensor(info, role, scheme, fp8.get(info.name), opts, ignore_res, warnings))
    warnings[:] = group_warnings(warnings) + unmatched_ignores(
        list(opts.ignore) + (recipe.ignore if recipe else []), ignore_res, src.tensors)

    # NVFP4 global-scale groups: fused partners that are all quantized with a global scale.
    scale_groups: dict[str, list[str]] = {}
    for op in ops:
        if op.kind == "quantize" and SCHEMES[op.scheme].has_global_scale:
            key = classifier.fused_key(op.module + ".weight") or op.module
            op.scale_group = key
            scale_groups.setdefault(key, []).append(op.module)

    # --scale-search: a mode that every FP4 scheme of the plan offers (reference.SEARCH_MODES)
    used = sorted({op.scheme for op in ops if op.kind == "quantize"})
    allowed = [m for m in SEARCH_MODES["nvfp4"] if all(m in SEARCH_MODES[u] for u in used)]
    if opts.scale_search not in allowed:
        raise QStreamError(f"--scale-search {opts.scale_search!r} is not a scale search of "
                           f"{' and '.join(used) or 'any scheme'}; choose one of {', '.join(allowed)}.")

    if opts.format not in modelopt.FORMATS:
        raise QStreamError(f"unknown output format {opts.format!r}; choose one of {', '.join(modelopt.FORMATS)}.")
    activations.check(opts, ops)
    activations.add_input_scales(ops, opts, scale_groups)
    if opts.format == "modelopt":
        modelopt.apply_format(ops)  # ModelOpt names: weight / weight_scale / weight_scale_2
    check_something_quantized(src, opts, ops, warnings)
    warnings += unloadable_experts(family.name, ops, opts)
    shards = _assign_shards(ops, opts.max_shard_size)
    warnings += oversized_tensors(ops, opts.max_shard_size) + runtime_warnings(family.name, ops, classifier.fused_key)
    if opts.format == "modelopt":
        qconfig = modelopt.quantization_config(ops)
    elif experts.openai:
        qconfig = openai_mxfp4.quantization_config(src.config, ops)
    else:
        qconfig = quantization_config(ops, src.config, family)
    activations.apply_ct_config(qconfig if opts.format != "modelopt" else None, opts)
    return Plan(src, opts, family.name, ops, shards, scale_groups, qconfig, warnings)


FUSED_EXPERTS = re.compile(r"^(?P<prefix>.*\.experts)\.(?P<kind>gate_up_proj|down_proj)(?P<suffix>\.weight|_blocks|_bias)?$")


@dataclass
class ExpertsPlan:
    ops: dict[str, list[Op]] = field(default_factory=dict)  # source tensor -> its per-expert ops
    consumed: set[str] = field(default_factory=set)  # tensors read by those ops, not planned on their own
    openai: bool = False  # gpt-oss experts written in OpenAI's stacked MXFP4 layout (layouts/openai_mxfp4.py)


def _hidden_size(config: dict) -> int | None:
    for c in (config, config.get("text_config") or {}):
        if isinstance(c.get("hidden_size"), int):
            return c["hidden_size"]
    return None


def plan_fused_experts(src: Checkpoint, family, classifier: Classifier, opts: Options, recipe: Recipe | None,
                       ignore_res: list[re.Pattern[str]], warnings: list[str]) -> ExpertsPlan:
    """Per-expert 2-D ops for fused 3-D expert tensors.

    ``experts.gate_up_proj`` [E, 2I, H] (or [E, H, 2I] input-major, gate/up interleaved
    for gpt-oss) and ``experts.down_proj`` become ``experts.{e}.gate_proj / up_proj /
    down_proj`` Linears, the per-expert naming of llm-compressor's
    ``split_fused_moe_experts`` and linearized experts, which vLLM's compressed-tensors
    MoE loader reads. gpt-oss MXFP4 sources (``*_blocks`` uint8 [E, out, G, 16] +
    ``*_scales`` [E, out, G], output-major, gate/up interleaved) are repacked row by row.
    Biases (``*_bias`` [E, out]) are split the same way.
    """
    res = ExpertsPlan()
    hidden = _hidden_size(src.config)
    in_out = getattr(family, "experts_layout", "out_in") == "in_out"
    interleaved = bool(getattr(family, "experts_interleaved", False))
    mxfp4_src = (src.config.get("quantization_config") or {}).get("quant_method") == "mxfp4"
    openai = openai_mxfp4.applies(family, opts, recipe)  # gpt-oss MXFP4: OpenAI's stacked layout
    for name, info in src.tensors.items():
        m = FUSED_EXPERTS.match(name)
        if not m or (m.group("suffix") == "_bias"):
            continue
        prefix, kind, suffix = m.group("prefix"), m.group("kind"), m.group("suffix") or ""
        role = classifier.role(name)
        scheme = _scheme_for(role, opts, recipe)
        if role != "mlp":
            continue
        blocks = suffix == "_blocks"
        if blocks:
            scales = src.tensors.get(f"{prefix}.{kind}_scales")
            if scales is None or len(info.shape) != 4 or info.dtype != "U8":
                raise QStreamError(f"tensor {name!r} ({info.path.name}) looks like gpt-oss MXFP4 blocks but has no "
                                   f"{prefix}.{kind}_scales or is not uint8 [E, out, G, 16].")
            if scheme is None:
                raise QStreamError(f"{src.root} stores its experts as MXFP4 ({name}); choose --mlp mxfp4 (a lossless "
                                   "repack) or --mlp nvfp4.")
            E, out_total, G, B = info.shape
            transpose, in_dim = False, G * B * 2
            row_inter = kind == "gate_up_proj"  # gpt-oss interleaves gate/up rows
        else:
            if len(info.shape) != 3:
                continue
            E, d1, d2 = info.shape
            transpose = in_out
            if hidden is not None and kind == "gate_up_proj":
                transpose = d1 == hidden and d2 != hidden if d1 != d2 else in_out
            elif hidden is not None and kind == "down_proj":
                transpose = d2 == hidden and d1 != hidden if d1 != d2 else in_out
            out_total, in_dim = (d2, d1) if transpose else (d1, d2)
            row_inter = interleaved and kind == "gate_up_proj"
            if scheme is None or any(r.search(name) for r in ignore_res):
                continue  # stays one fused tensor, passed through
            if info.dtype not in FLOAT_SOURCE_DTYPES:
                raise QStreamError(f"tensor {name!r} ({info.path.name}) has dtype {info.dtype}; fused experts are "
                                   f"read from {', '.join(FLOAT_SOURCE_DTYPES)} (or gpt-oss MXFP4 blocks).")
            if in_dim % scheme.group_size:
                warnings.append(f"{name}: input dimension {in_dim} is not a multiple of {scheme.name}'s group size "
                                f"{scheme.group_size}; left fused and unquantized")
                continue
        bias = src.tensors.get(f"{prefix}.{kind}_bias")
        if openai:
            res.ops[name] = openai_mxfp4.expert_ops(role, info, scales if blocks else None, prefix, kind, E, out_total,
                                                    in_dim, transpose)
            if blocks:
                res.consumed.add(scales.name)
            if bias is not None:
                res.ops[bias.name] = [openai_mxfp4.bias_op(role, bias)]
            res.openai = True
            continue
        if kind == "gate_up_proj":
            if out_total % 2:
                raise QStreamError(f"tensor {name!r} has an odd gate_up dimension {out_total}; cannot split gate/up.")
            half = out_total // 2
            parts = [("gate_proj", 0, 2, half), ("up_proj", 1, 2, half)] if row_inter else \
                [("gate_proj", 0, 1, half), ("up_proj", half, 1, half)]
        else:
            parts = [("down_proj", 0, 1, out_total)]
        ops: list[Op] = []
        for e in range(E):
            for proj, start, step, count in parts:
                module = f"{prefix}.{e}.{proj}"
                view = View(e, transpose, start, step, count, in_dim)
                if blocks and scheme.name == "mxfp4":
                    outs = [OutTensor(n, d, sh) for n, d, sh in scheme.outputs(module, (count, in_dim))]
                    ops.append(Repack(role, info, outs, scheme="mxfp4", src_scale=scales, layout="mxfp4",
                                      view=view, out_module=module, module_scheme="mxfp4"))
                else:
                    outs = [OutTensor(n, d, sh) for n, d, sh in scheme.outputs(module, (count, in_dim))]
                    ops.append(Quantize(role, info, outs, scheme=scheme.name,
                                        src_scale=scales if blocks else None, layout="mxfp4" if blocks else None,
                                        view=view, out_module=module, module_scheme=scheme.name))
        res.ops[name] = ops
        if blocks:
            res.consumed.add(scales.name)
        if bias is not None and len(bias.shape) == 2 and bias.shape[0] == E:
            bops = []
            for e in range(E):
                for proj, start, step, count in parts:
                    view = View(e, False, start, step, count, 1)
                    bops.append(Slice(role, bias, [OutTensor(f"{prefix}.{e}.{proj}.bias", bias.dtype, (count,))],
                                      view=view, out_module=f"{prefix}.{e}.{proj}"))
            res.ops[bias.name] = bops
    if mxfp4_src and not res.openai and not any(op.kind in ("repack", "quantize") for ops in res.ops.values() for op in ops):
        raise QStreamError(f"{src.root}: quantization_config says mxfp4 but no experts *_blocks tensors were found.")
    return res


def _keep_fp8(f: Fp8Weight, role: str) -> list[Op]:
    """Pass an FP8 module through: weight bytes unchanged, scales as compressed-tensors names them."""
    mod = f.weight.name.removesuffix(".weight")
    static = f.input_scale is not None and f.layout == "tensor"
    key = f"fp8:{f.layout}" + (":static" if static else "") + (f":{f.block[0]}x{f.block[1]}" if f.block else "")
    w = Copy(role, f.weight, [OutTensor(f.weight.name, "F8_E4M3", f.weight.shape)], module_scheme=key)
    ops = [w]
    for src_t, out_name in ((f.scale, mod + ".weight_scale"), (f.input_scale, mod + ".input_scale")):
        if src_t is None or (out_name.endswith("input_scale") and not static):
            continue
        if f.layout == "tensor" or out_name.endswith("input_scale"):
            shape: tuple[int, ...] = (1,)
        elif f.layout == "channel":
            shape = (f.weight.shape[0], 1)
        else:
            shape = tuple(src_t.shape)
        if src_t.dtype == "F32":
            ops.append(Copy(role, src_t, [OutTensor(out_name, "F32", shape)]))
        else:
            ops.append(Cast(role, src_t, [OutTensor(out_name, "F32", shape)]))
    return ops


def _attn_op(enc, info: TensorInfo, role: str, module: str, dtype: str, **src) -> Op:
    """An FP8 attention output (``--attn``, one of schemes.ATTN_SCHEMES) of a 2-D weight."""
    outs = [OutTensor(n, d, s) for n, d, s in enc.outputs(module, info.shape, dtype)]
    return Fp8Encode(role, info, outs, scheme=enc.name, module_scheme=enc.key, **src)


def _plan_tensor(info: TensorInfo, role: str, scheme: Scheme | None, fp8: Fp8Weight | None, opts: Options,
                 ignore_res: list[re.Pattern[str]], warnings: list[str]) -> list[Op]:
    module = info.name.removesuffix(".weight")
    ignored = any(r.search(info.name) for r in ignore_res)
    if fp8 is not None:
        if scheme is not None and not ignored and info.shape[1] % scheme.group_size == 0:
            outs = [OutTensor(n, d, s) for n, d, s in scheme.outputs(module, info.shape)]
            return [Quantize(role, info, outs, scheme=scheme.name, src_scale=fp8.scale,
                             layout=fp8.layout, block=fp8.block, module_scheme=scheme.name)]
        if scheme is not None and not ignored:
            warnings.append(f"{info.name}: input dimension {info.shape[1]} is not a multiple of {scheme.name}'s "
                            f"group size {scheme.group_size}; kept in FP8")
        if role == "attention" and opts.attn == "bf16":
            return [Dequantize(role, info, [OutTensor(info.name, "BF16", info.shape)], src_scale=fp8.scale,
                               layout=fp8.layout, block=fp8.block)]
        enc = ATTN_SCHEMES.get(opts.attn) if role == "attention" and scheme is None and not ignored else None
        if enc is not None and not enc.keeps(fp8.layout, fp8.block):  # decoded, then re-encoded
            return [_attn_op(enc, info, role, module, "F32", src_scale=fp8.scale, layout=fp8.layout, block=fp8.block)]
        return _keep_fp8(fp8, role)

    copy = Copy(role, info, [OutTensor(info.name, info.dtype, info.shape)])
    if not info.name.endswith(".weight") or len(info.shape) != 2:
        return [copy]
    if role == "attention" and opts.attn in ATTN_SCHEMES and not ignored and scheme is None:
        if info.dtype not in FLOAT_SOURCE_DTYPES:
            return [copy]
        return [_attn_op(ATTN_SCHEMES[opts.attn], info, role, module, info.dtype)]
    if scheme is None:
        return [copy]
    if ignored:
        copy.note = "ignored by --ignore/recipe"
        return [copy]
    if info.dtype not in FLOAT_SOURCE_DTYPES:
        raise QStreamError(
            f"tensor {info.name!r} ({info.path.name}) has dtype {info.dtype}, which qstream cannot "
            f"quantize from (it reads {', '.join(FLOAT_SOURCE_DTYPES)} and FP8 with scales); exclude it with --ignore or convert it first."
        )
    out_f, in_f = info.shape
    if in_f % scheme.group_size != 0 or in_f == 0 or out_f == 0:
        warnings.append(
            f"{info.name}: input dimension {in_f} is not a multiple of {scheme.name}'s group size "
            f"{scheme.group_size}; left unquantized and listed in the ignore list"
        )
        copy.note = f"in_features {in_f} not a multiple of {scheme.group_size}"
        return [copy]
    outs = [OutTensor(n, d, s) for n, d, s in scheme.outputs(module, (out_f, in_f))]
    return [Quantize(role, info, outs, scheme=scheme.name, module_scheme=scheme.name)]


def _assign_shards(ops: list[Op], max_size: int) -> list[OutShard]:
    groups: list[list[Op]] = [[]]
    size = 0
    for op in ops:
        b = op.bytes_out
        if groups[-1] and size + b > max_size:
            groups.append([])
            size = 0
        groups[-1].append(op)
        size += b
    n = len(groups)
    shards = []
    for i, g in enumerate(groups):
        shard = OutShard(f"model-{i + 1:05d}-of-{n:05d}.safetensors")
        off = 0
        entries = []
        for op in g:
            for t in op.outputs:
                t.shard = i
                t.offset = off
                entries.append((t.name, t.dtype, t.shape, off, off + t.nbytes))
                off += t.nbytes
                shard.tensors.append(t)
        shard.header = build_header(entries, SHARD_METADATA)
        shards.append(shard)
    return shards
