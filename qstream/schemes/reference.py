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
    "SEARCH_MODES",
    "check_search",
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


def _nvfp4_code(group_amax: np.ndarray, dt: np.dtype, gs: np.float32, div) -> np.ndarray:
    """E4M3 code of ``dtype(amax / div) * gs`` as calculate_qparams computes it (clamped to
    448), BEFORE the zero -> 0.125 replacement. ``div`` 6 gives compressed-tensors' code."""
    s = round_to_dtype(group_amax / np.float32(div), dt)
    with np.errstate(over="ignore", invalid="ignore"):
        t = np.float32(gs) * s
    t = np.clip(t, -E4M3_MAX, E4M3_MAX)
    return t.astype(E4M3).view(np.uint8)


def _nvfp4_nonzero(code: np.ndarray) -> np.ndarray:
    """A scale code that decodes to 0 becomes 0x20 (0.125), as in calculate_qparams."""
    return np.where((code & 0x7F) == 0, np.uint8(0x20), code).astype(np.uint8)


def quantize_nvfp4(w: np.ndarray, global_scale: np.float32, search: str = "none"):
    """NVFP4 of a 2-D weight given its (possibly shared) global scale.

    Returns ``(packed uint8 [rows, cols/2], scale uint8 [rows, cols/16])``, the scale
    holding float8_e4m3fn bits. Rows are independent. ``search`` chooses each block's
    scale (see :data:`SEARCH_MODES`; "none" is compressed-tensors' rounding).
    """
    check_search("nvfp4", search)
    dt, g = _groups(w, NVFP4_GROUP)
    gs = np.float32(global_scale)
    group_amax = np.max(np.abs(g), axis=-1)  # min(min,0), max(max,0), max(|.|,|.|)
    if search != "none":
        code = _nvfp4_search(g, group_amax, dt, gs, search)
        return pack_fp4(_nvfp4_codes(g, code, gs).reshape(w.shape)), code
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


def quantize_mxfp4(w: np.ndarray, search: str = "none"):
    """MXFP4 of a 2-D weight.

    Returns ``(packed uint8 [rows, cols/2], scale uint8 [rows, cols/32])``, the scale
    holding biased E8M0 exponents. Rows are independent. ``search`` chooses each
    block's exponent (see :data:`SEARCH_MODES`; "none" is compressed-tensors' rounding).
    """
    check_search("mxfp4", search)
    dt, g = _groups(w, MXFP4_GROUP)
    group_amax = np.max(np.abs(g), axis=-1)
    e = _mx_exponent(group_amax, dt)
    s = _mx_scale_values(e, dt)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore", under="ignore"):
        q = round_to_dtype(g / s[..., None], dt)  # x / scale in the weight dtype
    codes = fp4_encode(q)
    byte = _mx_compress_scale(s)
    if search != "none":
        # the RTN block is kept where its exponent overflowed (e == 255: scale inf, all
        # codes 0, byte 127); elsewhere the RTN byte b0 and codes are those of the formula
        # below with b = b0, so the RTN candidate is exactly compressed-tensors' block
        byte, codes = _mxfp4_search(g, dt, byte, codes, e != 255)
    return pack_fp4(codes.reshape(w.shape)), byte


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


# -------------------------------------------------------------------- scale search
#
# ``search="none"`` is compressed-tensors' rounding (above). The other modes choose,
# for each block, among a few candidate scales the one whose DECODED block (decoded
# exactly as compressed-tensors' decompress does, which is what vLLM computes too)
# has the lowest squared error against the source values. Only the choice of the
# scale changes: given the chosen scale, the FP4 codes are compressed-tensors'
# quantizer applied with that scale, and the format, the global scale and the
# decoders are untouched. Candidate 0 is always compressed-tensors' own scale, and a
# candidate replaces the current best only when its error is strictly lower, so a
# block whose RTN scale is already best is written byte for byte as by "none", and
# the error of every block is <= its "none" error.
#
# The error of a block is sum((x * n - decoded * n)**2) in float32, where n is a power
# of two that brings the block to magnitude ~1 (2**-E for a block amax in [2**E,
# 2**(E+1)), E clipped to -126 .. 126; exact scaling, so the error is the true squared
# error times n**2, without float32 overflow or underflow at any weight magnitude), and
# the sum is a pairwise tree over halves (16 -> 8 -> 4 -> 2 -> 1 for NVFP4, 32 -> ...
# for MXFP4): a fixed order, so the kernels reproduce it exactly.
#
# NVFP4 candidates, in order (E4M3 codes; 0x01 .. 0x7E are the nonzero finite ones):
#   0. compressed-tensors' code: c6 = E4M3(gs * dtype(amax / 6)), 0 -> 0x20
#   1. "Four Over Six": the block max scaled to 4 instead of 6, c4 = E4M3(gs * dtype(amax
#      / 4)) (clamped to 448, 0 -> 0x20), as in Cook et al., "Four Over Six" (2025)
#   "4over6": candidates 0 and 1.
#   "mse": candidate 0, then the six E4M3 codes above it, c6 + 1 .. c6 + 6 (c6 taken
#   before the 0 -> 0x20 replacement; codes above 0x7E skipped), then c4 (when not
#   among them): the block max lands anywhere from 6 down to about 3.5 (c4 is c6 + 4 or
#   + 5). Scales below the RTN one (the max clipped to 6) are not tried: they lower the
#   squared error of more blocks (-30 % instead of -27 % on SmolLM2 with c6 - 1) but
#   raise SmolLM2's KL divergence (0.113 instead of 0.100 nats), as the largest weight
#   of a block matters more than its share of the squared error.
#   Measured in benchmarks/RESULTS-quality.md.
# MXFP4 candidates (biased E8M0 bytes b as written): 0. compressed-tensors' byte b0,
#   then b0 - 1 and b0 + 1 (within 0 .. 254). Codes for byte b: FP4 of
#   dtype(x * 2**(127 - b)), which for b0 is exactly compressed-tensors' dtype(x / scale).
#   Blocks whose RTN exponent overflowed (amax rounds up to inf) are kept as RTN.
#   Offsets of +-2 never win on the measured weights: for MXFP4 this search reaches the
#   minimum squared error the format allows for each block (nearest rounding is the best
#   code for any given scale).

#: the scale-search modes of each scheme; "none" = compressed-tensors' rounding
SEARCH_MODES = {"nvfp4": ("none", "4over6", "mse"), "mxfp4": ("none", "mse")}


def check_search(scheme: str, search: str) -> None:
    """Raise ValueError unless ``search`` is a scale-search mode of ``scheme``."""
    modes = SEARCH_MODES[scheme]
    if search not in modes:
        raise ValueError(f"unknown {scheme} scale search {search!r}; choose one of {', '.join(modes)}")


def _tree_sum(v: np.ndarray) -> np.ndarray:
    """Sum over the last axis (a power of two) as a pairwise tree over halves."""
    while v.shape[-1] > 1:
        h = v.shape[-1] // 2
        v = v[..., :h] + v[..., h:]
    return v[..., 0]


def _err_norm(group_amax: np.ndarray) -> np.ndarray:
    """2**clip(127 - biased exponent of the float32 block amax, -126, 126)."""
    ea = (np.asarray(group_amax, dtype=np.float32).view(np.uint32) >> 23) & 0xFF
    k = np.clip(127 - ea.astype(np.int64), -126, 126)
    return np.ldexp(np.float32(1.0), k.astype(np.int32)).astype(np.float32)


def _sq_error(g: np.ndarray, decoded: np.ndarray, norm: np.ndarray) -> np.ndarray:
    """Normalized squared error of each block (float32, pairwise sum), see above."""
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        d = (g * norm[..., None]).astype(np.float32) - (decoded * norm[..., None]).astype(np.float32)
        return _tree_sum((d * d).astype(np.float32))


def _nvfp4_codes(g: np.ndarray, code: np.ndarray, gs: np.float32) -> np.ndarray:
    """FP4 codes of groups ``g`` [.., G, 16] with E4M3 scale codes ``code`` [.., G]:
    compressed-tensors' quantizer (q = x / float32(scale / global_scale))."""
    sv = code.view(E4M3).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        sc = (sv / gs).astype(np.float32)
        q = (g / sc[..., None]).astype(np.float32)
    return fp4_encode(q)


def _nvfp4_error(g: np.ndarray, code: np.ndarray, gs: np.float32, norm: np.ndarray) -> np.ndarray:
    """Squared error of each block quantized with ``code`` and decoded like
    :func:`dequantize_nvfp4` (bf16(fp4 * float32(scale / global_scale)))."""
    sv = code.view(E4M3).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        sc = (sv / gs).astype(np.float32)
        dec = round_to_dtype((fp4_decode(_nvfp4_codes(g, code, gs)) * sc[..., None]).astype(np.float32), BF16)
    return _sq_error(g, dec, norm)


def _nvfp4_search(g, group_amax, dt, gs, search) -> np.ndarray:
    """E4M3 scale code of each block: the best candidate (see above)."""
    norm = _err_norm(group_amax)
    best = _nvfp4_scale_values(group_amax, dt, gs).astype(E4M3).view(np.uint8)
    best_err = _nvfp4_error(g, best, gs, norm)
    c4 = _nvfp4_nonzero(_nvfp4_code(group_amax, dt, gs, 4)).astype(np.int64)
    candidates = [c4]
    if search == "mse":
        c6 = _nvfp4_code(group_amax, dt, gs, 6).astype(np.int64)
        candidates = [c6 + k for k in range(1, 7)] + [c4]
    for c in candidates:
        valid = (c >= 0x01) & (c <= 0x7E)
        c = np.clip(c, 0x01, 0x7E).astype(np.uint8)
        err = _nvfp4_error(g, c, gs, norm)
        with np.errstate(invalid="ignore"):
            better = valid & (err < best_err)
        best = np.where(better, c, best).astype(np.uint8)
        best_err = np.where(better, err, best_err)
    return best


def _mx_candidate(g: np.ndarray, dt: np.dtype, b: np.ndarray, norm: np.ndarray):
    """(FP4 codes, error) of groups ``g`` with biased E8M0 bytes ``b`` (int64, 0..254):
    codes of dtype(x * 2**(127 - b)), error against compressed-tensors' decode."""
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        inv = np.ldexp(np.float32(1.0), (127 - b).astype(np.int32)).astype(np.float32)
        codes = fp4_encode(round_to_dtype((g * inv[..., None]).astype(np.float32), dt))
        s = round_to_dtype(np.ldexp(np.float32(1.0), (b - 127).astype(np.int32)), BF16)
        dec = round_to_dtype((fp4_decode(codes) * s[..., None]).astype(np.float32), BF16)
    return codes, _sq_error(g, dec, norm)


def _mxfp4_search(g, dt, byte, rtn_codes, searchable):
    """(bytes, codes) of each block: the best of b0, b0 - 1, b0 + 1 (see above)."""
    norm = _err_norm(np.max(np.abs(g), axis=-1))
    b0 = byte.astype(np.int64)
    best = b0.copy()
    best_codes, best_err = _mx_candidate(g, dt, np.clip(b0, 0, 254), norm)
    for d in (-1, 1):
        b = b0 + d
        valid = searchable & (b >= 0) & (b <= 254)
        codes, err = _mx_candidate(g, dt, np.clip(b, 0, 254), norm)
        with np.errstate(invalid="ignore"):
            better = valid & (err < best_err)
        best = np.where(better, b, best)
        best_err = np.where(better, err, best_err)
        best_codes = np.where(better[..., None], codes, best_codes)
    codes = np.where(searchable[..., None], best_codes, rtn_codes)
    return best.astype(np.uint8), codes
