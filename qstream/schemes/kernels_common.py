"""What the FP4 kernels share (:mod:`kernels_nvfp4`, :mod:`kernels_mxfp4`): the raw-bits view
of bf16 / fp16 / fp32 inputs, bit casts, the dtype roundings done on the bits, the float32 ->
E4M3 encoder, compressed-tensors' FP4 E2M1 rounding (codes and magnitudes), group amax, nibble
packing, the search's error normalizer, and the argument checks of the Python entry points.
The conventions are in :mod:`qstream.schemes.kernels`' docstring.
"""

from __future__ import annotations

import ml_dtypes
import numba
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
F32 = np.dtype(np.float32)

NVFP4_GROUP = 16
MXFP4_GROUP = 32

# kind codes: how to read the raw bits
K_BF16 = 0
K_F16 = 1
K_F32 = 2

# the raw-bits view handed to the kernels: its integer type IS the kind, so every
# kernel specialization knows its dtype at compile time (``_kind_of``)
_KINDS = {BF16: (K_BF16, np.uint16), F16: (K_F16, np.int16), F32: (K_F32, np.uint32)}

# float8_e4m3fn code -> float32 value (NaN codes 0x7F / 0xFF are never looked up
# on the quantization path)
_E4M3_VALUES = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(
    np.float32
)


# ------------------------------------------------------------------- bit casts


@intrinsic
def _f32_bits(typingctx, x):
    """float32 -> its uint32 bits (an LLVM bitcast)."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


@intrinsic
def _bits_f32(typingctx, x):
    """Low 32 bits of an integer -> float32 (truncate/extend, then LLVM bitcast)."""
    if not isinstance(x, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        v = args[0]
        if x.bitwidth > 32:
            v = builder.trunc(v, ir.IntType(32))
        elif x.bitwidth < 32:
            v = builder.zext(v, ir.IntType(32))
        return builder.bitcast(v, ir.FloatType())

    return types.float32(x), codegen


def _kind_of(w):  # pragma: no cover - replaced by the overload in jitted code
    raise NotImplementedError


@overload(_kind_of, inline="always")
def _kind_of_impl(w):
    """Compile-time kind of a raw-bits array: uint16 bf16, int16 fp16, uint32 fp32."""
    dtype = w.dtype
    if dtype == types.uint16:
        return lambda w: 0
    if dtype == types.int16:
        return lambda w: 1
    if dtype == types.uint32:
        return lambda w: 2
    return None


# --------------------------------------------------------- dtype emulation

_F32_ONE = np.float32(1.0)
_F32_SIX = np.float32(6.0)
_F32_FOUR = np.float32(4.0)
_F32_E4M3_MAX = np.float32(448.0)
_F32_ZERO_SCALE = np.float32(0.125)
_F32_TWO_M24 = np.float32(2.0**-24)
_F32_TWO_23 = np.float32(2.0**23)


@njit(inline="always", nogil=True, cache=True)
def _f16_bits_to_f32(h):
    """IEEE half bits (in a uint32) -> float32 value, exact."""
    s = (h & np.uint32(0x8000)) << np.uint32(16)
    e = (h >> np.uint32(10)) & np.uint32(0x1F)
    m = h & np.uint32(0x3FF)
    if e == np.uint32(0x1F):  # inf / nan
        return _bits_f32(s | np.uint32(0x7F800000) | (m << np.uint32(13)))
    if e != np.uint32(0):
        return _bits_f32(s | ((e + np.uint32(112)) << np.uint32(23)) | (m << np.uint32(13)))
    v = np.float32(m) * _F32_TWO_M24  # subnormal (or zero): exact
    return -v if s else v


@njit(inline="always", nogil=True, cache=True)
def _decode(b, kind):
    """Raw element bits -> float32 value."""
    if kind == 0:
        return _bits_f32(np.uint32(b) << np.uint32(16))
    if kind == 1:
        return _f16_bits_to_f32(np.uint32(b) & np.uint32(0xFFFF))
    return _bits_f32(np.uint32(b))


@njit(inline="always", nogil=True, cache=True)
def _rne_shift(mant, shift):
    """round(mant / 2**shift) half to even, for 1 <= shift; mant < 2**24."""
    if shift > 25:
        return np.uint32(0)
    half = np.uint32(1) << np.uint32(shift - 1)
    odd = (mant >> np.uint32(shift)) & np.uint32(1)
    return (mant + half - np.uint32(1) + odd) >> np.uint32(shift)


@njit(inline="always", nogil=True, cache=True)
def _round_f16(x):
    """float32 -> nearest float16 (RNE, subnormals, overflow to inf), as float32."""
    b = _f32_bits(x)
    a = b & np.uint32(0x7FFFFFFF)
    s = b & np.uint32(0x80000000)
    if a >= np.uint32(0x7F800000):  # inf / nan
        return x
    if a >= np.uint32(0x477FF000):  # >= 65520 rounds to inf
        return _bits_f32(s | np.uint32(0x7F800000))
    if a >= np.uint32(0x38800000):  # >= 2**-14: normal half, drop 13 bits
        odd = (a >> np.uint32(13)) & np.uint32(1)
        r = (a + np.uint32(0xFFF) + odd) & np.uint32(0xFFFFE000)
        return _bits_f32(s | r)
    # subnormal half: multiples of 2**-24
    ea = a >> np.uint32(23)
    if ea == np.uint32(0):
        return _bits_f32(s)  # float32 subnormal: far below 2**-25
    mant = (a & np.uint32(0x7FFFFF)) | np.uint32(0x800000)
    # value = mant * 2**(ea - 150); in units of 2**-24: mant * 2**(ea - 126)
    m = _rne_shift(mant, 126 - np.int64(ea))
    v = np.float32(m) * _F32_TWO_M24
    return -v if s else v


@njit(inline="always", nogil=True, cache=True)
def _round_bf16(x):
    """float32 -> nearest bfloat16 (RNE, subnormals, overflow to inf), as float32."""
    b = _f32_bits(x)
    if (b & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):  # nan
        return x
    odd = (b >> np.uint32(16)) & np.uint32(1)
    return _bits_f32((b + np.uint32(0x7FFF) + odd) & np.uint32(0xFFFF0000))


@njit(inline="always", nogil=True, cache=True)
def _round_to(x, kind):
    if kind == 0:
        return _round_bf16(x)
    if kind == 1:
        return _round_f16(x)
    return x


@njit(inline="always", nogil=True, cache=True)
def _e4m3(x):
    """float32 -> float8_e4m3fn bits: RNE, subnormals, saturate at +-448."""
    b = _f32_bits(x)
    s = np.uint8((b >> np.uint32(24)) & np.uint32(0x80))
    a = b & np.uint32(0x7FFFFFFF)
    if a > np.uint32(0x7F800000):  # nan
        return s | np.uint8(0x7F)
    if a >= np.uint32(0x3C800000):  # >= 2**-6: normal, drop 20 mantissa bits
        odd = (a >> np.uint32(20)) & np.uint32(1)
        r = (a + np.uint32(0x7FFFF) + odd) >> np.uint32(20)
        r = r - np.uint32(120 << 3)  # rebias exponent 127 -> 7
        if r > np.uint32(0x7E):  # past 448 (incl. inf): saturate like torch
            r = np.uint32(0x7E)
        return s | np.uint8(r)
    ea = a >> np.uint32(23)
    if ea == np.uint32(0):
        return s  # float32 subnormal: rounds to 0
    mant = (a & np.uint32(0x7FFFFF)) | np.uint32(0x800000)
    # value = mant * 2**(ea - 150); in units of 2**-9: mant * 2**(ea - 141)
    return s | np.uint8(_rne_shift(mant, 141 - np.int64(ea)))


@njit(inline="always", nogil=True, cache=True)
def _fp4(q):
    """FP4 E2M1 code of a scaled float32 (CT rounding, sign iff q < 0)."""
    a = abs(q)
    idx = (
        np.uint8(a > np.float32(0.25))
        + np.uint8(a >= np.float32(0.75))
        + np.uint8(a > np.float32(1.25))
        + np.uint8(a >= np.float32(1.75))
        + np.uint8(a > np.float32(2.5))
        + np.uint8(a >= np.float32(3.5))
        + np.uint8(a > np.float32(5.0))
    )
    if q < np.float32(0.0):
        idx |= np.uint8(8)
    return idx


# ---------------------------------------------------------------- row kernels
#
# ``kind`` is a compile-time constant of each specialization (``_kind_of``), so the
# dtype branches below are folded away. The codes of a row go to a row-sized uint8
# scratch in a loop LLVM can vectorize, and are packed two per byte in a second loop.


# ------------------------------------------------------------- scale search rows
#
# The search modes of the reference (``reference.SEARCH_MODES``; the candidates, their
# order and the error measure are described there), byte for byte. Errors are computed
# on magnitudes: the FP4 code of x has the sign of x whenever its magnitude is nonzero,
# and every rounding involved is symmetric, so (|x| - |decoded|) and (x - decoded) have
# the same square bit for bit. Once the best scale of a block is known, the block is
# emitted exactly as by the RTN kernels.


@njit(inline="always", nogil=True, cache=True)
def _fp4_mag(q):
    """FP4 E2M1 magnitude of compressed-tensors' rounding of a scaled magnitude q >= 0.

    Round half to even on the E2M1 grid is rint on the grid's spacing (0.5 below 2, 1
    below 4, 2 above), clamped to 6; NaN -> 0 like CT. rint is (y + 2**23) - 2**23 (y
    >= 2**23 only happens when q > 6, clamped anyway). Equal to
    ``fp4_decode(fp4_encode(q))`` for every float32 q >= 0 and NaN (tested exhaustively).
    """
    lo = q < np.float32(2.0)
    mid = q < np.float32(4.0)
    k = np.float32(2.0) if lo else (np.float32(1.0) if mid else np.float32(0.5))
    ik = np.float32(0.5) if lo else (np.float32(1.0) if mid else np.float32(2.0))
    y = q * k  # exact
    m = ((y + _F32_TWO_23) - _F32_TWO_23) * ik  # rint(y) (half to even) for 0 <= y < 2**23
    if m <= _F32_SIX:
        return m
    return _F32_SIX if q > _F32_SIX else np.float32(0.0)


@njit(inline="always", nogil=True, cache=True)
def _err_norm(amax):
    """The reference's per-block error normalizer: 2**clip(127 - biased exponent of the
    float32 amax, -126, 126), so that normalized magnitudes are about 1."""
    k = np.int64(127) - np.int64((_f32_bits(amax) >> np.uint32(23)) & np.uint32(0xFF))
    k = min(max(k, np.int64(-126)), np.int64(126))
    return _bits_f32(np.uint32(k + 127) << np.uint32(23))


# ------------------------------------------------------------ array helpers (tests, absmax)


@njit(nogil=True, cache=True)
def _absmax_bits(flat, mask):
    m = flat.dtype.type(0)
    for i in range(flat.shape[0]):
        m = max(m, flat[i] & mask)
    return m


@njit(nogil=True, cache=True)
def _fp8_dequant(codes, lut, scale, layout, r0, b0, b1, out):
    """out[i, j] = lut[codes[i, j]] * the scale of source row r0 + i, column j (float32
    products, as numpy's ``x *= s``): layout 0 per tensor (scale[0, 0]), 1 per channel
    (scale[r0 + i, 0]), 2 per b0 x b1 block (scale[(r0 + i) // b0, j // b1])."""
    rows, cols = codes.shape
    for i in range(rows):
        if layout == 0:
            s = scale[0, 0]
            for j in range(cols):
                out[i, j] = lut[codes[i, j]] * s
        elif layout == 1:
            s = scale[r0 + i, 0]
            for j in range(cols):
                out[i, j] = lut[codes[i, j]] * s
        else:
            br = (r0 + i) // b0
            for j in range(cols):
                out[i, j] = lut[codes[i, j]] * scale[br, j // b1]


@njit(nogil=True, cache=True)
def _e4m3_array(x, out):
    for i in range(x.shape[0]):
        out[i] = _e4m3(x[i])


@njit(nogil=True, cache=True)
def _round_array(x, kind, out):
    """float32 -> dtype rounding of the kernels, for tests (kind 0 bf16, 1 fp16)."""
    for i in range(x.shape[0]):
        out[i] = _round_to(x[i], kind)


@njit(nogil=True, cache=True)
def _fp4_mag_mismatches(lo, hi):
    """Count float32 bit patterns b in [lo, hi) where the search's _fp4_mag(q) differs from
    the magnitude of the RTN encoder's code _fp4(q), for tests (NaN must give 0)."""
    n = 0
    for b in range(lo, hi):
        q = _bits_f32(np.uint32(b))
        m = _fp4_mag(q)
        c = _fp4(q) & np.uint8(7)
        ref = np.float32(c) * np.float32(0.5) if c < 4 else (np.float32(c - 2) if c < 7 else _F32_SIX)
        if _f32_bits(m) != _f32_bits(ref):
            n += 1
    return n


@njit(nogil=True, cache=True)
def _decode_array(bits, kind, out):
    """raw bits -> float32 decoding of the kernels, for tests."""
    for i in range(bits.shape[0]):
        out[i] = _decode(bits[i], kind)


# ------------------------------------------------------------------ python API


def _bits(w: np.ndarray, group: int):
    w = np.asarray(w)
    if w.dtype not in _KINDS:
        raise TypeError(f"unsupported dtype {w.dtype}; expected bfloat16, float16, float32")
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D weight, got shape {w.shape}")
    if w.shape[1] % group:
        raise ValueError(f"columns ({w.shape[1]}) must be a multiple of {group}")
    return np.ascontiguousarray(w).view(_KINDS[w.dtype][1])


def _check_out(arr, shape, name):
    if not isinstance(arr, np.ndarray) or arr.dtype != np.uint8 or arr.shape != shape:
        raise ValueError(f"{name} must be a uint8 array of shape {shape}")
    if not arr.flags.c_contiguous or not arr.flags.writeable:
        raise ValueError(f"{name} must be C-contiguous and writeable")


def _nchunks() -> int:
    return 4 * numba.get_num_threads()
