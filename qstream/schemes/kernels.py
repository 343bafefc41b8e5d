"""Fused numba kernels for MXFP4 / NVFP4 quantization.

Same semantics, byte for byte, as :mod:`qstream.schemes.reference` (the spec; read its
docstring for the conventions). One pass per row: decode -> group amax -> scale ->
FP4 rounding -> codes, then nibble packing; the only scratch is one row of uint8
codes per thread (no full-size intermediates).

* Inputs are 2-D numpy arrays of ``ml_dtypes.bfloat16``, ``np.float16`` or
  ``np.float32``. The kernels see the raw bits, and the integer type of that view
  tells each specialization its dtype at compile time: uint16 = bf16, int16 = fp16,
  uint32 = fp32 (numba has no bf16 type; its fp16 support is not needed). bf16 ->
  f32 is a shift, fp16 -> f32 is decoded on the bits, and rounding a float32 result
  to bf16 / fp16 (what torch does after each op on such tensors) is done on the
  bits, round half to even, subnormals and overflow included.
* float32 -> float8_e4m3fn (round half to even, subnormals kept, saturating at
  +-448 like torch's cast; NaN -> 0x7F | sign) is done on the bits too
  (:func:`e4m3_encode`; equal to torch's cast for all 2**32 inputs, and to
  ml_dtypes' cast wherever ml_dtypes does not overflow to NaN, i.e. |x| <= 464).
  The quantization path clamps to 448 first, as compressed-tensors does.
* Every kernel is ``nogil``: run the serial kernels from several Python threads on
  different row blocks (this is the intended way to parallelise a stream). The
  ``parallel=True`` variants split rows across numba's thread pool; with numba's
  ``workqueue`` layer (used only when neither ``omp`` nor ``tbb`` is available) they
  must not be called from several Python threads at once. A parallel launch costs
  tens of microseconds (milliseconds on a loaded box): use it for big matrices.

``search`` selects the scale search of the reference (read its "scale search" section):
"none" is compressed-tensors' rounding, byte for byte; "4over6" (NVFP4) and "mse" pick
each block's scale among a few candidates by the squared error of the decoded block,
in one fused pass per row (decode a block once, evaluate its candidates together, emit),
byte for byte like the reference (NVFP4: with per-global-scale threshold tables instead
of a division per candidate, see ``_nv_tables``).

Public API (mirrors the reference):
    absmax(w) -> float
    quantize_nvfp4(w, global_scale, search="none", *, parallel=False) -> (packed, scale_bits)
    quantize_mxfp4(w, search="none", *, parallel=False) -> (packed, scale)
    quantize_nvfp4_into(w, global_scale, packed_out, scale_out, search="none", *, parallel=False)
    quantize_mxfp4_into(w, packed_out, scale_out, search="none", *, parallel=False)
    SEARCH_MODES: {"nvfp4": ("none", "4over6", "mse"), "mxfp4": ("none", "mse")}
    e4m3_encode(x_float32_array) -> uint8 array
    warmup(search=True, parallel=True) -> seconds (compiles, or loads from numba's
        cache, every specialization; the search and parallel=True kernels are separate
        entry points, compiled on first use otherwise)
"""

from __future__ import annotations

import time

import ml_dtypes
import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic, overload

from . import reference as _reference

__all__ = [
    "absmax",
    "quantize_nvfp4",
    "quantize_mxfp4",
    "quantize_nvfp4_into",
    "quantize_mxfp4_into",
    "e4m3_encode",
    "warmup",
    "SEARCH_MODES",
]

SEARCH_MODES = _reference.SEARCH_MODES

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

# scale-search modes -> kernel mode numbers (the candidates are in the reference's
# "scale search" section)
_NV_MODES = {"none": 0, "4over6": 1, "mse": 2}
_MX_MODES = {"none": 0, "mse": 2}
assert tuple(_NV_MODES) == _reference.SEARCH_MODES["nvfp4"]
assert tuple(_MX_MODES) == _reference.SEARCH_MODES["mxfp4"]

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


@njit(inline="always", nogil=True, cache=True)
def _abs_mask(kind):
    if kind == 2:
        return np.uint32(0x7FFFFFFF)
    return np.uint32(0x7FFF)


@njit(inline="always", nogil=True, cache=True)
def _group_amax_bits(w, r, base, size, mask):
    """max of the magnitude bits of one group (monotonic in |x| for non-NaN)."""
    m = np.uint32(0)
    for j in range(size):
        m = max(m, np.uint32(w[r, base + j]) & mask)
    return m


@njit(inline="always", nogil=True, cache=True)
def _pack_row(codes, packed, r):
    for j in range(packed.shape[1]):
        packed[r, j] = codes[2 * j] | (codes[2 * j + 1] << np.uint8(4))


@njit(nogil=True, cache=True)
def _nvfp4_row(w, r, gs, e4m3_values, packed, scale, codes):
    kind = _kind_of(w)
    mask = _abs_mask(kind)
    for g in range(w.shape[1] // 16):
        base = g * 16
        amax = _decode(_group_amax_bits(w, r, base, 16, mask), kind)
        s = _round_to(amax / _F32_SIX, kind)  # dtype(amax / 6)
        t = gs * s  # float32
        if t > _F32_E4M3_MAX:
            t = _F32_E4M3_MAX
        code = _e4m3(t)
        sv = e4m3_values[code]
        if sv == np.float32(0.0):
            code = np.uint8(0x20)
            sv = _F32_ZERO_SCALE
        scale[r, g] = code
        sc = sv / gs  # float32(scale / global_scale)
        for j in range(16):
            codes[base + j] = _fp4(_decode(w[r, base + j], kind) / sc)
    _pack_row(codes, packed, r)


@njit(nogil=True, cache=True)
def _mxfp4_row(w, r, packed, scale, codes):
    kind = _kind_of(w)
    mask = _abs_mask(kind)
    # round_to_power_2 constants: 1 << (mantissa - 2), sign+exponent mask
    if kind == 0:
        add, keep, mshift, bias, emax = 0x20, 0xFF80, 7, 127, 0xFF
    elif kind == 1:
        add, keep, mshift, bias, emax = 0x100, 0xFC00, 10, 15, 0x1F
    else:
        add, keep, mshift, bias, emax = 0x200000, 0xFF800000, 23, 127, 0xFF
    for g in range(w.shape[1] // 32):
        base = g * 32
        m = _group_amax_bits(w, r, base, 32, mask)
        p2 = (np.int64(m) + add) & keep
        ef = p2 >> mshift
        if ef == emax:
            # amax rounds up to inf: scale inf, every q = +-0 -> code 0, and the
            # written exponent is (127 + INT32_MIN) & 0xFF == 127 (see reference)
            scale[r, g] = np.uint8(127)
            for j in range(32):
                codes[base + j] = np.uint8(0)
            continue
        if p2 == 0:
            e = np.int64(0)  # log2(0) = -inf, clamped to 0
        else:
            e = max(np.int64(127 + (ef - bias) - 2), np.int64(0))
        if kind == 1 and e < 127 - 24:
            e = np.int64(127)  # 2**(e-127) underflows fp16 -> eps 1.0 == 2**0
        scale[r, g] = np.uint8(e)
        inv = _bits_f32(np.uint32(254 - e) << np.uint32(23))  # 2**(127 - e), exact
        for j in range(32):
            # x / 2**(e-127) == x * 2**(127-e) exactly; then rounded to the dtype
            q = _round_to(_decode(w[r, base + j], kind) * inv, kind)
            codes[base + j] = _fp4(q)
    _pack_row(codes, packed, r)


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


@njit(inline="always", nogil=True, cache=True)
def _nv_code(amax, div, gs, kind):
    """E4M3 code of gs * dtype(amax / div), clamped to 448 (before 0 -> 0x20)."""
    t = gs * _round_to(amax / div, kind)
    if t > _F32_E4M3_MAX:
        t = _F32_E4M3_MAX
    return np.int64(_e4m3(t))


# NVFP4 search. The candidates of a block with a normal E4M3 RTN code c6 (0x08 .. 0x7E)
# are the codes c6 + k, k = 0 .. 7 (k = 0: RTN; 1 .. 6: "mse"; c4, the 4-over-6 code,
# is c6 + 3 .. c6 + 7 in that case), so they are evaluated together as the 8 lanes of
# one vector, value after value, with no division:
#
# * for a divisor sc (positive, finite, normal), the FP4 index of fl(a / sc) is a
#   non-decreasing function of a, so it is the number of thresholds T_i(sc) <= a, T_i
#   the least float32 whose quotient reaches index i (found once per call for the 127
#   codes of the global scale by stepping ulps from tau_i * sc, checked with the
#   division itself: exact);
# * the decoded magnitude of index i, bf16(m_i * sc), is a table too, and so is its
#   product with the block's normalizer (computed per block, as the reference does);
# * the divisors of the 8 lanes span less than a factor 2 (7 E4M3 steps), and any two
#   FP4 thresholds two indices apart are a factor >= 2 apart, so a value's index under
#   lane k is its RTN index h, h - 1 or h - 2: two compares and two selects per lane.
#
# The errors are the reference's (same float32 operations in the same order), the lanes
# are scanned in the reference's candidate order with its strict "<", so the chosen
# code is the reference's. Blocks outside that case (subnormal or zero RTN scale, a
# non-finite amax, global scales whose divisors are not normal floats) take a per-block
# path with the reference's arithmetic, candidate by candidate.

_NV_NCODE = 0x7F + 8  # table columns: codes 0 .. 0x7E, then 0x7E repeated (lanes past 0x7E)
_NV_TAU = np.array([0.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], np.float32)  # FP4 index thresholds
_NV_MAG = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], np.float32)  # FP4 magnitudes


def _v8_type():
    return ir.VectorType(ir.FloatType(), 8)


def _v8_ptr(context, builder, arrty, arrval, off):
    ary = context.make_array(arrty)(context, builder, arrval)
    return builder.bitcast(builder.gep(ary.data, [off]), _v8_type().as_pointer())


def _v8_splat(builder, x):
    v8 = _v8_type()
    v = builder.insert_element(ir.Constant(v8, ir.Undefined), x, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(v, ir.Constant(v8, ir.Undefined),
                                  ir.Constant(ir.VectorType(ir.IntType(32), 8), [0] * 8))


# numba does not run LLVM's SLP vectorizer, and its loop vectorizer does not handle
# 8-iteration loops well, so the 8-lane steps are written as portable LLVM vector IR
# (any target: AVX2 / AVX-512 on x86, two NEON registers on ARM). IEEE semantics, no
# fast-math: the same roundings and NaN comparisons as scalar code.


@intrinsic
def _v8_err(typingctx, tg, tb, dd, db, e, eb, a, an):
    """e[eb:eb+8] = (an - d)**2, d = dd[db+16+k] if a >= tg[tb+16+k] else dd[db+8+k] if
    a >= tg[tb+8+k] else dd[db+k], for k = 0 .. 7."""
    sig = types.void(tg, tb, dd, db, e, eb, a, an)

    def codegen(context, builder, signature, args):
        tgv, tbv, ddv, dbv, ev, ebv, av, anv = args
        i64 = ir.IntType(64)

        def load(arrty, arrval, off, extra):
            return builder.load(_v8_ptr(context, builder, arrty, arrval, builder.add(off, ir.Constant(i64, extra))),
                                align=4)

        t1, t2 = load(tg, tgv, tbv, 8), load(tg, tgv, tbv, 16)
        d0, d1, d2 = load(dd, ddv, dbv, 0), load(dd, ddv, dbv, 8), load(dd, ddv, dbv, 16)
        va = _v8_splat(builder, av)
        d = builder.select(builder.fcmp_ordered(">=", va, t1), d1, d0)
        d = builder.select(builder.fcmp_ordered(">=", va, t2), d2, d)
        diff = builder.fsub(_v8_splat(builder, anv), d)
        builder.store(builder.fmul(diff, diff), _v8_ptr(context, builder, e, ev, ebv), align=4)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _v8_add(typingctx, e, dst, src):
    """e[dst:dst+8] += e[src:src+8]"""
    sig = types.void(e, dst, src)

    def codegen(context, builder, signature, args):
        ev, dv, sv = args
        pd = _v8_ptr(context, builder, e, ev, dv)
        x = builder.load(pd, align=4)
        y = builder.load(_v8_ptr(context, builder, e, ev, sv), align=4)
        builder.store(builder.fadd(x, y), pd, align=4)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _v8_mul(typingctx, dst, doff, src, soff, s):
    """dst[doff:doff+8] = src[soff:soff+8] * s"""
    sig = types.void(dst, doff, src, soff, s)

    def codegen(context, builder, signature, args):
        dv, do, sv, so, sc = args
        x = builder.load(_v8_ptr(context, builder, src, sv, so), align=4)
        builder.store(builder.fmul(x, _v8_splat(builder, sc)), _v8_ptr(context, builder, dst, dv, do), align=4)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _v8_chain(typingctx, x, xn, xoff, tg, toff, dn, e, eoff):
    """e[eoff:eoff+8] = (xn[xoff+k] - dn[i])**2, i = the number of thresholds
    tg[toff + 8 * i'] (i' = 1 .. 7) <= x[xoff+k]: one candidate's errors for 8 values."""
    sig = types.void(x, xn, xoff, tg, toff, dn, e, eoff)

    def codegen(context, builder, signature, args):
        xv, xnv, xo, tgv, to, dnv, ev, eo = args
        i64 = ir.IntType(64)

        def scalar(arrty, arrval, off):
            ary = context.make_array(arrty)(context, builder, arrval)
            return builder.load(builder.gep(ary.data, [off]))

        a = builder.load(_v8_ptr(context, builder, x, xv, xo), align=4)
        an = builder.load(_v8_ptr(context, builder, xn, xnv, xo), align=4)
        d = _v8_splat(builder, scalar(dn, dnv, ir.Constant(i64, 0)))
        for i in range(1, 8):
            t = _v8_splat(builder, scalar(tg, tgv, builder.add(to, ir.Constant(i64, 8 * i))))
            d = builder.select(builder.fcmp_ordered(">=", a, t), _v8_splat(builder, scalar(dn, dnv, ir.Constant(i64, i))), d)
        diff = builder.fsub(an, d)
        builder.store(builder.fmul(diff, diff), _v8_ptr(context, builder, e, ev, eo), align=4)
        return context.get_dummy_value()

    return sig, codegen


@njit(nogil=True, cache=True)
def _nv_threshold(sc, i, tau):
    """Least float32 a >= 0 whose FP4 index of fl(a / sc) is >= i (1 <= i <= 7), or -1
    when not found within 64 ulps of tau * sc (the caller then uses the slow path)."""
    b = np.int64(_f32_bits(tau * sc))
    if b >= 0x7F800000:
        return np.float32(-1.0)
    n = 0
    while b > 0 and np.int64(_fp4(_bits_f32(np.uint32(b - 1)) / sc) & np.uint8(7)) >= i:
        b -= 1
        n += 1
        if n > 64:
            return np.float32(-1.0)
    while np.int64(_fp4(_bits_f32(np.uint32(b)) / sc) & np.uint8(7)) < i:
        b += 1
        n += 1
        if n > 64 or b >= 0x7F800000:
            return np.float32(-1.0)
    return _bits_f32(np.uint32(b))


@njit(nogil=True, cache=True)
def _nv_tables(gs, e4m3_values, tau, mag, tg, dg):
    """Per global scale: tg[c * 80 + (i + 2) * 8 + k] = T_i of code c + k (rows i = -2 .. 0:
    -inf), dg likewise bf16(m_i * divisor) (rows -2, -1: = row 0), for c = 0 .. 0x7F.
    True when every code 0x08 .. 0x7E has a normal finite divisor, thresholds and decodes."""
    t = np.empty((10, _NV_NCODE), np.float32)
    d = np.empty((10, _NV_NCODE), np.float32)
    ok = True
    ninf = _bits_f32(np.uint32(0xFF800000))
    for c in range(_NV_NCODE):
        cc = min(c, 0x7E)
        sc = e4m3_values[cc] / gs
        normal = sc >= np.float32(1.1754944e-38) and sc < np.float32(3.0e38)
        for i in range(3):
            t[i, c] = ninf
        for i in range(8):
            d[i + 2, c] = _round_bf16(mag[i] * sc)
        d[0, c] = d[2, c]
        d[1, c] = d[2, c]
        for i in range(1, 8):
            ti = _nv_threshold(sc, i, tau[i]) if normal else np.float32(-1.0)
            t[i + 2, c] = ti
            if cc >= 8 and ti < np.float32(0.0):
                ok = False
        if cc >= 8 and not (normal and d[9, c] < np.float32(3.0e38)):
            ok = False
    for c in range(128):
        for r in range(10):
            for k in range(8):
                tg[c * 80 + r * 8 + k] = t[r, c + k]
                dg[c * 80 + r * 8 + k] = d[r, c + k]
    return ok


@njit(inline="always", nogil=True, cache=True)
def _nv_block_err8(xa, xn, c6, tg, dg, dd, pn, hi, e, nj):
    """e[0:8]: the reference's error of the block (|x| in xa, |x| * pn in xn) under the
    codes c6 + k, k = 0 .. 7 (c6 normal)."""
    cb = c6 * 80
    for r in range(10):
        _v8_mul(dd, r * 8, dg, cb + r * 8, pn)  # decoded magnitudes * normalizer
    t1, t2, t3, t4 = tg[cb + 24], tg[cb + 32], tg[cb + 40], tg[cb + 48]
    t5, t6, t7 = tg[cb + 56], tg[cb + 64], tg[cb + 72]
    for j in range(nj):  # RTN index of every value
        a = xa[j]
        hi[j] = (np.int64(a >= t1) + np.int64(a >= t2) + np.int64(a >= t3) + np.int64(a >= t4)
                 + np.int64(a >= t5) + np.int64(a >= t6) + np.int64(a >= t7))
    for j in range(16):
        h = hi[j]
        _v8_err(tg, cb + h * 8, dd, h * 8, e, j * 8, xa[j], xn[j])
    for h in (8, 4, 2, 1):  # the reference's pairwise sum over halves, 8 lanes at a time
        for j in range(h):
            _v8_add(e, j * 8, (j + h) * 8)


@njit(inline="always", nogil=True, cache=True, error_model="numpy")
def _tree_sum16(e):
    """Sum of e[0:16] by pairwise halving (8, 4, 2, 1): the reference's summation order."""
    h = 8
    while h >= 1:
        for j in range(h):
            e[j] = e[j] + e[j + h]
        h //= 2
    return e[0]


@njit(inline="always", nogil=True, cache=True, error_model="numpy")
def _nv_block_err1(xa, xn, c, tg, dg, dd, pn, e):
    """The reference's error of the block under one normal code c, from the tables."""
    cb = c * 80 + 16
    for i in range(8):
        dd[i] = dg[cb + 8 * i] * pn
    _v8_chain(xa, xn, 0, tg, cb, dd, e, 0)
    _v8_chain(xa, xn, 8, tg, cb, dd, e, 8)
    return _tree_sum16(e)


@njit(inline="always", nogil=True, cache=True, error_model="numpy")
def _nv_err1(xa, pn, sc, e):
    """The reference's error of one block (magnitudes xa) with divisor sc."""
    for j in range(16):
        a = xa[j]
        d = a * pn - _round_bf16(_fp4_mag(a / sc) * sc) * pn
        e[j] = d * d
    return _tree_sum16(e)


@njit(nogil=True, cache=True, error_model="numpy")
def _nvfp4_row_search(w, r, gs, e4m3_values, tg, dg, tab_ok, packed, scale, codes, xa, xn, dd, hi, e, e1, mode, nj):
    kind = _kind_of(w)
    mask = _abs_mask(kind)
    inf_bits = np.uint32(0x7F80) if kind == 0 else (np.uint32(0x7C00) if kind == 1 else np.uint32(0x7F800000))
    for g in range(w.shape[1] // 16):
        base = g * 16
        m = _group_amax_bits(w, r, base, 16, mask)
        amax = _decode(m, kind)
        c6 = _nv_code(amax, _F32_SIX, gs, kind)
        c4 = _nv_code(amax, _F32_FOUR, gs, kind)
        best_rtn = c6 if e4m3_values[c6] != np.float32(0.0) else np.int64(0x20)
        c4 = np.int64(0x20) if (c4 & 0x7F) == 0 else c4
        pn = _err_norm(amax)
        for j in range(nj):
            a = abs(_decode(w[r, base + j], kind))
            xa[j] = a
            xn[j] = a * pn
        best = best_rtn
        if mode == 1 and tab_ok and m < inf_bits and c6 >= 8:  # 4over6: two candidates
            if c4 != c6 and c4 <= 0x7E:
                be = _nv_block_err1(xa, xn, c6, tg, dg, dd, pn, e)
                if _nv_block_err1(xa, xn, c4, tg, dg, dd, pn, e) < be:
                    best = c4
        elif tab_ok and m < inf_bits and c6 >= 8 and c4 - c6 <= 7:
            _nv_block_err8(xa, xn, c6, tg, dg, dd, pn, hi, e, nj)
            be = e[0]
            for k in range(1, 8):  # candidate order; c6 + 7 only as c4
                c = c6 + k
                if mode == 2:
                    lane = c <= 0x7E and (k < 7 or c4 == c)
                else:
                    lane = c == c4 and c <= 0x7E
                better = lane and e[k] < be
                best = c if better else best
                be = e[k] if better else be
        else:
            be = _nv_err1(xa, pn, e4m3_values[best_rtn] / gs, e1)
            if mode == 2:  # the six E4M3 codes above the RTN one
                for k in range(1, 7):
                    c = c6 + k
                    if c >= 1 and c <= 0x7E:
                        ek = _nv_err1(xa, pn, e4m3_values[c] / gs, e1)
                        if ek < be:
                            best = c
                            be = ek
            # four over six, where not tried yet (a repeat cannot win)
            tried = c4 == best_rtn or (mode == 2 and c6 + 1 <= c4 and c4 <= c6 + 6)
            if not tried and c4 >= 1 and c4 <= 0x7E:
                if _nv_err1(xa, pn, e4m3_values[c4] / gs, e1) < be:
                    best = c4
        scale[r, g] = np.uint8(best)
        s = e4m3_values[best] / gs
        for j in range(nj):
            codes[base + j] = _fp4(_decode(w[r, base + j], kind) / s)
    _pack_row(codes, packed, r)


@njit(inline="always", nogil=True, cache=True)
def _pow2(k):
    """2.0**k as float32 for -127 <= k <= 127 (exact, 2**-127 subnormal)."""
    if k >= -126:
        return _bits_f32(np.uint32(k + 127) << np.uint32(23))
    return _bits_f32(np.uint32(0x00400000))


@njit(inline="always", nogil=True, cache=True, error_model="numpy")
def _mx_tree32(e):
    """The reference's pairwise sum over halves of e[0:32] (clobbers e)."""
    h = 16
    while h >= 1:
        for j in range(h):
            e[j] = e[j] + e[j + h]
        h //= 2
    return e[0]


@njit(nogil=True, cache=True, error_model="numpy")
def _mxfp4_row_search(w, r, packed, scale, codes, xa, xn, e0, e1, e2, nj):
    """MXFP4 search, one block at a time: the three candidates (RTN byte b0, b0 - 1,
    b0 + 1) in one pass over the block's values, whose loops (``nj`` = 32, a run-time
    count) numba's loop vectorizer handles."""
    kind = _kind_of(w)
    mask = _abs_mask(kind)
    if kind == 0:
        add, keep, mshift, bias, emax = 0x20, 0xFF80, 7, 127, 0xFF
    elif kind == 1:
        add, keep, mshift, bias, emax = 0x100, 0xFC00, 10, 15, 0x1F
    else:
        add, keep, mshift, bias, emax = 0x200000, 0xFF800000, 23, 127, 0xFF
    for g in range(w.shape[1] // 32):
        base = g * 32
        m = _group_amax_bits(w, r, base, 32, mask)
        p2 = (np.int64(m) + add) & keep
        ef = p2 >> mshift
        if ef == emax:  # RTN overflow block (see _mxfp4_row): kept as RTN
            scale[r, g] = np.uint8(127)
            for j in range(nj):
                codes[base + j] = np.uint8(0)
            continue
        if p2 == 0:
            b0 = np.int64(0)
        else:
            b0 = max(np.int64(127 + (ef - bias) - 2), np.int64(0))
        if kind == 1 and b0 < 127 - 24:
            b0 = np.int64(127)
        pn = _err_norm(_decode(m, kind))
        bm = max(b0 - 1, np.int64(0))  # clipped: out-of-range candidates are not chosen
        bp = min(b0 + 1, np.int64(254))
        inv0, sc0 = _pow2(127 - b0), _pow2(b0 - 127)
        invm, scm = _pow2(127 - bm), _pow2(bm - 127)
        invp, scp = _pow2(127 - bp), _pow2(bp - 127)
        for j in range(nj):
            a = abs(_decode(w[r, base + j], kind))
            xa[j] = a
            xn[j] = a * pn
        for j in range(nj):
            # codes of dtype(|x| * 2**(127 - b)), decoded as bf16(fp4 * bf16(2**(b - 127)))
            a = xa[j]
            an = xn[j]
            d0 = an - _round_bf16(_fp4_mag(_round_to(a * inv0, kind)) * sc0) * pn
            dm = an - _round_bf16(_fp4_mag(_round_to(a * invm, kind)) * scm) * pn
            dp = an - _round_bf16(_fp4_mag(_round_to(a * invp, kind)) * scp) * pn
            e0[j] = d0 * d0
            e1[j] = dm * dm
            e2[j] = dp * dp
        best = b0
        be = _mx_tree32(e0)
        em = _mx_tree32(e1)
        if b0 >= 1 and em < be:
            best = b0 - 1
            be = em
        ep = _mx_tree32(e2)
        if b0 <= 253 and ep < be:
            best = b0 + 1
        scale[r, g] = np.uint8(best)
        s = _pow2(127 - best)
        for j in range(nj):
            codes[base + j] = _fp4(_round_to(_decode(w[r, base + j], kind) * s, kind))
    _pack_row(codes, packed, r)


# ------------------------------------------------------------ whole-matrix kernels


@njit(nogil=True, cache=True)
def _nvfp4_serial(w, gs, e4m3_values, packed, scale):
    codes = np.empty(w.shape[1], dtype=np.uint8)
    for r in range(w.shape[0]):
        _nvfp4_row(w, r, gs, e4m3_values, packed, scale, codes)


@njit(nogil=True, cache=True, parallel=True)
def _nvfp4_parallel(w, gs, e4m3_values, packed, scale, nchunks):
    rows = w.shape[0]
    nchunks = max(min(rows, nchunks), 1)
    for c in prange(nchunks):
        codes = np.empty(w.shape[1], dtype=np.uint8)
        for r in range(c * rows // nchunks, (c + 1) * rows // nchunks):
            _nvfp4_row(w, r, gs, e4m3_values, packed, scale, codes)


@njit(nogil=True, cache=True)
def _mxfp4_serial(w, packed, scale):
    codes = np.empty(w.shape[1], dtype=np.uint8)
    for r in range(w.shape[0]):
        _mxfp4_row(w, r, packed, scale, codes)


@njit(nogil=True, cache=True, parallel=True)
def _mxfp4_parallel(w, packed, scale, nchunks):
    rows = w.shape[0]
    nchunks = max(min(rows, nchunks), 1)
    for c in prange(nchunks):
        codes = np.empty(w.shape[1], dtype=np.uint8)
        for r in range(c * rows // nchunks, (c + 1) * rows // nchunks):
            _mxfp4_row(w, r, packed, scale, codes)


# The search kernels are separate entry points, compiled only when a search is used.


@njit(nogil=True, cache=True)
def _nvfp4_search_rows(w, gs, e4m3_values, tg, dg, tab_ok, packed, scale, r0, r1, mode, nj):
    codes = np.empty(w.shape[1], dtype=np.uint8)
    xa = np.empty(16, dtype=np.float32)
    xn = np.empty(16, dtype=np.float32)
    dd = np.empty(80, dtype=np.float32)
    hi = np.empty(16, dtype=np.int64)
    e = np.empty(128, dtype=np.float32)
    e1 = np.empty(16, dtype=np.float32)
    for r in range(r0, r1):
        _nvfp4_row_search(w, r, gs, e4m3_values, tg, dg, tab_ok, packed, scale, codes, xa, xn, dd, hi, e, e1, mode, nj)


@njit(nogil=True, cache=True)
def _nvfp4_search_serial(w, gs, e4m3_values, packed, scale, mode, nj):
    tg = np.empty(128 * 80, dtype=np.float32)
    dg = np.empty(128 * 80, dtype=np.float32)
    tab_ok = _nv_tables(gs, e4m3_values, _NV_TAU, _NV_MAG, tg, dg)
    _nvfp4_search_rows(w, gs, e4m3_values, tg, dg, tab_ok, packed, scale, 0, w.shape[0], mode, nj)


@njit(nogil=True, cache=True, parallel=True)
def _nvfp4_search_parallel(w, gs, e4m3_values, packed, scale, nchunks, mode, nj):
    tg = np.empty(128 * 80, dtype=np.float32)
    dg = np.empty(128 * 80, dtype=np.float32)
    tab_ok = _nv_tables(gs, e4m3_values, _NV_TAU, _NV_MAG, tg, dg)
    rows = w.shape[0]
    nchunks = max(min(rows, nchunks), 1)
    for c in prange(nchunks):
        _nvfp4_search_rows(w, gs, e4m3_values, tg, dg, tab_ok, packed, scale, c * rows // nchunks,
                           (c + 1) * rows // nchunks, mode, nj)


@njit(nogil=True, cache=True)
def _mxfp4_search_rows(w, packed, scale, r0, r1, nj):
    codes = np.empty(w.shape[1], dtype=np.uint8)
    xa = np.empty(32, dtype=np.float32)
    xn = np.empty(32, dtype=np.float32)
    e0 = np.empty(32, dtype=np.float32)
    e1 = np.empty(32, dtype=np.float32)
    e2 = np.empty(32, dtype=np.float32)
    for r in range(r0, r1):
        _mxfp4_row_search(w, r, packed, scale, codes, xa, xn, e0, e1, e2, nj)


@njit(nogil=True, cache=True)
def _mxfp4_search_serial(w, packed, scale, nj):
    _mxfp4_search_rows(w, packed, scale, 0, w.shape[0], nj)


@njit(nogil=True, cache=True, parallel=True)
def _mxfp4_search_parallel(w, packed, scale, nchunks, nj):
    rows = w.shape[0]
    nchunks = max(min(rows, nchunks), 1)
    for c in prange(nchunks):
        _mxfp4_search_rows(w, packed, scale, c * rows // nchunks, (c + 1) * rows // nchunks, nj)


@njit(nogil=True, cache=True)
def _absmax_bits(flat, mask):
    m = flat.dtype.type(0)
    for i in range(flat.shape[0]):
        m = max(m, flat[i] & mask)
    return m


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


def absmax(w: np.ndarray) -> float:
    """max |w| as a python float (NaN if w holds a NaN), over any shape."""
    w = np.asarray(w)
    if w.dtype not in _KINDS:
        raise TypeError(f"unsupported dtype {w.dtype}; expected bfloat16, float16, float32")
    if w.size == 0:
        return 0.0
    utype = np.uint32 if w.dtype == F32 else np.uint16
    flat = np.ascontiguousarray(w).reshape(-1).view(utype)
    mask = utype(0x7FFFFFFF if w.dtype == F32 else 0x7FFF)
    m = _absmax_bits(flat, mask)
    return float(np.array([m], dtype=utype).view(w.dtype)[0].astype(np.float32))


def _mode(scheme: str, search: str) -> int:
    _reference.check_search(scheme, search)
    return (_NV_MODES if scheme == "nvfp4" else _MX_MODES)[search]


def quantize_nvfp4_into(w, global_scale, packed_out, scale_out, search="none", *, parallel=False):
    """NVFP4 of ``w`` into preallocated ``packed_out`` [rows, cols/2] and
    ``scale_out`` [rows, cols/16] (uint8, E4M3 bits)."""
    mode = _mode("nvfp4", search)
    bits = _bits(w, NVFP4_GROUP)
    rows, cols = bits.shape
    _check_out(packed_out, (rows, cols // 2), "packed_out")
    _check_out(scale_out, (rows, cols // NVFP4_GROUP), "scale_out")
    gs = np.float32(global_scale)
    if mode and parallel:
        _nvfp4_search_parallel(bits, gs, _E4M3_VALUES, packed_out, scale_out, _nchunks(), mode, NVFP4_GROUP)
    elif mode:
        _nvfp4_search_serial(bits, gs, _E4M3_VALUES, packed_out, scale_out, mode, NVFP4_GROUP)
    elif parallel:
        _nvfp4_parallel(bits, gs, _E4M3_VALUES, packed_out, scale_out, _nchunks())
    else:
        _nvfp4_serial(bits, gs, _E4M3_VALUES, packed_out, scale_out)


def quantize_nvfp4(w, global_scale, search="none", *, parallel=False):
    """Same as :func:`qstream.schemes.reference.quantize_nvfp4`:
    ``(packed uint8 [rows, cols/2], scale uint8 [rows, cols/16] E4M3 bits)``.
    ``search``: "none" (compressed-tensors' rounding), "4over6" or "mse"."""
    rows, cols = _bits(w, NVFP4_GROUP).shape
    packed = np.empty((rows, cols // 2), dtype=np.uint8)
    scale = np.empty((rows, cols // NVFP4_GROUP), dtype=np.uint8)
    quantize_nvfp4_into(w, global_scale, packed, scale, search, parallel=parallel)
    return packed, scale


def quantize_mxfp4_into(w, packed_out, scale_out, search="none", *, parallel=False):
    """MXFP4 of ``w`` into preallocated ``packed_out`` [rows, cols/2] and
    ``scale_out`` [rows, cols/32] (uint8, biased E8M0)."""
    mode = _mode("mxfp4", search)
    bits = _bits(w, MXFP4_GROUP)
    rows, cols = bits.shape
    _check_out(packed_out, (rows, cols // 2), "packed_out")
    _check_out(scale_out, (rows, cols // MXFP4_GROUP), "scale_out")
    if mode and parallel:
        _mxfp4_search_parallel(bits, packed_out, scale_out, _nchunks(), MXFP4_GROUP)
    elif mode:
        _mxfp4_search_serial(bits, packed_out, scale_out, MXFP4_GROUP)
    elif parallel:
        _mxfp4_parallel(bits, packed_out, scale_out, _nchunks())
    else:
        _mxfp4_serial(bits, packed_out, scale_out)


def quantize_mxfp4(w, search="none", *, parallel=False):
    """Same as :func:`qstream.schemes.reference.quantize_mxfp4`:
    ``(packed uint8 [rows, cols/2], scale uint8 [rows, cols/32] biased E8M0)``.
    ``search``: "none" (compressed-tensors' rounding) or "mse"."""
    rows, cols = _bits(w, MXFP4_GROUP).shape
    packed = np.empty((rows, cols // 2), dtype=np.uint8)
    scale = np.empty((rows, cols // MXFP4_GROUP), dtype=np.uint8)
    quantize_mxfp4_into(w, packed, scale, search, parallel=parallel)
    return packed, scale


def e4m3_encode(x) -> np.ndarray:
    """float32 -> float8_e4m3fn bits with the kernels' encoder (torch's cast)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty(x.shape, dtype=np.uint8)
    _e4m3_array(x.reshape(-1), out.reshape(-1))
    return out


def warmup(search: bool = True, parallel: bool = True) -> float:
    """Compile (or load from the cache) every specialization; returns seconds.

    ``search=False`` leaves out the scale-search kernels, ``parallel=False`` the
    ``parallel=True`` variants (each is compiled on first use otherwise)."""
    t0 = time.perf_counter()
    for dt in (BF16, F16, F32):  # uint16 / int16 / uint32 bit views
        w = np.zeros((2, 32), dtype=dt)
        for par in (False, True) if parallel else (False,):
            for mode in ("none", "mse") if search else ("none",):  # one kernel per search
                quantize_nvfp4(w, np.float32(1.0), mode, parallel=par)
                quantize_mxfp4(w, mode, parallel=par)
        absmax(w)
    e4m3_encode(np.zeros(1, dtype=np.float32))
    return time.perf_counter() - t0
