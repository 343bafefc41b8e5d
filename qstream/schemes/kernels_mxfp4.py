"""Fused numba kernels for MXFP4 (32-value groups, power-of-two E8M0 scales): round to nearest
(compressed-tensors' rounding) and the "mse" scale search, byte for byte like
:mod:`qstream.schemes.reference`. Shared pieces are in :mod:`kernels_common`; the conventions
in :mod:`qstream.schemes.kernels`.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from . import reference as _reference
from .kernels_common import (
    _abs_mask,
    _bits,
    _bits_f32,
    _check_out,
    _decode,
    _err_norm,
    _fp4,
    _fp4_mag,
    _group_amax_bits,
    _kind_of,
    MXFP4_GROUP,
    _nchunks,
    _pack_row,
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


@njit(nogil=True, cache=True)
def _mxfp4_row(w, r, packed, scale, codes):
    kind = _kind_of(w)
    mask = _abs_mask(kind)
    add, keep, mshift, bias, emax = _pow2_consts(kind)
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
    add, keep, mshift, bias, emax = _pow2_consts(kind)
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
