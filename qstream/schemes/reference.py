"""Readable numpy specification of MXFP4 / NVFP4 weight quantization.

This module is the SPEC that the fast kernels (``qstream.schemes.kernels``) are
tested against, and that is itself tested byte for byte against compressed-tensors
0.20.0 driven the way llm-compressor 0.14 ``model_free_ptq`` drives it
(``tests/ct_reference.py``). It imports no torch; torch's CPU arithmetic is
emulated explicitly: an op on bf16 / fp16 tensors computes in float32 and rounds the
result to the dtype (round half to even), an op mixing a bf16/fp16 tensor with a
float32 tensor of rank >= 1 promotes to float32.

Paths below are relative to ``site-packages/compressed_tensors`` (CT) and to
``llmcompressor`` (LC).

Conventions
-----------
Flow per weight (LC entrypoints/model_free/converter.py + lifecycle.py): a Linear in
the weight's dtype is initialised with ``initialize_module_for_quantization``
(CT quantization/lifecycle/initialize.py ``initialize_qparams``: ``weight_scale`` is
a parameter in the WEIGHT dtype, ``weight_global_scale`` float32[1]); the
``memoryless_minmax`` observer (LC observers/min_max.py) takes per-group min / max
in the weight dtype after ``flatten_for_calibration`` (LC observers/helpers.py);
``Observer.get_global_scale`` (LC observers/base.py) takes the absmax over the
tensor and all its fused partners; ``calculate_qparams`` (CT
quantization/utils/helpers.py) gives the group scales, which are copied into the
weight-dtype parameter; ``compress_module`` (CT compressors/base.py) runs the
format's compressor.

FP4 E2M1 (``fp4_encode``; CT quantization/utils/fp4_utils.py ``cast_to_fp4`` CPU
fallback + compressors/nvfp4/helpers.py ``pack_fp4_to_uint8`` CPU fallback):
  * code = sign << 3 | index, magnitudes 0, .5, 1, 1.5, 2, 3, 4, 6.
  * clamp to [-6, 6]; |q| <= .25 -> 0, < .75 -> .5, <= 1.25 -> 1, < 1.75 -> 1.5,
    <= 2.5 -> 2, < 3.5 -> 3, <= 5 -> 4, else 6 (= round half to even).
  * sign: ``cast_to_fp4`` returns ``rounded_abs * torch.sign(q)`` and the packer takes
    ``torch.signbit``. ``torch.sign(-0.0) == +0.0``, so the sign bit is set exactly
    when ``q < 0`` (strictly): a negative q that rounds to 0 packs as 0x8, while
    q == -0.0 packs as 0x0. NOTE this is about q, the SCALED value: a tiny negative
    weight whose quotient underflows to -0.0 (in float32, or in the weight dtype for
    MXFP4) also packs as 0x0.
  * packing: even column in the low nibble, ``byte = c[2k] | c[2k+1] << 4``.

NVFP4 (CT compressors/nvfp4/base.py ``NVFP4PackedCompressor``, preset
``NVFP4A16``: strategy tensor_group, group 16, scale_dtype float8_e4m3fn):
  * global scale (CT quantization/utils/helpers.py ``generate_gparam``): amax in the
    weight dtype, clamped to at least ``finfo(weight dtype).tiny`` (2**-126 for bf16
    and fp32, but 2**-14 for fp16), then ``2688 / amax`` evaluated by torch as
    ``reciprocal(amax) * 2688`` IN THE WEIGHT DTYPE (two roundings), non-finite ->
    1.0, then cast to float32. For fp16 weights this overflows (-> 1.0) whenever
    amax < ~0.041, because 2688/amax exceeds 65504.
  * group scale (``calculate_qparams``): ``s = dtype(group_amax / 6)``;
    ``float32(global_scale * s)``; clamp to +-448; cast to E4M3 (RNE, subnormals
    kept) and back; 0 -> 0.125 (``_get_dtype_eps(float8_e4m3fn)``), i.e. code 0x20.
    The value is stored in the weight-dtype parameter (exact) and written as
    ``scale.to(float8_e4m3fn)`` (``_compress_scale``).
  * data (CT quantization/lifecycle/forward_helpers.py ``_quantize`` via
    ``quantize_and_pack_fp4`` CPU fallback): ``sc = float32(s_e4m3 / global_scale)``
    (weight-dtype tensor / float32[1] tensor -> float32), ``q = float32(x / sc)``,
    then FP4 as above.
  * decode (``NVFP4PackedCompressor.decompress``): unpacks to BFLOAT16
    (``unpack_fp4_from_uint8`` default dtype, whatever the original dtype was),
    ``sc = float32(bf16(s_e4m3) / global_scale)``, ``w = bf16(float32(fp4) * sc)``.
    The global scale is a divisor.

MXFP4 (CT compressors/mxfp4/base.py ``MXFP4PackedCompressor``, preset
``MXFP4A16``: strategy group, group 32, scale_dtype uint8):
  * exponent (CT quantization/utils/mxfp_utils.py ``generate_mx_scales`` /
    ``round_to_power_2``): on the bits of the group amax IN THE WEIGHT DTYPE add
    ``1 << (mantissa_bits - 2)`` and keep sign+exponent (bf16: +0x20, & 0xFF80;
    fp16: +0x100, & 0xFC00; fp32: +0x200000, & 0xFF800000). This rounds up to the
    next power of two when the mantissa is >= 1.75 and sends subnormals to 0 (or to
    the smallest normal). ``e = 127 + floor(log2(p2)) - 2`` (in the weight dtype,
    exact), clamped to [0, 255] and rounded to uint8 (``round_to_quantized_type_dtype``).
  * the scale VALUE (``maybe_convert_from_mx_exp``) is ``dtype(2 ** (e - 127))``;
    a 0 there becomes 1.0 (``_get_dtype_eps(uint8) == 1``). Stored in the weight
    dtype parameter, then written as ``127 + int32(floor(log2(scale)))`` cast to
    uint8 (CT compressors/mx_utils.py ``compress_mx_scale``). Consequences:
      - bf16 / fp32: a zero (or subnormal) group gives e = 0, scale 2**-127.
      - fp16: 2**(e-127) underflows fp16 for e < 103, which happens exactly when
        p2 == 0 (e = 0): a zero group, or one whose amax is an fp16 subnormal below
        0.75 * 2**-14, gets scale 1.0, written as e = 127. (Any other fp16 group has
        e >= 111.)
      - overflow: when the amax rounds up to infinity (bf16/fp32 amax >=
        1.75 * 2**127, fp16 amax >= 57344) e = 255, the scale value is inf, every
        q = x / inf is +-0 (all codes 0x0), and ``floor(log2(inf))`` cast to int32 is
        INT_MIN on x86 (cvttss2si), so the byte written is (127 + INT_MIN) mod 256
        = 127. We reproduce the x86 behaviour.
  * data: ``q = dtype(x / scale)`` (both tensors in the weight dtype), then FP4.
  * decode (``decompress``): ``scale = bf16(2 ** bf16(e - 127))``
    (``decompress_mx_scale``), ``w = bf16(bf16(fp4) * scale)``.

Where /work/shared/docs/formats.md is wrong or incomplete
---------------------------------------------------------
  * FP4 sign rule: the test is on the scaled q, not on the input (-0.0 input or an
    input whose quotient underflows to -0.0 -> 0x0).
  * NVFP4 global scale: computed in the WEIGHT dtype (formats.md says bf16), and the
    amax clamp is ``finfo(weight dtype).tiny`` (2**-14 for fp16, not float32 tiny).
    For fp16 weights the result is 1.0 whenever 2688/amax overflows fp16.
  * NVFP4 block scale: ``s = dtype(block_amax / 6)`` in the weight dtype (formats.md
    says bf16; for fp32 weights it is float32, for fp16 it is fp16).
  * NVFP4 decode: ``w = bf16(fp4 * float32(s / gs))``; ``fp4 * s / gs`` evaluated left
    to right would round differently. Decode output is bfloat16 in CT.
  * MXFP4: the exponent rounding is done on the group amax in the weight dtype
    (the bf16 constants only apply to bf16); a zero block gives e = 0 only for bf16
    / fp32 -- for fp16 weights it gives 127 (scale 1.0), as does any fp16 block with
    amax < 0.75 * 2**-14; blocks whose amax rounds up to inf give 127 and all-zero
    codes (formats.md does not mention either).
  * MXFP4: ``q = dtype(x / 2**(e-127))`` is rounded to the weight dtype (not always
    bf16); this only matters for the sign of underflowing quotients.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

__all__ = [
    "FP4_VALUES",
    "NVFP4_GROUP",
    "MXFP4_GROUP",
    "fp4_encode",
    "fp4_decode",
    "pack_fp4",
    "unpack_fp4",
    "tensor_absmax",
    "nvfp4_global_scale",
    "quantize_nvfp4",
    "quantize_mxfp4",
    "dequantize_nvfp4",
    "dequantize_mxfp4",
    "round_to_dtype",
]

BF16 = np.dtype(ml_dtypes.bfloat16)
E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
F16 = np.dtype(np.float16)
F32 = np.dtype(np.float32)
SUPPORTED = (BF16, F16, F32)

NVFP4_GROUP = 16
MXFP4_GROUP = 32

#: FP4 E2M1 magnitudes by 3-bit index (compressors/nvfp4/helpers.py kE2M1ToFloat).
FP4_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=np.float32)

E4M3_MAX = np.float32(448.0)
NVFP4_ZERO_SCALE = np.float32(0.125)  # _get_dtype_eps(float8_e4m3fn)
FP4_MAX = np.float32(6.0)


def _dtype(dtype) -> np.dtype:
    dt = np.dtype(dtype)
    if dt not in SUPPORTED:
        raise TypeError(f"unsupported dtype {dt}; expected bfloat16, float16, float32")
    return dt


def round_to_dtype(x, dtype) -> np.ndarray:
    """float32 values rounded (RNE) to ``dtype`` and returned as float32.

    This is what torch does with the float32 result of an op on bf16/fp16 tensors.
    """
    x = np.asarray(x, dtype=np.float32)
    dt = _dtype(dtype)
    if dt == F32:
        return x
    with np.errstate(over="ignore"):
        return x.astype(dt).astype(np.float32)


# --------------------------------------------------------------------------- FP4


def fp4_encode(q: np.ndarray) -> np.ndarray:
    """FP4 E2M1 codes (uint8 0..15) of already-scaled float32 values ``q``.

    CT cast_to_fp4 (CPU) + pack_fp4_to_uint8 (CPU): clamp to +-6, round half to
    even between the E2M1 magnitudes, sign bit iff ``q < 0`` (so -0.0 -> 0x0, while
    a negative value rounding to zero -> 0x8).
    """
    q = np.asarray(q, dtype=np.float32)
    a = np.abs(np.clip(q, -FP4_MAX, FP4_MAX))
    index = (
        (a > 0.25).astype(np.uint8)
        + (a >= 0.75)
        + (a > 1.25)
        + (a >= 1.75)
        + (a > 2.5)
        + (a >= 3.5)
        + (a > 5.0)
    ).astype(np.uint8)
    sign = (q < 0).astype(np.uint8) << 3
    return index | sign


def fp4_decode(codes: np.ndarray) -> np.ndarray:
    """float32 values of FP4 codes (0x8 decodes to -0.0, like CT's unpack)."""
    codes = np.asarray(codes, dtype=np.uint8)
    mag = FP4_VALUES[codes & 0x7]
    return np.where(codes & 0x8, -mag, mag).astype(np.float32)


def pack_fp4(codes: np.ndarray) -> np.ndarray:
    """uint8 [rows, cols/2]: even column in the low nibble."""
    codes = np.asarray(codes, dtype=np.uint8)
    if codes.shape[-1] % 2:
        raise ValueError("FP4 packing needs an even number of columns")
    return (codes[..., 0::2] & 0xF) | ((codes[..., 1::2] & 0xF) << 4)


def unpack_fp4(packed: np.ndarray) -> np.ndarray:
    """Inverse of :func:`pack_fp4`: uint8 codes [rows, 2 * cols]."""
    packed = np.asarray(packed, dtype=np.uint8)
    out = np.empty(packed.shape[:-1] + (packed.shape[-1] * 2,), dtype=np.uint8)
    out[..., 0::2] = packed & 0xF
    out[..., 1::2] = packed >> 4
    return out


# ----------------------------------------------------------------------- helpers


def _groups(w: np.ndarray, group: int) -> tuple[np.dtype, np.ndarray]:
    w = np.asarray(w)
    dt = _dtype(w.dtype)
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D weight, got shape {w.shape}")
    rows, cols = w.shape
    if cols % group:
        raise ValueError(f"columns ({cols}) must be a multiple of {group}")
    return dt, w.astype(np.float32).reshape(rows, cols // group, group)


def tensor_absmax(w: np.ndarray) -> float:
    """max |w| as a python float (exact: every value of w's dtype is a float32)."""
    w = np.asarray(w)
    _dtype(w.dtype)
    if w.size == 0:
        return 0.0
    return float(np.max(np.abs(w.astype(np.float32))))


# ------------------------------------------------------------------------- NVFP4


def nvfp4_global_scale(absmax: float, dtype) -> np.float32:
    """CT generate_gparam(-absmax, absmax) for a weight of ``dtype``.

    ``absmax`` must be a value of ``dtype`` (it is: the max |w| of such a tensor).
    """
    dt = _dtype(dtype)
    a = np.asarray(absmax, dtype=np.float32)
    if not np.isnan(a) and round_to_dtype(a, dt) != a:
        raise ValueError(f"absmax {absmax!r} is not a {dt} value")
    # torch.clamp(max_val_pos, min=finfo(dtype).tiny); NaN passes through clamp
    tiny = np.float32(ml_dtypes.finfo(dt).tiny)
    if not np.isnan(a):
        a = np.maximum(a, tiny)
    # 448 * 6 / t == t.reciprocal() * 2688 (torch Tensor.__rtruediv__), each op
    # rounded to the tensor dtype
    with np.errstate(over="ignore", invalid="ignore"):
        r = round_to_dtype(np.float32(1.0) / a, dt)
        g = round_to_dtype(r * np.float32(E4M3_MAX * FP4_MAX), dt)
    # torch.nan_to_num(nan=1, posinf=1, neginf=1), then .to(float32)
    if not np.isfinite(g):
        g = np.float32(1.0)
    return np.float32(g)


def _nvfp4_scale_values(group_amax: np.ndarray, dt: np.dtype, gs: np.float32):
    """float32 E4M3 group scale values (calculate_qparams, steps 1, 2, 3, 5)."""
    s = round_to_dtype(group_amax / np.float32(FP4_MAX), dt)  # amax / (12 / 2)
    with np.errstate(over="ignore", invalid="ignore"):
        t = np.float32(gs) * s  # float32[1] * dtype[...] -> float32
    t = np.clip(t, -E4M3_MAX, E4M3_MAX)  # round_to_quantized_type_dtype
    sv = t.astype(E4M3).astype(np.float32)
    sv = np.where(sv == 0, NVFP4_ZERO_SCALE, sv).astype(np.float32)
    # copied into the weight-dtype weight_scale parameter: exact for every E4M3 value
    assert np.array_equal(round_to_dtype(sv, dt), sv, equal_nan=True)
    return sv


def quantize_nvfp4(w: np.ndarray, global_scale: np.float32):
    """NVFP4 of a 2-D weight given its (possibly shared) global scale.

    Returns ``(packed uint8 [rows, cols/2], scale uint8 [rows, cols/16])``, the scale
    holding float8_e4m3fn bits. Rows are independent.
    """
    dt, g = _groups(w, NVFP4_GROUP)
    gs = np.float32(global_scale)
    group_amax = np.max(np.abs(g), axis=-1)  # min(min,0), max(max,0), max(|.|,|.|)
    sv = _nvfp4_scale_values(group_amax, dt, gs)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        sc = (sv / gs).astype(np.float32)  # scale / global_scale, float32
        q = (g / sc[..., None]).astype(np.float32)  # x / scale, float32
    codes = fp4_encode(q).reshape(w.shape)
    return pack_fp4(codes), sv.astype(E4M3).view(np.uint8)


def dequantize_nvfp4(packed: np.ndarray, scale_bits: np.ndarray, global_scale):
    """CT NVFP4PackedCompressor.decompress, as float32.

    CT decodes to bfloat16 whatever the source dtype was; the result here is that
    bfloat16 tensor's values as float32 (bit-exact, including -0.0).
    """
    codes = unpack_fp4(packed)
    rows, cols = codes.shape
    x = fp4_decode(codes).reshape(rows, cols // NVFP4_GROUP, NVFP4_GROUP)
    s = np.asarray(scale_bits, dtype=np.uint8).view(E4M3).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        sc = (s / np.float32(global_scale)).astype(np.float32)
        w = (x * sc[..., None]).astype(np.float32)
    return round_to_dtype(w, BF16).reshape(rows, cols)


# ------------------------------------------------------------------------- MXFP4

# per dtype: (unsigned view, mantissa bits, exponent bits)
_MX_BITS = {BF16: (np.uint16, 7, 8), F16: (np.uint16, 10, 5), F32: (np.uint32, 23, 8)}
_INT32_MIN = -(2**31)


def _mx_exponent(group_amax: np.ndarray, dt: np.dtype) -> np.ndarray:
    """generate_mx_scales + round_to_quantized_type_dtype: uint8 exponents e."""
    utype, mant, expo = _MX_BITS[dt]
    bits = group_amax.astype(dt).view(utype).astype(np.int64)
    val_to_add = 1 << (mant - 1 - 1)  # 1 << (mantissa - elem_mantissa - 1)
    sign_exp_mask = ((1 << (expo + 1)) - 1) << mant
    p2 = ((bits + val_to_add) & sign_exp_mask).astype(utype).view(dt)
    with np.errstate(divide="ignore"):
        e = 127.0 + np.floor(np.log2(p2.astype(np.float64))) - 2.0  # exact integers
    return np.round(np.clip(e, 0, 255)).astype(np.uint8)


def _mx_scale_values(e: np.ndarray, dt: np.dtype) -> np.ndarray:
    """maybe_convert_from_mx_exp + eps: the scale value, in dt, as float32."""
    with np.errstate(over="ignore"):
        s = np.exp2(e.astype(np.float32) - np.float32(127)).astype(np.float32)
    s = round_to_dtype(s, dt)
    return np.where(s == 0, np.float32(1.0), s).astype(np.float32)


def _mx_compress_scale(s: np.ndarray) -> np.ndarray:
    """compress_mx_scale: 127 + int32(floor(log2(s))), cast to uint8 (mod 256)."""
    with np.errstate(divide="ignore"):
        lg = np.floor(np.log2(s.astype(np.float64)))
    lg = np.where(np.isfinite(lg), lg, _INT32_MIN).astype(np.int64)  # x86 cvttss2si
    return ((127 + lg) & 0xFF).astype(np.uint8)


def quantize_mxfp4(w: np.ndarray):
    """MXFP4 of a 2-D weight.

    Returns ``(packed uint8 [rows, cols/2], scale uint8 [rows, cols/32])``, the scale
    holding biased E8M0 exponents. Rows are independent.
    """
    dt, g = _groups(w, MXFP4_GROUP)
    group_amax = np.max(np.abs(g), axis=-1)
    e = _mx_exponent(group_amax, dt)
    s = _mx_scale_values(e, dt)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore", under="ignore"):
        q = round_to_dtype(g / s[..., None], dt)  # x / scale in the weight dtype
    codes = fp4_encode(q).reshape(w.shape)
    return pack_fp4(codes), _mx_compress_scale(s)


def dequantize_mxfp4(packed: np.ndarray, scale: np.ndarray):
    """CT MXFP4PackedCompressor.decompress, as float32 (CT's output is bfloat16)."""
    codes = unpack_fp4(packed)
    rows, cols = codes.shape
    x = fp4_decode(codes).reshape(rows, cols // MXFP4_GROUP, MXFP4_GROUP)
    e = np.asarray(scale, dtype=np.uint8).astype(np.float32) - np.float32(127)
    with np.errstate(over="ignore", invalid="ignore"):
        s = round_to_dtype(np.exp2(e), BF16)  # 2.0 ** bf16(e - 127)
        w = round_to_dtype(x * s[..., None], BF16)  # bf16 * bf16
    return w.reshape(rows, cols)
