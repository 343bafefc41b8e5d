"""Fused numba kernels for NVFP4 (16-value groups, E4M3 scales under a float32 global scale):
round to nearest (compressed-tensors' rounding) and the "4over6" / "mse" scale searches, byte
for byte like :mod:`qstream.schemes.reference`. Shared pieces are in :mod:`kernels_common`;
the conventions in :mod:`qstream.schemes.kernels`.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from . import reference as _reference
from .kernels_vec import _amax16x16, _amax_bits16, _emit_div16, _nv_codes16, _nv_err8
from .kernels_common import (
    _bits,
    _bits_f32,
    _check_out,
    _decode,
    _e4m3,
    _E4M3_VALUES,
    _err_norm,
    _f32_bits,
    _F32_E4M3_MAX,
    _F32_FOUR,
    _F32_SIX,
    _F32_ZERO_SCALE,
    _fp4,
    _fp4_mag,
    _kind_of,
    _nchunks,
    NVFP4_GROUP,
    _round_bf16,
    _round_to,
)


# scale-search modes -> kernel mode numbers (the candidates are in the reference's
# "scale search" section)
_NV_MODES = {"none": 0, "4over6": 1, "mse": 2}
assert tuple(_NV_MODES) == _reference.SEARCH_MODES["nvfp4"]


def _mode(search: str) -> int:
    _reference.check_search("nvfp4", search)
    return _NV_MODES[search]


@njit(inline="always", nogil=True, cache=True)
def _nv_emit(w, r, base, sc, kind, packed, codes):
    """The FP4 codes of one group, x / sc (float32 division, no dtype rounding), packed
    into the row's 8 bytes: the vector step for bf16 / f32, scalar code for fp16."""
    if kind == 1:
        for j in range(16):
            codes[j] = _fp4(_decode(w[r, base + j], kind) / sc)
        for j in range(8):
            packed[r, base // 2 + j] = codes[2 * j] | (codes[2 * j + 1] << np.uint8(4))
    else:
        _emit_div16(w[r], base, sc, packed[r], base // 2)


@njit(nogil=True, cache=True)
def _nvfp4_row(w, r, gs, e4m3_values, packed, scale, codes, am, cd, scs):
    kind = _kind_of(w)
    row = w[r]
    ng = w.shape[1] // 16
    g0 = 0
    if kind != 1:  # bf16 / f32: 16 groups' scales at a time, as vectors (kernels_vec)
        prow = packed[r]
        while g0 + 16 <= ng:
            _amax16x16(row, g0 * 16, am)
            _nv_codes16(row, am, _F32_SIX, gs, e4m3_values, cd, scs)
            for i in range(16):
                c = cd[i]
                scale[r, g0 + i] = np.uint8(0x20) if e4m3_values[c] == np.float32(0.0) else np.uint8(c)
                _emit_div16(row, (g0 + i) * 16, scs[i], prow, (g0 + i) * 8)
            g0 += 16
    for g in range(g0, ng):
        base = g * 16
        amax = _decode(_amax_bits16(row, base), kind)
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
        _nv_emit(w, r, base, sv / gs, kind, packed, codes)  # float32(scale / global_scale)


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
# For bf16 / f32 blocks in "mse" mode the whole step runs in registers (kernels_vec's
# ``_nv_err8``, from the raw row bits); fp16 blocks and "4over6" go through the arrays
# below (``_nv_block_err8`` / ``_nv_block_err1``) with the same arithmetic.
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


@njit(inline="always", nogil=True, cache=True)
def _nv_pick8(e, c6, c4, mode):
    """The code chosen from the 8 lanes' errors e[0:8] (codes c6 + k), scanned in the
    reference's candidate order with its strict "<": "mse" lanes 1 .. 6 and c4, "4over6"
    c4 only; lanes past 0x7E never."""
    best = c6
    be = e[0]
    for k in range(1, 8):
        c = c6 + k
        if mode == 2:
            lane = c <= 0x7E and (k < 7 or c4 == c)
        else:
            lane = c == c4 and c <= 0x7E
        better = lane and e[k] < be
        best = c if better else best
        be = e[k] if better else be
    return best


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
def _nvfp4_groups_search(w, r, g0, g1, gs, e4m3_values, tg, dg, tab_ok, packed, scale, codes, xa, xn, dd, hi, e, e1,
                         mode, nj):
    """The search of groups g0 .. g1 - 1 of row r, every mode and dtype, one group at a time."""
    kind = _kind_of(w)
    inf_bits = np.uint32(0x7F80) if kind == 0 else (np.uint32(0x7C00) if kind == 1 else np.uint32(0x7F800000))
    row = w[r]
    for g in range(g0, g1):
        base = g * 16
        m = _amax_bits16(row, base)
        amax = _decode(m, kind)
        c6 = _nv_code(amax, _F32_SIX, gs, kind)
        c4 = _nv_code(amax, _F32_FOUR, gs, kind)
        best_rtn = c6 if e4m3_values[c6] != np.float32(0.0) else np.int64(0x20)
        c4 = np.int64(0x20) if (c4 & 0x7F) == 0 else c4
        pn = _err_norm(amax)
        best = best_rtn
        fast = tab_ok and m < inf_bits and c6 >= 8
        for j in range(nj):
            a = abs(_decode(w[r, base + j], kind))
            xa[j] = a
            xn[j] = a * pn
        if mode == 1 and fast:  # 4over6: two candidates
            if c4 != c6 and c4 <= 0x7E:
                be = _nv_block_err1(xa, xn, c6, tg, dg, dd, pn, e)
                if _nv_block_err1(xa, xn, c4, tg, dg, dd, pn, e) < be:
                    best = c4
        elif fast and c4 - c6 <= 7:
            _nv_block_err8(xa, xn, c6, tg, dg, dd, pn, hi, e, nj)
            best = _nv_pick8(e, c6, c4, mode)
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
        _nv_emit(w, r, base, e4m3_values[best] / gs, kind, packed, codes)


@njit(nogil=True, cache=True, error_model="numpy")
def _nvfp4_row_mse(w, r, gs, e4m3_values, tg, dg, tab_ok, packed, scale, codes, xa, xn, dd, hi, e, e1, mode, nj,
                   am, c6s, c4s, scs):
    """"mse" over a bf16 / f32 row: 16 groups' codes at a time, each group's 8 candidate
    errors in registers; other groups (not in the tables' case, or past the last 16) go
    through _nvfp4_groups_search."""
    kind = _kind_of(w)
    row = w[r]
    ng = w.shape[1] // 16
    g0 = 0
    if kind != 1:
        inf_bits = np.uint32(0x7F80) if kind == 0 else np.uint32(0x7F800000)
        prow = packed[r]
        while g0 + 16 <= ng:
            _amax16x16(row, g0 * 16, am)
            _nv_codes16(row, am, _F32_SIX, gs, e4m3_values, c6s, scs)
            _nv_codes16(row, am, _F32_FOUR, gs, e4m3_values, c4s, scs)
            for i in range(16):
                g = g0 + i
                m = am[i]
                c6 = np.int64(c6s[i])
                c4 = np.int64(c4s[i])
                c4 = np.int64(0x20) if (c4 & 0x7F) == 0 else c4
                if not (tab_ok and m < inf_bits and c6 >= 8 and c4 - c6 <= 7):
                    _nvfp4_groups_search(w, r, g, g + 1, gs, e4m3_values, tg, dg, tab_ok, packed, scale, codes, xa, xn,
                                         dd, hi, e, e1, mode, nj)
                    continue
                pn = _err_norm(_decode(m, kind))
                _nv_err8(row, g * 16, pn, tg, c6 * 80, dg, e)
                best = _nv_pick8(e, c6, c4, 2)  # this function runs "mse" only
                scale[r, g] = np.uint8(best)
                _emit_div16(row, g * 16, e4m3_values[best] / gs, prow, g * 8)
            g0 += 16
    if g0 < ng:
        _nvfp4_groups_search(w, r, g0, ng, gs, e4m3_values, tg, dg, tab_ok, packed, scale, codes, xa, xn, dd, hi, e, e1,
                             mode, nj)


# ------------------------------------------------------------ whole-matrix kernels


@njit(inline="always", nogil=True, cache=True)
def _scratch16():
    """Per-thread scratch of kernels_vec's 16-group steps: amax bits, two code rows, divisors."""
    return (np.empty(16, dtype=np.uint32), np.empty(16, dtype=np.int32), np.empty(16, dtype=np.int32),
            np.empty(16, dtype=np.float32))


@njit(nogil=True, cache=True)
def _nvfp4_serial(w, gs, e4m3_values, packed, scale):
    codes = np.empty(w.shape[1], dtype=np.uint8)
    am, cd, _, scs = _scratch16()
    for r in range(w.shape[0]):
        _nvfp4_row(w, r, gs, e4m3_values, packed, scale, codes, am, cd, scs)


@njit(nogil=True, cache=True, parallel=True)
def _nvfp4_parallel(w, gs, e4m3_values, packed, scale, nchunks):
    rows = w.shape[0]
    nchunks = max(min(rows, nchunks), 1)
    for c in prange(nchunks):
        codes = np.empty(w.shape[1], dtype=np.uint8)
        am, cd, _, scs = _scratch16()
        for r in range(c * rows // nchunks, (c + 1) * rows // nchunks):
            _nvfp4_row(w, r, gs, e4m3_values, packed, scale, codes, am, cd, scs)


@njit(nogil=True, cache=True)
def _nvfp4_search_rows(w, gs, e4m3_values, tg, dg, tab_ok, packed, scale, r0, r1, mode, nj):
    codes = np.empty(w.shape[1], dtype=np.uint8)
    xa = np.empty(16, dtype=np.float32)
    xn = np.empty(16, dtype=np.float32)
    dd = np.empty(80, dtype=np.float32)
    hi = np.empty(16, dtype=np.int64)
    e = np.empty(128, dtype=np.float32)
    e1 = np.empty(16, dtype=np.float32)
    am, c6s, c4s, scs = _scratch16()
    for r in range(r0, r1):
        if _kind_of(w) != 1 and mode == 2:
            _nvfp4_row_mse(w, r, gs, e4m3_values, tg, dg, tab_ok, packed, scale, codes, xa, xn, dd, hi, e, e1, mode, nj,
                           am, c6s, c4s, scs)
        else:
            _nvfp4_groups_search(w, r, 0, w.shape[1] // 16, gs, e4m3_values, tg, dg, tab_ok, packed, scale, codes, xa,
                                 xn, dd, hi, e, e1, mode, nj)


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


# ------------------------------------------------------------------ python API


def quantize_nvfp4_into(w, global_scale, packed_out, scale_out, search="none", *, parallel=False):
    """NVFP4 of ``w`` into preallocated ``packed_out`` [rows, cols/2] and
    ``scale_out`` [rows, cols/16] (uint8, E4M3 bits)."""
    mode = _mode(search)
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
