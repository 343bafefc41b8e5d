"""ModelOpt NVFP4, the output layout (``--format modelopt``); reading it as a source is
:mod:`qstream.sources.modelopt`.

NVIDIA ModelOpt's "unified HF checkpoint" is what TensorRT-LLM and vLLM's
``modelopt_fp4`` method read. Per quantized Linear ``X`` (ModelOpt
modelopt/torch/export/quant_utils.py ``get_weight_scaling_factor{,_2}``,
``to_quantized_weight``; modelopt/torch/quantization/qtensor/nvfp4_tensor.py
``NVFP4QTensor``; vLLM model_executor/layers/quantization/modelopt.py
``ModelOptNvFp4W4A16LinearMethod.create_weights``):

* ``X.weight`` uint8 [out, in/2]: E2M1 codes, even column in the low nibble
  (``(q[..., 1::2] << 4) | q[..., 0::2]``), the same bytes as compressed-tensors'
  ``weight_packed``;
* ``X.weight_scale`` float8_e4m3fn [out, in/16]: the same bytes as CT's
  ``weight_scale``;
* ``X.weight_scale_2`` float32, a 0-d scalar (ModelOpt writes
  ``weight_scale_2.squeeze()``): a MULTIPLIER, ``w = fp4 * s * weight_scale_2``,
  where CT's ``weight_global_scale`` is a divisor, ``w = fp4 * s / global_scale``;
* ``X.input_scale`` only for W4A4 (``quant_algo: NVFP4``), which needs calibrated
  activation ranges. qstream writes weight-only NVFP4, which ModelOpt names
  ``W4A16_NVFP4`` (quant_utils.py ``get_quantization_format``: an FP4 weight
  quantizer with E4M3 block scales and no enabled input quantizer).

``weight_scale_2`` is written as ``float32(1 / global_scale)``: exactly the value
vLLM computes from a compressed-tensors checkpoint before it calls the same Marlin
kernel (compressed_tensors_w4a16_nvfp4.py ``1.0 / layer.weight_global_scale``; the
ModelOpt W4A16 method passes ``weight_scale_2`` through "without reciprocation"), so
the two outputs of one conversion give that kernel bit-identical operands. Decoded
in float32 with each library's own formula the values can differ in the last bits
(``fp4 * float32(s / g)`` vs ``fp4 * float32(s * float32(1 / g))``), but for a
BF16 or FP16 source (whose global scale has at most 11 significant bits) the
bfloat16 weights both libraries return are provably identical: ``fp4 * s / g`` is
then at least 2**-20 (relative) away from every bfloat16 rounding boundary, while
the two float32 evaluations stay within 3 * 2**-24 of it. ModelOpt's own value
``amax / 2688`` differs from ``1 / global_scale`` by CT's bf16 roundings of the
global scale; the block scales were computed against the CT global scale, so its
reciprocal is the one that decodes to the same weights.

Reading (ModelOpt -> compressed-tensors): the packed bytes and block scales are
copied; ``weight_global_scale`` is a float32 ``g`` with ``float32(1 / g) ==
weight_scale_2`` (vLLM then recovers ``weight_scale_2`` exactly), preferring the
candidate with the shortest significand. ``float32(1 / float32(1 / g)) != g`` for
about 17% of float32 values, and two candidates exist for exactly those; the
shortest one is the original CT scale whenever it came from a BF16/FP16 source, so
CT -> ModelOpt -> CT gives back the same files byte for byte. For about 17% of
arbitrary ``weight_scale_2`` values (mantissa in the upper part of the binade) no
float32 ``g`` has ``1 / g`` round to it; the correctly rounded ``1 / weight_scale_2``
is used and vLLM's reconstructed multiplier is one ulp off.

Configs (ModelOpt quant_utils.py ``process_layer_quant_config`` and
``_prefix_wildcard_summarize_exclude_modules``; convert_hf_config.py
``convert_hf_quant_config_format``): ``hf_quant_config.json`` holds ``producer``
and ``quantization: {quant_algo, kv_cache_quant_algo, group_size,
exclude_modules}``; config.json's ``quantization_config`` is the converted form
``{config_groups, ignore, quant_algo, producer, quant_method: "modelopt"}`` that
vLLM's ``ModelOptNvFp4Config.from_config`` reads (``ignore`` -> exclude_modules,
``group_size`` defaulting to 16). ``exclude_modules`` are ModelOpt's prefix
wildcards (``model.layers.0.self_attn*``), so that TensorRT-LLM's fnmatch over its
fused module names (``self_attn.qkv_proj``) and vLLM's wildcard / substring
matching both exclude exactly the Linears left unquantized.
"""

from __future__ import annotations

import fnmatch
import re

import numpy as np

from .. import __version__
from ..errors import QStreamError
from ..plan.ops import OutTensor

FORMATS = ("compressed-tensors", "modelopt")
QUANT_ALGO = "W4A16_NVFP4"  # weight-only NVFP4 (ModelOpt QUANTIZATION_W4A16_NVFP4)
READ_ALGOS = ("NVFP4", "W4A16_NVFP4")
GROUP_SIZE = 16
HF_QUANT_CONFIG = "hf_quant_config.json"
PRODUCER = {"name": "qstream", "version": __version__}


# --------------------------------------------------------------------------- scales

def weight_scale_2(global_scale) -> np.float32:
    """ModelOpt ``weight_scale_2`` for a CT ``weight_global_scale``: float32(1 / g)."""
    with np.errstate(divide="ignore", over="ignore"):
        return np.float32(1) / np.float32(global_scale)


def _trailing_zeros(x: np.float32) -> int:
    m = int(np.asarray(x, np.float32).view(np.uint32)) & 0x7FFFFF
    return 23 if m == 0 else (m & -m).bit_length() - 1


def global_scale(ws2, name: str = "weight_scale_2") -> np.float32:
    """CT ``weight_global_scale`` for a ModelOpt ``weight_scale_2`` (see the module doc)."""
    w = np.float32(ws2)
    if not np.isfinite(w) or w <= 0:
        raise QStreamError(f"tensor {name!r} is {float(w)!r}; a ModelOpt weight_scale_2 must be a positive finite "
                           "float32 (amax / 2688), the checkpoint is damaged.")
    one = np.float32(1)
    with np.errstate(divide="ignore", over="ignore"):
        g0 = one / w
        if not np.isfinite(g0):
            raise QStreamError(f"tensor {name!r} is {float(w)!r}, too small for a float32 reciprocal; "
                               "compressed-tensors cannot represent this global scale.")
        # every g with float32(1 / g) == w lies within one ulp of g0 (checked over whole binades)
        cands = [c for c in (np.nextafter(g0, np.float32(0)), g0, np.nextafter(g0, np.float32(np.inf)))
                 if np.isfinite(c) and one / c == w]
    if not cands:
        return g0
    exact = 1.0 / float(w)
    return max(cands, key=lambda c: (_trailing_zeros(c), -abs(float(c) - exact)))


# --------------------------------------------------------------------------- writing

def apply_format(ops: list) -> None:
    """Rename the NVFP4 outputs of a plan's ops to ModelOpt's names (``--format modelopt``).

    Only weight-only NVFP4 exists in this layout: any other quantized module is an error."""
    quantized = [op for op in ops if op.module_scheme is not None]
    if not quantized:
        raise QStreamError("--format modelopt: nothing would be quantized; ModelOpt output needs NVFP4 "
                           "modules (--mlp nvfp4).")
    for op in quantized:
        if op.module_scheme == "mxfp4":
            raise QStreamError(f"--format modelopt writes NVFP4 only, but {op.module} would be MXFP4; "
                               "use --mlp nvfp4 (or --format compressed-tensors for MXFP4).")
        if op.module_scheme != "nvfp4" or op.kind != "quantize":
            raise QStreamError(
                f"--format modelopt writes NVFP4-only checkpoints (quant_algo {QUANT_ALGO}), but {op.module} "
                f"stays {op.module_scheme.replace(':', ' ')}; pass --attn bf16 to dequantize FP8 attention, or use "
                "--format compressed-tensors.")
        packed, scale = op.outputs[:2]
        m = op.module
        op.outputs = [OutTensor(m + ".weight", "U8", packed.shape),
                      OutTensor(m + ".weight_scale", "F8_E4M3", scale.shape),
                      OutTensor(m + ".weight_scale_2", "F32", ())] + \
            [OutTensor(m + ".input_scale", "F32", ()) for t in op.outputs[3:]]  # W4A4 (qstream/activations.py)
        op.reciprocal_global_scale = True  # weight_scale_2 = float32(1 / global scale), a multiplier


def _unquantized_linears(ops: list) -> tuple[list[str], list[str]]:
    """(unquantized Linear modules, quantized modules), with the rule plan/plan.py uses for
    compressed-tensors' ``ignore`` (a tied lm_head is a Linear without a tensor)."""
    quantized = [op.module for op in ops if op.module_scheme is not None]
    unq = [op.module for op in ops
           if op.module_scheme is None and op.kind in ("copy", "dequantize") and op.outputs[0].name.endswith(".weight") and len(op.source.shape) == 2
           and op.role not in ("embedding", "norm")]
    if "lm_head" not in quantized and "lm_head" not in unq:
        unq.append("lm_head")
    return unq, quantized


def summarize_excludes(unquantized: list[str], quantized: list[str]) -> list[str]:
    """ModelOpt's exclude_modules: per unquantized module, the shortest prefix wildcard cut at
    a dot (``a.b*``, or ``a.b.*`` when ``a.b*`` would also catch a sibling like ``a.bc``) that
    matches no quantized module, else the exact name (quant_utils.py
    ``_prefix_wildcard_summarize_exclude_modules``)."""
    negative: set[str] = set()
    for q in quantized:
        negative.add(q)
        negative.update(q[:i] + "*" for i in range(len(q) + 1))
    out: set[str] = set()
    for name in unquantized:
        chosen: list[str] = []
        options = [c for i, ch in enumerate(name) if ch == "." for c in ([name[:i] + "*"], [name[:i], name[:i] + ".*"])]
        for wildcards in options + [[name]]:
            if any(w in negative for w in wildcards):
                continue
            if all(w in out for w in wildcards):
                chosen = []
                break
            chosen = wildcards
            break
        if len(chosen) == 2 and chosen[1] == chosen[0] + ".*":
            out.add(chosen[1])
        else:
            out.update(chosen)
    return sorted(out)


_FUSED = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "gate_proj": "gate_up_proj",
          "up_proj": "gate_up_proj"}


def _runtime_names(module: str) -> list[str]:
    """The names vLLM / TensorRT-LLM give the layer holding a quantized module."""
    names = [module]
    head, _, last = module.rpartition(".")
    if last in _FUSED:
        names.append(f"{head}.{_FUSED[last]}")
    m = re.match(r"(.*\.experts)\.\d+\.", module)
    if m:
        names.append(m.group(1))
    return names


def check_excludes(excludes: list[str], quantized: list[str]) -> None:
    """Refuse an exclude list that vLLM or TensorRT-LLM would also apply to a quantized layer:
    fnmatch (both), and vLLM's substring test of every entry (``x*`` counts as ``x``)."""
    runtime = [n for q in quantized for n in _runtime_names(q)]
    for e in excludes:
        plain = e[:-1] if e.endswith("*") and not e.endswith(".*") else (None if "*" in e else e)
        for n in runtime:
            if fnmatch.fnmatchcase(n, e) or (plain is not None and plain in n):
                raise QStreamError(f"--format modelopt: exclude_modules entry {e!r} would also exclude the "
                                   f"quantized layer {n!r} in vLLM/TensorRT-LLM (they match by wildcard and by "
                                   "substring); rename or --ignore it too, or use --format compressed-tensors.")


def quantization_config(ops: list) -> dict:
    """config.json ``quantization_config`` for ModelOpt output, as ModelOpt's
    ``convert_hf_quant_config_format`` writes it for W4A16_NVFP4."""
    unq, quantized = _unquantized_linears(ops)
    excludes = summarize_excludes(unq, quantized)
    check_excludes(excludes, quantized)
    w4a4 = any(t.name.endswith(".input_scale") for op in ops for t in op.outputs)  # quant_algo NVFP4
    group = {"weights": {"dynamic": False, "num_bits": 4, "type": "float", "group_size": GROUP_SIZE},
             "targets": ["Linear"]}
    return {
        "config_groups": {"group_0": {"input_activations": dict(group["weights"]), **group} if w4a4 else group},
        "ignore": excludes,
        "quant_algo": "NVFP4" if w4a4 else QUANT_ALGO,
        "producer": dict(PRODUCER),
        "quant_method": "modelopt",
    }


def hf_quant_config(qconfig: dict) -> dict:
    """hf_quant_config.json (ModelOpt ``process_layer_quant_config`` layout) from the config above."""
    return {
        "producer": qconfig["producer"],
        "quantization": {
            "quant_algo": qconfig["quant_algo"],
            "kv_cache_quant_algo": None,
            "group_size": GROUP_SIZE,
            "exclude_modules": qconfig["ignore"],
        },
    }
