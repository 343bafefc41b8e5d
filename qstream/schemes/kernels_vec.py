"""Whole-block vector steps of the FP4 kernels, written as portable LLVM vector IR (llvmlite
intrinsics): numba does not run LLVM's SLP vectorizer, and its loop vectorizer leaves a
group's 16- or 32-iteration loops (amax, codes) scalar or half-vectorized. Each step reads
one group's raw element bits straight from a 1-D row (uint16 bf16 or uint32 f32 bits: the
kind is the array's integer type, as in :mod:`kernels_common`) and keeps the block in
registers: AVX2 / AVX-512 on x86, NEON on ARM. IEEE semantics, no fast-math: every float
operation is the scalar code's, in the same order, so the results are the same bits.

Editing this module: numba's on-disk cache (``cache=True``) keys each kernel on its own
file's modification time only, so a kernel of ``kernels_nvfp4`` / ``kernels_mxfp4`` keeps
its old compiled copy of a step changed here. Delete ``qstream/schemes/__pycache__/*.nb[ic]``
before testing a change (an install or upgrade rewrites every file, so users never see it).

* :func:`_amax_bits16` / :func:`_amax_bits32`: a group's largest magnitude bits (for
  fp16 rows too: the magnitude bits order fp16 values as well), and
  :func:`_amax16x16`: those of 16 NVFP4 groups at once;
* :func:`_emit_mul32`: the FP4 codes of ``x * s`` for the 32 values of an MXFP4 group,
  packed two per byte into the output row (``_fp4``, even index in the low nibble), with no dtype
  rounding of the product (the caller's job: exact for f32, and for bf16 when ``s >= 1``);
* :func:`_emit_div16`: the same for ``x / sc`` over an NVFP4 group (float32 division, as
  compressed-tensors and the scalar kernel do);
* :func:`_mx_err2`: the squared errors of an MXFP4 group under two power-of-two scales
  (the "mse" search's candidates that can win), summed pairwise over halves like the
  reference;
* :func:`_nv_codes16`: 16 NVFP4 groups' E4M3 scale codes (``_e4m3`` of the clamped
  ``gs * dtype(amax / div)``) and round-to-nearest divisors;
* :func:`_err_sums16` / :func:`_err_sums32`: the card's error measure of one written group
  (:mod:`qstream.schemes.measure`);
* :func:`_nv_err8`: the errors of an NVFP4 group under the "mse" search's 8 candidate
  scale codes, from the per-global-scale threshold / decode tables of ``kernels_nvfp4``.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic

_I32 = ir.IntType(32)
_I64 = ir.IntType(64)
_F32 = ir.FloatType()


def _vec(t, n):
    return ir.VectorType(t, n)


def _splat(builder, x, n):
    v = builder.insert_element(ir.Constant(_vec(x.type, n), ir.Undefined), x, ir.Constant(_I32, 0))
    return builder.shuffle_vector(v, ir.Constant(_vec(x.type, n), ir.Undefined),
                                  ir.Constant(_vec(_I32, n), [0] * n))


def _const(t, n, value):
    return ir.Constant(_vec(t, n), [value] * n)


def _fconst(n, value):
    return _const(_F32, n, float(value))


def _half(builder, v, n, upper):
    """Lanes [0, n/2) or [n/2, n) of an n-lane vector."""
    h = n // 2
    idx = list(range(h, n)) if upper else list(range(h))
    return builder.shuffle_vector(v, ir.Constant(v.type, ir.Undefined), ir.Constant(_vec(_I32, h), idx))


def _load_bits(context, builder, rowty, rowval, off, n):
    """n raw element bits of a 1-D row from element ``off`` (unaligned load)."""
    ary = context.make_array(rowty)(context, builder, rowval)
    ity = ir.IntType(rowty.dtype.bitwidth)
    ptr = builder.bitcast(builder.gep(ary.data, [off]), _vec(ity, n).as_pointer())
    return builder.load(ptr, align=rowty.dtype.bitwidth // 8)


def _as_f32(builder, bits, n, magnitude):
    """Element bits -> float32 values (bf16: shifted; f32: as is), or their magnitudes."""
    bw = bits.type.element.width
    if magnitude:
        bits = builder.and_(bits, _const(bits.type.element, n, (1 << (bw - 1)) - 1))
    if bw == 16:
        bits = builder.shl(builder.zext(bits, _vec(_I32, n)), _const(_I32, n, 16))
    return builder.bitcast(bits, _vec(_F32, n))


def _check_row(row):
    # int16 (fp16) rows type-check too, so that a kernel's fp16 specialization compiles,
    # but only the amax reads them right: the kernels send fp16 groups to scalar code
    return isinstance(row, types.Array) and row.ndim == 1 and row.dtype in (types.uint16, types.int16, types.uint32)


def _amax_tree(builder, bits, n):
    """Largest magnitude bits of an n-lane vector of raw element bits (as an i32)."""
    bw = bits.type.element.width
    v = builder.and_(bits, _const(bits.type.element, n, (1 << (bw - 1)) - 1))
    k = n
    while k > 1:
        lo, hi = _half(builder, v, k, False), _half(builder, v, k, True)
        v = builder.select(builder.icmp_unsigned(">", hi, lo), hi, lo)
        k //= 2
    m = builder.extract_element(v, ir.Constant(_I32, 0))
    return builder.zext(m, _I32) if bw < 32 else m


def _check_arr(a, dtype):
    return isinstance(a, types.Array) and a.ndim == 1 and a.dtype == dtype


def _make_amax(n):
    @intrinsic
    def amax(typingctx, row, off):
        if not _check_row(row):
            return None

        def codegen(context, builder, signature, args):
            rowv, offv = args
            return _amax_tree(builder, _load_bits(context, builder, row, rowv, offv, n), n)

        return types.uint32(row, off), codegen

    return amax


_amax_bits16 = _make_amax(16)
_amax_bits32 = _make_amax(32)

# FP4 E2M1 index thresholds of compressed-tensors' rounding (``_fp4``): strict ">" at the
# even-index ties, ">=" at the odd ones
_FP4_STEPS = ((">", 0.25), (">=", 0.75), (">", 1.25), (">=", 1.75), (">", 2.5), (">=", 3.5), (">", 5.0))


def _fp4_codes(builder, q, n):
    """``_fp4`` of every lane of q: n int8 codes."""
    i8 = ir.IntType(8)
    vi = _vec(_I32, n)
    a = builder.bitcast(builder.and_(builder.bitcast(q, vi), _const(_I32, n, 0x7FFFFFFF)), q.type)  # fabs
    idx = ir.Constant(_vec(i8, n), [0] * n)
    for op, t in _FP4_STEPS:
        idx = builder.add(idx, builder.zext(builder.fcmp_ordered(op, a, _fconst(n, t)), _vec(i8, n)))
    neg = builder.fcmp_ordered("<", q, _fconst(n, 0.0))
    return builder.or_(idx, builder.select(neg, _const(i8, n, 8), _const(i8, n, 0)))


def _store_packed(context, builder, outty, outval, poff, codes, n):
    """Pack n codes two per byte (even index low nibble) into out[poff : poff + n/2]."""
    i8 = ir.IntType(8)
    h = n // 2
    und = ir.Constant(codes.type, ir.Undefined)
    lo = builder.shuffle_vector(codes, und, ir.Constant(_vec(_I32, h), list(range(0, n, 2))))
    hi = builder.shuffle_vector(codes, und, ir.Constant(_vec(_I32, h), list(range(1, n, 2))))
    byte = builder.or_(lo, builder.shl(hi, _const(i8, h, 4)))
    ary = context.make_array(outty)(context, builder, outval)
    ptr = builder.bitcast(builder.gep(ary.data, [poff]), _vec(i8, h).as_pointer())
    builder.store(byte, ptr, align=1)


@intrinsic
def _emit_mul32(typingctx, row, off, s, out, poff):
    """out[poff : poff + 16] = the packed FP4 codes of row[off : off + 32] * s (float32
    products, not rounded to the dtype)."""
    if not (_check_row(row) and _check_arr(out, types.uint8)):
        return None

    def codegen(context, builder, signature, args):
        rowv, offv, sv, outv, poffv = args
        x = _as_f32(builder, _load_bits(context, builder, row, rowv, offv, 32), 32, False)
        codes = _fp4_codes(builder, builder.fmul(x, _splat(builder, sv, 32)), 32)
        _store_packed(context, builder, out, outv, poffv, codes, 32)
        return context.get_dummy_value()

    return types.void(row, off, types.float32, out, poff), codegen


@intrinsic
def _emit_div16(typingctx, row, off, sc, out, poff):
    """out[poff : poff + 8] = the packed FP4 codes of row[off : off + 16] / sc."""
    if not (_check_row(row) and _check_arr(out, types.uint8)):
        return None

    def codegen(context, builder, signature, args):
        rowv, offv, scv, outv, poffv = args
        x = _as_f32(builder, _load_bits(context, builder, row, rowv, offv, 16), 16, False)
        codes = _fp4_codes(builder, builder.fdiv(x, _splat(builder, scv, 16)), 16)
        _store_packed(context, builder, out, outv, poffv, codes, 16)
        return context.get_dummy_value()

    return types.void(row, off, types.float32, out, poff), codegen


def _fp4_mag_v(builder, q, n):
    """``kernels_common._fp4_mag`` of every lane (q >= 0, not NaN)."""
    lo = builder.fcmp_ordered("<", q, _fconst(n, 2.0))
    mid = builder.fcmp_ordered("<", q, _fconst(n, 4.0))
    k = builder.select(lo, _fconst(n, 2.0), builder.select(mid, _fconst(n, 1.0), _fconst(n, 0.5)))
    ik = builder.select(lo, _fconst(n, 0.5), builder.select(mid, _fconst(n, 1.0), _fconst(n, 2.0)))
    y = builder.fmul(q, k)
    two23 = _fconst(n, 2.0**23)
    m = builder.fmul(builder.fsub(builder.fadd(y, two23), two23), ik)
    big = builder.select(builder.fcmp_ordered(">", q, _fconst(n, 6.0)), _fconst(n, 6.0), _fconst(n, 0.0))
    return builder.select(builder.fcmp_ordered("<=", m, _fconst(n, 6.0)), m, big)


def _tree(builder, v, n):
    """The reference's pairwise sum over halves: v[j] += v[j + n/2], ..., down to one lane."""
    k = n
    while k > 1:
        v = builder.fadd(_half(builder, v, k, False), _half(builder, v, k, True))
        k //= 2
    return builder.extract_element(v, ir.Constant(_I32, 0))


@intrinsic
def _mx_err2(typingctx, row, off, pn, inv0, sc0, inv1, sc1):
    """The MXFP4 search's errors of row[off : off + 32] under two scales (inv_k = 2**(127 -
    b_k), sc_k = 2**(b_k - 127), 0 <= b_k <= 254): sum over the block, pairwise over halves,
    of (|x| * pn - ((mag(|x| * inv_k) * sc_k) * pn))**2, mag = ``_fp4_mag``. For bf16 and f32
    inputs this is the reference's error bit for bit without its two dtype roundings: that
    of |x| * inv_k (an exact power-of-two scaling of a value with at most 24 significant
    bits, unless the product is below 2**-126, which rounds either way to a magnitude of 0),
    and the bf16 rounding of mag * sc_k (two significant bits, at least 2**-128, or inf)."""
    if not _check_row(row):
        return None
    f = types.float32
    sig = types.UniTuple(f, 2)(row, off, f, f, f, f, f)

    def codegen(context, builder, signature, args):
        rowv, offv, pnv, inv0v, sc0v, inv1v, sc1v = args
        n = 32
        a = _as_f32(builder, _load_bits(context, builder, row, rowv, offv, n), n, True)
        pns = _splat(builder, pnv, n)
        an = builder.fmul(a, pns)
        sums = []
        for inv, sc in ((inv0v, sc0v), (inv1v, sc1v)):
            mag = _fp4_mag_v(builder, builder.fmul(a, _splat(builder, inv, n)), n)
            d = builder.fsub(an, builder.fmul(builder.fmul(mag, _splat(builder, sc, n)), pns))
            sums.append(_tree(builder, builder.fmul(d, d), n))
        return context.make_tuple(builder, signature.return_type, sums)

    return sig, codegen


@intrinsic
def _nv_err8(typingctx, row, off, pn, tg, cb, dg, e):
    """e[0:8] = the NVFP4 search's errors of row[off : off + 16] (bf16 or f32 bits) under
    the 8 candidate codes c6 + k of a block whose tables (thresholds ``tg``, decoded
    magnitudes ``dg``) start at ``cb`` = 80 * c6 (see ``kernels_nvfp4._nv_tables``).

    One value's RTN index h (the thresholds of lane 0 it reaches) picks its rows; under
    lane k its index is h - 2, h - 1 or h (two compares and two selects, as ``_v8_err``),
    its error (|x| * pn - d * pn)**2 (the product after the select: the same value as
    selecting among products), and the 16 error vectors are summed pairwise over halves
    in registers: the scalar path's float operations in the same order. ``e`` (>= 56
    floats) is also the scratch that hands |x|, |x| * pn and h to the per-value steps
    (scalar loads, cheaper than lane extracts)."""
    if not (_check_row(row) and all(_check_arr(a, types.float32) for a in (tg, dg, e))):
        return None

    def codegen(context, builder, signature, args):
        rowv, offv, pnv, tgv, cbv, dgv, ev = args
        n = 16
        a = _as_f32(builder, _load_bits(context, builder, row, rowv, offv, n), n, True)
        an = builder.fmul(a, _splat(builder, pnv, n))
        tga = context.make_array(tg)(context, builder, tgv)
        dda = context.make_array(dg)(context, builder, dgv)
        v8 = _vec(_F32, 8)

        def load8(ary, off):
            return builder.load(builder.bitcast(builder.gep(ary.data, [off]), v8.as_pointer()), align=4)

        def at(ary, off):
            return builder.load(builder.gep(ary.data, [off]))

        h = ir.Constant(_vec(_I32, n), [0] * n)
        for i in range(1, 8):  # lane 0's thresholds T_1 .. T_7 (table rows 3 .. 9)
            t = _splat(builder, at(tga, builder.add(cbv, ir.Constant(_I64, 8 * (i + 2)))), n)
            h = builder.add(h, builder.zext(builder.fcmp_ordered(">=", a, t), _vec(_I32, n)))
        ea = context.make_array(e)(context, builder, ev)
        base = ea.data  # scratch: e[8:24] = |x|, e[24:40] = |x| * pn, e[40:56] = h
        fp = lambda k: builder.gep(base, [ir.Constant(_I64, k)])
        builder.store(a, builder.bitcast(fp(8), _vec(_F32, n).as_pointer()), align=4)
        builder.store(an, builder.bitcast(fp(24), _vec(_F32, n).as_pointer()), align=4)
        builder.store(h, builder.bitcast(fp(40), _vec(_I32, n).as_pointer()), align=4)
        pn8 = _splat(builder, pnv, 8)
        errs = []
        for j in range(n):
            hj = builder.load(builder.bitcast(fp(40 + j), _I32.as_pointer()))
            r8 = builder.mul(builder.zext(hj, _I64), ir.Constant(_I64, 8))
            tb = builder.add(cbv, r8)
            t1 = load8(tga, builder.add(tb, ir.Constant(_I64, 8)))
            t2 = load8(tga, builder.add(tb, ir.Constant(_I64, 16)))
            d0 = load8(dda, tb)
            d1 = load8(dda, builder.add(tb, ir.Constant(_I64, 8)))
            d2 = load8(dda, builder.add(tb, ir.Constant(_I64, 16)))
            va = _splat(builder, builder.load(fp(8 + j)), 8)
            d = builder.select(builder.fcmp_ordered(">=", va, t1), d1, d0)
            d = builder.fmul(builder.select(builder.fcmp_ordered(">=", va, t2), d2, d), pn8)
            diff = builder.fsub(_splat(builder, builder.load(fp(24 + j)), 8), d)
            errs.append(builder.fmul(diff, diff))
        k = n
        while k > 1:  # e_j += e_{j + k/2}
            k //= 2
            errs = [builder.fadd(errs[j], errs[j + k]) for j in range(k)]
        builder.store(errs[0], builder.bitcast(ea.data, v8.as_pointer()), align=4)
        return context.get_dummy_value()

    return types.void(row, off, types.float32, tg, cb, dg, e), codegen


@intrinsic
def _amax16x16(typingctx, row, off, am):
    """am[g] = the largest magnitude bits of row[off + 16 g : off + 16 g + 16], g = 0 .. 15
    (16 NVFP4 groups)."""
    if not (_check_row(row) and _check_arr(am, types.uint32)):
        return None

    def codegen(context, builder, signature, args):
        rowv, offv, amv = args
        out = ir.Constant(_vec(_I32, 16), ir.Undefined)
        for g in range(16):
            bits = _load_bits(context, builder, row, rowv, builder.add(offv, ir.Constant(_I64, 16 * g)), 16)
            out = builder.insert_element(out, _amax_tree(builder, bits, 16), ir.Constant(_I32, g))
        ama = context.make_array(am)(context, builder, amv)
        builder.store(out, builder.bitcast(ama.data, _vec(_I32, 16).as_pointer()), align=4)
        return context.get_dummy_value()

    return types.void(row, off, am), codegen


def _round_bf16_v(builder, x, n):
    """``kernels_common._round_bf16`` of every lane."""
    vi = _vec(_I32, n)
    b = builder.bitcast(x, vi)
    nan = builder.icmp_unsigned(">", builder.and_(b, _const(_I32, n, 0x7FFFFFFF)), _const(_I32, n, 0x7F800000))
    odd = builder.and_(builder.lshr(b, _const(_I32, n, 16)), _const(_I32, n, 1))
    r = builder.and_(builder.add(builder.add(b, _const(_I32, n, 0x7FFF)), odd), _const(_I32, n, 0xFFFF0000))
    return builder.bitcast(builder.select(nan, b, r), x.type)


def _e4m3_v(builder, x, n):
    """``kernels_common._e4m3`` of every lane (float8_e4m3fn bits as i32: RNE,
    subnormals, saturation at 448, NaN -> 0x7F with its sign)."""
    vi = _vec(_I32, n)

    def c(v):
        return _const(_I32, n, v)

    b = builder.bitcast(x, vi)
    sgn = builder.and_(builder.lshr(b, c(24)), c(0x80))
    a = builder.and_(b, c(0x7FFFFFFF))
    nan = builder.icmp_unsigned(">", a, c(0x7F800000))
    normal = builder.icmp_unsigned(">=", a, c(0x3C800000))
    odd = builder.and_(builder.lshr(a, c(20)), c(1))
    rn = builder.sub(builder.lshr(builder.add(builder.add(a, c(0x7FFFF)), odd), c(20)), c(120 << 3))
    rn = builder.select(builder.icmp_unsigned(">", rn, c(0x7E)), c(0x7E), rn)
    # subnormal E4M3 (and float32 subnormals, ea = 0): round(mant / 2**shift), shift = 141 - ea
    ea = builder.lshr(a, c(23))
    mant = builder.or_(builder.and_(a, c(0x7FFFFF)), c(0x800000))
    shift = builder.sub(c(141), ea)  # >= 21 where not normal
    far = builder.icmp_signed(">", shift, c(25))
    sh = builder.select(builder.or_(far, normal), c(25), shift)  # keep the shift amount < 32
    half = builder.shl(c(1), builder.sub(sh, c(1)))
    sodd = builder.and_(builder.lshr(mant, sh), c(1))
    rs = builder.lshr(builder.add(builder.add(mant, builder.sub(half, c(1))), sodd), sh)
    rs = builder.select(far, c(0), rs)
    code = builder.select(normal, rn, rs)
    return builder.or_(builder.select(nan, c(0x7F), code), sgn)


@intrinsic
def _nv_codes16(typingctx, row, am, div, gs, e4m3_values, code, sc):
    """For 16 NVFP4 groups of a bf16 / f32 ``row`` with largest magnitude bits ``am``:
    code[g] = the E4M3 code of min(gs * dtype(amax / div), 448) (``kernels_nvfp4._nv_code``,
    before the 0 -> 0x20 replacement), sc[g] = float32(v / gs), v its E4M3 value, or 0.125
    where that is 0 (the round-to-nearest divisor)."""
    if not (_check_row(row) and _check_arr(am, types.uint32) and _check_arr(code, types.int32)
            and _check_arr(sc, types.float32) and _check_arr(e4m3_values, types.float32)):
        return None
    bf16 = row.dtype.bitwidth == 16

    def codegen(context, builder, signature, args):
        rowv, amv, divv, gsv, ev, codev, scv = args
        n = 16
        vi, vf = _vec(_I32, n), _vec(_F32, n)
        ama = context.make_array(am)(context, builder, amv)
        bits = builder.load(builder.bitcast(ama.data, vi.as_pointer()), align=4)
        if bf16:
            bits = builder.shl(bits, _const(_I32, n, 16))
        amax = builder.bitcast(bits, vf)
        s = builder.fdiv(amax, _splat(builder, divv, n))
        if bf16:
            s = _round_bf16_v(builder, s, n)
        gss = _splat(builder, gsv, n)
        t = builder.fmul(gss, s)
        t = builder.select(builder.fcmp_ordered(">", t, _fconst(n, 448.0)), _fconst(n, 448.0), t)
        cd = _e4m3_v(builder, t, n)
        tab = context.make_array(e4m3_values)(context, builder, ev)
        sv = ir.Constant(vf, ir.Undefined)
        for g in range(n):
            gi = ir.Constant(_I32, g)
            k = builder.zext(builder.extract_element(cd, gi), _I64)
            sv = builder.insert_element(sv, builder.load(builder.gep(tab.data, [k])), gi)
        sv = builder.select(builder.fcmp_ordered("==", sv, _fconst(n, 0.0)), _fconst(n, 0.125), sv)
        ca = context.make_array(code)(context, builder, codev)
        builder.store(cd, builder.bitcast(ca.data, vi.as_pointer()), align=4)
        sa = context.make_array(sc)(context, builder, scv)
        builder.store(builder.fdiv(sv, gss), builder.bitcast(sa.data, vf.as_pointer()), align=4)
        return context.get_dummy_value()

    return types.void(row, am, types.float32, types.float32, e4m3_values, code, sc), codegen


def _make_err_sums(n):
    @intrinsic
    def err_sums(typingctx, src, off, packed, poff, m, acc):
        """The card's measure of one FP4 group of n values: acc[0:16] += x**2 and
        acc[16:32] += (x - bf16(fp4 * m))**2 lane by lane, in float64 (x: the source
        row[off : off + n], bf16 or f32 bits; the codes: packed[poff : poff + n/2], even
        index in the low nibble; m: the group's float32 multiplier, as compressed-tensors
        decodes). Sums of n > 16 lanes fold their halves first."""
        if not (_check_row(src) and _check_arr(packed, types.uint8) and _check_arr(acc, types.float64)):
            return None

        def codegen(context, builder, signature, args):
            srcv, offv, pv, poffv, mv, accv = args
            i8, f64 = ir.IntType(8), ir.DoubleType()
            vi = _vec(_I32, n)

            def c(v):
                return _const(_I32, n, v)

            x = _as_f32(builder, _load_bits(context, builder, src, srcv, offv, n), n, False)
            pa = context.make_array(packed)(context, builder, pv)
            b = builder.load(builder.bitcast(builder.gep(pa.data, [poffv]), _vec(i8, n // 2).as_pointer()), align=1)
            lo = builder.and_(b, _const(i8, n // 2, 15))
            hi = builder.lshr(b, _const(i8, n // 2, 4))
            inter = [k // 2 + (n // 2) * (k % 2) for k in range(n)]
            code = builder.zext(builder.shuffle_vector(lo, hi, ir.Constant(_vec(_I32, n), inter)), vi)
            c3 = builder.and_(code, c(7))
            e = builder.lshr(c3, c(1))
            mm = builder.and_(c3, c(1))
            normal = builder.or_(builder.shl(builder.add(e, c(126)), c(23)), builder.shl(mm, c(22)))
            half = builder.mul(mm, c(0x3F000000))  # 0.5 or 0
            mag = builder.select(builder.icmp_unsigned("==", e, c(0)), half, normal)
            v = builder.bitcast(builder.or_(mag, builder.shl(builder.and_(code, c(8)), c(28))), _vec(_F32, n))
            dec = _round_bf16_v(builder, builder.fmul(v, _splat(builder, mv, n)), n)
            xd = builder.fpext(x, _vec(f64, n))
            dd = builder.fpext(builder.fsub(x, dec), _vec(f64, n))
            sx, sd = builder.fmul(xd, xd), builder.fmul(dd, dd)
            k = n
            while k > 16:
                sx = builder.fadd(_half(builder, sx, k, False), _half(builder, sx, k, True))
                sd = builder.fadd(_half(builder, sd, k, False), _half(builder, sd, k, True))
                k //= 2
            aa = context.make_array(acc)(context, builder, accv)
            for base, s in ((0, sx), (16, sd)):
                ptr = builder.bitcast(builder.gep(aa.data, [ir.Constant(_I64, base)]), _vec(f64, 16).as_pointer())
                builder.store(builder.fadd(builder.load(ptr, align=8), s), ptr, align=8)
            return context.get_dummy_value()

        return types.void(src, off, packed, poff, types.float32, acc), codegen

    return err_sums


_err_sums16 = _make_err_sums(16)
_err_sums32 = _make_err_sums(32)
