"""Fused numba kernels for MXFP4 (32-value groups, power-of-two E8M0 scales): round to nearest
(compressed-tensors' rounding) and the "mse" scale search, byte for byte like
:mod:`qstream.schemes.reference`. Shared pieces are in :mod:`kernels_common`; the conventions
in :mod:`qstream.schemes.kernels`.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from . import reference as _reference
from .kernels_vec import _amax_bits32, _emit_mul32, _mx_err2
from .kernels_common import (
    _bits,
    _bits_f32,
    _check_out,
    _decode,
    _err_norm,
    _fp4,
    _fp4_mag,
    _kind_of,
    MXFP4_GROUP,
    _nchunks,
    _round_bf16,
    _round_to,
)


_MX_MODES = {"none": 0, "mse": 2}
assert tuple(_MX_MODES) == _reference.SEARCH_MODES["mxfp4"]


def _mode(search: str) -> int:
    _reference.check_search("mxfp4", search)
    return _MX_MODES[search]


@njit(nogil=True, cache=True)
def _pow2_consts(kind):
    """round_to_power_2 constants of a dtype kind (0 bf16, 1 f16, 2 f32): 1 << (mantissa - 2),
    sign+exponent mask, mantissa bits, exponent bias, all-ones exponent."""
    if kind == 0:
        return 0x20, 0xFF80, 7, 127, 0xFF
    if kind == 1:
        return 0x100, 0xFC00, 10, 15, 0x1F
    return 0x200000, 0xFF800000, 23, 127, 0xFF


@njit(inline="always", nogil=True, cache=True)
def _mx_rtn_byte(m, kind):
    """compressed-tensors' E8M0 byte of a group with amax bits m (127 for the overflow
    block, whose amax rounds up to inf), and whether that is the overflow block."""
    add, keep, mshift, bias, emax = _pow2_consts(kind)
    p2 = (np.int64(m) + add) & keep
    ef = p2 >> mshift
    if ef == emax:
        # amax rounds up to inf: scale inf, every q = +-0 -> code 0, and the
        # written exponent is (127 + INT32_MIN) & 0xFF == 127 (see reference)
        return np.int64(127), True
    if p2 == 0:
        e = np.int64(0)  # log2(0) = -inf, clamped to 0
    else:
        e = max(np.int64(127 + (ef - bias) - 2), np.int64(0))
    if kind == 1 and e < 127 - 24:
        e = np.int64(127)  # 2**(e-127) underflows fp16 -> eps 1.0 == 2**0
    return e, False


@njit(inline="always", nogil=True, cache=True)
def _mx_block_codes(w, r, base, e, over, kind, packed, codes):
    """The codes of one group under the E8M0 byte e (all 0 for the overflow block), with
    the dtype rounding of x * 2**(127 - e), packed into the row's 16 bytes."""
    inv = _bits_f32(np.uint32(254 - e) << np.uint32(23))  # 2**(127 - e), exact
    for j in range(32):
        # x / 2**(e-127) == x * 2**(127-e) exactly; then rounded to the dtype
        q = _round_to(_decode(w[r, base + j], kind) * inv, kind)
        codes[j] = np.uint8(0) if over else _fp4(q)
    for j in range(16):
        packed[r, base // 2 + j] = codes[2 * j] | (codes[2 * j + 1] << np.uint8(4))


@njit(nogil=True, cache=True)
def _mxfp4_row(w, r, packed, scale, codes):
    """One row, round to nearest. f32 groups, and bf16 groups whose scaling is exact (byte
    <= 127: x * 2**(127 - e) scales up, so its bf16 rounding is the identity), take the
    vector steps; fp16 rows and the other groups the scalar code (where a bf16 rounding can
    turn a tiny negative product into -0.0, code 0 instead of 8)."""
    kind = _kind_of(w)
    row = w[r]
    prow = packed[r]
    for g in range(w.shape[1] // 32):
        base = g * 32
        m = _amax_bits32(row, base)
        e, over = _mx_rtn_byte(m, kind)
        scale[r, g] = np.uint8(e)
        if not over and (kind == 2 or (kind == 0 and e <= 127)):
            _emit_mul32(row, base, _bits_f32(np.uint32(254 - e) << np.uint32(23)), prow, base // 2)
        else:
            _mx_block_codes(w, r, base, e, over, kind, packed, codes)


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
    b0 + 1), byte for byte like the reference.

    bf16 / f32 blocks are evaluated by the vector steps (``_mx_err2``: the same errors
    without the dtype roundings, which cannot change them) for b0 and b0 - 1 only: b0 + 1
    never wins there. Its decoded grid, in units of b0's scale, is {0, 1, 2, 3, 4, 6, 8,
    12}, b0's own grid {0, .5, 1, 1.5, 2, 3, 4, 6} plus 8 and 12, and the block's
    magnitudes are below 7 in those units (amax < 1.75 * 2**E when the RTN exponent
    rounds down to E, < 4 when it rounds up), where 8 and 12 are never nearer than 6.
    Nearest rounding onto a subset is never closer, both decodes are exact, and
    float32 subtraction, squaring and the pairwise sum are monotone, so b0 + 1's error is
    >= b0's and the strict "<" keeps b0. They are emitted by the vector steps where that
    is exact (as in ``_mxfp4_row``). fp16 rows (whose fp16 roundings of x * 2**(127 - b)
    the argument does not cover) take a scalar pass over the block's values with all
    three candidates (``nj`` = 32, a run-time count numba's loop vectorizer handles)."""
    kind = _kind_of(w)
    row = w[r]
    prow = packed[r]
    for g in range(w.shape[1] // 32):
        base = g * 32
        m = _amax_bits32(row, base)
        b0, over = _mx_rtn_byte(m, kind)
        if over:  # RTN overflow block (see _mx_rtn_byte): kept as RTN
            scale[r, g] = np.uint8(127)
            _mx_block_codes(w, r, base, b0, over, kind, packed, codes)
            continue
        pn = _err_norm(_decode(m, kind))
        bm = max(b0 - 1, np.int64(0))  # clipped: out-of-range candidates are not chosen
        bp = min(b0 + 1, np.int64(254))
        inv0, sc0 = _pow2(127 - b0), _pow2(b0 - 127)
        invm, scm = _pow2(127 - bm), _pow2(bm - 127)
        invp, scp = _pow2(127 - bp), _pow2(bp - 127)
        if kind != 1:
            be, em = _mx_err2(row, base, pn, inv0, sc0, invm, scm)
            ep = be  # b0 + 1 cannot win (see above)
        else:
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
            be = _mx_tree32(e0)
            em = _mx_tree32(e1)
            ep = _mx_tree32(e2)
        best = b0
        if b0 >= 1 and em < be:
            best = b0 - 1
            be = em
        if b0 <= 253 and ep < be:
            best = b0 + 1
        scale[r, g] = np.uint8(best)
        if kind == 2 or (kind == 0 and best <= 127):
            _emit_mul32(row, base, _pow2(127 - best), prow, base // 2)
        else:
            _mx_block_codes(w, r, base, best, False, kind, packed, codes)


# ------------------------------------------------------------ whole-matrix kernels


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


# ------------------------------------------------------------------ python API


def quantize_mxfp4_into(w, packed_out, scale_out, search="none", *, parallel=False):
    """MXFP4 of ``w`` into preallocated ``packed_out`` [rows, cols/2] and
    ``scale_out`` [rows, cols/32] (uint8, biased E8M0)."""
    mode = _mode(search)
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
