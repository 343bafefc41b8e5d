"""MXFP4 / NVFP4 byte-exactness proofs.

* qstream.schemes.reference == compressed-tensors 0.20 (driven like llm-compressor's
  model_free_ptq, tests/ct_reference.py): weight_packed, weight_scale,
  weight_global_scale, and the decoded weights.
* qstream.schemes.kernels == reference, on the same cases and on hypothesis examples,
  for every scale-search mode (the search semantics are tested in test_scale_search.py).

Every comparison is on raw bytes / bit patterns.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compressed_tensors.compressors.nvfp4.helpers import pack_fp4_to_uint8
from compressed_tensors.quantization.quant_args import FP4_E2M1_DATA
from compressed_tensors.quantization.utils import generate_gparam
try:
    from ct_reference import ct_decompress_mxfp4, ct_decompress_nvfp4, ct_mxfp4, ct_nvfp4
except ImportError:  # tests/ imported as a package
    from tests.ct_reference import (
        ct_decompress_mxfp4,
        ct_decompress_nvfp4,
        ct_mxfp4,
        ct_nvfp4,
    )
from qstream.schemes import kernels as K
from qstream.schemes import kernels_common as KC
from qstream.schemes import kernels_mxfp4 as KM
from qstream.schemes import kernels_nvfp4 as KN
from qstream.schemes import reference as R

BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
F32 = np.dtype(np.float32)
DTYPES = [BF16, F16, F32]
DTYPE_IDS = ["bf16", "fp16", "fp32"]
UINT = {BF16: np.uint16, F16: np.uint16, F32: np.uint32}


@pytest.fixture(scope="session", autouse=True)
def _compiled():
    K.warmup()  # every kernel, the scale-search ones included (~2 min cold, cached after)


# ------------------------------------------------------------------ conversions


def to_torch(a: np.ndarray) -> torch.Tensor:
    a = np.ascontiguousarray(a)
    if a.dtype == BF16:
        return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(a.copy())


def to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(BF16)
    if t.dtype == torch.float8_e4m3fn:
        return t.view(torch.uint8).numpy()
    return t.numpy()


def bits(a) -> np.ndarray:
    a = np.ascontiguousarray(a)
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[a.dtype.itemsize])


def assert_bytes_equal(actual, expected, what=""):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    assert actual.dtype.itemsize == expected.dtype.itemsize, what
    a, e = bits(actual), bits(expected)
    if not np.array_equal(a, e):
        idx = np.argwhere(a != e)[:5]
        pytest.fail(
            f"{what}: {int(np.sum(a != e))} of {a.size} differ; first at {idx.tolist()}:"
            f" got {[hex(int(a[tuple(i)])) for i in idx]}"
            f" expected {[hex(int(e[tuple(i)])) for i in idx]}"
        )


def assert_float_bits_equal(actual, expected, what=""):
    """Bit-exact float comparison; any NaN matches any NaN (payloads aside)."""
    actual = np.asarray(actual, dtype=np.float32)
    expected = np.asarray(expected, dtype=np.float32)
    nan_a, nan_e = np.isnan(actual), np.isnan(expected)
    assert np.array_equal(nan_a, nan_e), what
    assert_bytes_equal(np.where(nan_a, 0, actual), np.where(nan_e, 0, expected), what)


# ------------------------------------------------------------------------ cases


def _finfo(dt):
    return ml_dtypes.finfo(dt)


def _ties_global_scale_anchor(dt) -> tuple[float, float]:
    """A tensor amax A (a dt value) whose NVFP4 global scale is a power of two."""
    for m in range(4, -5, -1):
        a = float(np.float32(2688.0 / 2.0**m).astype(dt).astype(np.float32))
        gs = R.nvfp4_global_scale(a, dt)
        if gs == 2.0**m:
            return a, float(gs)
    raise AssertionError("no power-of-two global scale found")


def case_ties(dt, rng):
    """Exact FP4 ties (0.25 .. 5 x scale), E4M3 scale ties, subnormal E4M3 scales.

    The tensor amax A makes the global scale gs a power of two; a block whose amax
    is 6 * P (P a power of two) gets s = P, an exact E4M3 scale gs * P and a
    divisor P, so x = t * P quantizes to exactly t. The same blocks give MXFP4
    scale P.
    """
    a, gs = _ties_global_scale_anchor(dt)
    ties = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], np.float32)
    near = np.concatenate([ties, np.nextafter(ties, 0), np.nextafter(ties, 10)])
    rows = []
    tiny_p = max(2.0**-13, float(_finfo(dt).smallest_subnormal) * 64)
    ps = [2.0**k for k in range(int(np.log2(tiny_p)), 5) if 6 * 2.0**k <= a]
    for p in ps:
        for vals in (ties, -ties, near):
            row = np.zeros(32, np.float32)
            row[0] = a if p == ps[-1] else 6 * p
            row[1 : 1 + len(vals[:21])] = vals[:21] * np.float32(p)
            row[16] = 6 * p  # second NVFP4 block has the same amax
            rows.append(row)
    # E4M3 rounding ties on the block scale: gs * amax / 6 = 1.0625, 1.1875, and
    # 1.5 * 2**-9 (subnormal tie) times powers of two
    for mant in (1.0625, 1.1875, 1.5 * 2.0**-9, 2.5 * 2.0**-9):
        for k in (-6, -3, 0, 3):
            amax = 6 * mant * 2.0**k / gs
            if amax <= a and amax > 0:
                row = np.full(32, amax / 7, np.float32)
                row[::16] = amax
                rows.append(row)
    w = np.stack(rows).astype(dt)
    w[0, 0] = np.float32(a).astype(dt)
    return w


def case_subnormal_e4m3(dt, rng):
    """Block amaxes far below the tensor amax: subnormal E4M3 scales, and scales
    that round to zero (-> 0.125)."""
    big = 448.0 if dt == F16 else 1.0e4
    rows = []
    for k in range(0, 30):
        row = rng.standard_normal(64).astype(np.float32) * np.float32(big * 2.0**-k)
        rows.append(row)
    w = np.stack(rows)
    w[0, 0] = big
    return w.astype(dt)


def case_large(dt, rng):
    """Magnitudes near the dtype max, incl. MXFP4 groups whose amax rounds to inf."""
    fmax = float(_finfo(dt).max)
    overflow = 1.75 * 2.0 ** (_finfo(dt).maxexp - 1)  # MXFP4 amax that rounds to inf
    vals = np.array(
        [fmax, fmax * 0.99, overflow, fmax * 0.874, fmax * 0.5, fmax * 0.25, fmax / 7],
        dtype=np.float64,
    )
    rows = []
    for v in vals:
        row = (rng.standard_normal(64) * v / 4).clip(-fmax, fmax)
        row[5] = -v
        row[40] = v * 0.6
        rows.append(row)
    return np.stack(rows).astype(np.float32).astype(dt)


def case_small(dt, rng):
    """Subnormal magnitudes of the dtype, mixed with normal ones and alone."""
    fi = _finfo(dt)
    sub = float(fi.smallest_subnormal)
    tiny = float(fi.tiny)
    rows = []
    k = np.arange(64)
    rows.append(((k % 9) - 4) * sub)  # a few ulps of subnormal, both signs
    rows.append(np.where(k % 2, -1, 1) * tiny * (1 - (k % 16) / 16))
    rows.append(rng.standard_normal(64) * tiny)
    row = rng.standard_normal(64) * sub * 3
    row[7] = 1.0  # one normal value per row
    rows.append(row)
    rows.append(-np.full(64, sub))
    w = np.stack(rows).astype(np.float32).astype(dt)
    return w


def case_tiny_tensor(dt, rng):
    """Whole tensor of subnormals: the global scale overflows to inf -> 1.0."""
    sub = float(_finfo(dt).smallest_subnormal)
    w = (rng.integers(-20, 21, size=(4, 64)) * sub).astype(np.float32).astype(dt)
    return w


def case_signed_zeros(dt, rng):
    """-0.0, +0.0, and small negatives that round to FP4 zero (0x8)."""
    w = rng.standard_normal((6, 64)).astype(np.float32)
    w[0] = -0.0
    w[1, ::2] = -0.0
    w[2, :32] = -0.0
    w[2, 32:] = 0.0
    w[3, ::3] = -1e-3
    w[3, 1::3] = -0.0
    w[4] = -np.abs(w[4]) * 1e-3
    w[4, 0] = -1.0
    return w.astype(dt)


def case_zero_rows(dt, rng):
    w = rng.standard_normal((8, 96)).astype(np.float32)
    w[[0, 3, 7]] = 0.0
    w[1, :32] = 0.0  # zero MXFP4 group and zero NVFP4 blocks
    w[2, 16:32] = 0.0
    return w.astype(dt)


def case_all_values(dt, rng):
    """Every finite value of a 16-bit dtype (a sample of fp32), sorted, in groups."""
    if dt == F32:
        v = rng.integers(0, 2**32, size=2**14, dtype=np.uint64).astype(np.uint32)
        v = v.view(np.float32)
    else:
        v = np.arange(2**16, dtype=np.uint16).view(dt)
    v = v[np.isfinite(v.astype(np.float32))]
    v = v[: len(v) // 64 * 64]
    return np.ascontiguousarray(v.reshape(-1, 32))


def case_all_values_shuffled(dt, rng):
    w = case_all_values(dt, rng).reshape(-1)
    return rng.permutation(w).reshape(-1, 64)


def case_exponent_sweep(dt, rng):
    """One 32-value group per amax binade of the dtype (subnormal to largest finite), each
    with random mantissas, values 0 to 30 binades below its amax (subnormals and zeros
    included) and random signs: every MXFP4 byte, on both sides of the kernels' vector-path
    bounds (1 <= byte <= 126 for the search, <= 127 for round to nearest), and NVFP4 blocks
    at every scale."""
    fi = ml_dtypes.finfo(dt)
    lo, hi = int(np.log2(float(fi.smallest_subnormal))), int(np.log2(float(fi.max)))
    groups = []
    for k in range(lo, hi + 1):
        for _ in range(2):
            mant = rng.uniform(1.0, 2.0, 32)
            drop = rng.integers(0, 31, 32) * (rng.random(32) < 0.7)
            drop[0] = 0
            v = mant * np.exp2(np.float64(k) - drop) * rng.choice([-1.0, 1.0], 32)
            v[rng.random(32) < 0.05] = 0.0
            groups.append(v)
    g = np.array(groups)
    w = g.astype(np.float32).astype(dt)
    w[~np.isfinite(w.astype(np.float32))] = fi.max
    return np.ascontiguousarray(w.reshape(-1, 64) if len(groups) % 2 == 0 else w)


def _random(shape, spread):
    def make(dt, rng):
        w = rng.standard_normal(shape).astype(np.float32) * np.float32(0.02)
        if spread:
            w = w * np.exp2(rng.integers(-spread, spread // 2, size=shape)).astype(np.float32)
        return w.astype(dt)

    return make


CASES = {
    "rand_1x32": _random((1, 32), 0),
    "rand_5x96": _random((5, 96), 0),
    "rand_16x256": _random((16, 256), 0),
    "rand_64x512": _random((64, 512), 0),
    "rand_wide_33x160": _random((33, 160), 12),
    "ties": case_ties,
    "subnormal_e4m3": case_subnormal_e4m3,
    "large": case_large,
    "small": case_small,
    "tiny_tensor": case_tiny_tensor,
    "signed_zeros": case_signed_zeros,
    "zero_rows": case_zero_rows,
    "all_zero": lambda dt, rng: np.zeros((3, 64), dtype=dt),
    "all_neg_zero": lambda dt, rng: np.full((2, 32), -0.0, dtype=dt),
    "all_values": case_all_values,
    "all_values_shuffled": case_all_values_shuffled,
    "exponent_sweep": case_exponent_sweep,
}


def make_case(name: str, dt) -> np.ndarray:
    seed = sum(map(ord, name)) * 7 + DTYPES.index(dt)
    w = CASES[name](dt, np.random.default_rng(seed))
    assert w.dtype == dt and w.ndim == 2 and w.shape[1] % 32 == 0
    assert np.all(np.isfinite(w.astype(np.float32))), name
    return np.ascontiguousarray(w)


CASE_PARAMS = [
    pytest.param(name, dt, id=f"{name}-{did}")
    for name in CASES
    for dt, did in zip(DTYPES, DTYPE_IDS)
]


def ref_nvfp4(w, partners=()):
    amax = max([R.tensor_absmax(w)] + [R.tensor_absmax(p) for p in partners])
    gs = R.nvfp4_global_scale(amax, w.dtype)
    packed, scale = R.quantize_nvfp4(w, gs)
    return packed, scale, gs


@pytest.mark.parametrize("dt", DTYPES, ids=DTYPE_IDS)
def test_edge_cases_exercise_what_they_claim(dt):
    """Guard the case generators: each edge case really reaches its edge."""
    e4m3 = ml_dtypes.float8_e4m3fn
    ties = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]

    w = make_case("ties", dt)
    x = w.astype(np.float32)
    rows = x.shape[0]
    packed, scale, gs = ref_nvfp4(w)
    sc = scale.view(e4m3).astype(np.float32) / gs
    q_nv = np.abs(x.reshape(rows, -1, 16) / sc[..., None])
    _, mx_scale = R.quantize_mxfp4(w)
    q_mx = np.abs(x.reshape(rows, -1, 32) / np.exp2(mx_scale.astype(np.float32) - 127)[..., None])
    for t in ties:
        assert np.any(q_nv == t) and np.any(q_mx == t), t
    amax = np.abs(x.reshape(rows, -1, 16)).max(-1)
    t_scale = gs * R.round_to_dtype(amax / np.float32(6), dt)
    e4m3_grid = np.arange(256, dtype=np.uint8).view(e4m3).astype(np.float32)
    e4m3_grid = np.sort(e4m3_grid[np.isfinite(e4m3_grid) & (e4m3_grid >= 0)])
    nxt = np.searchsorted(e4m3_grid, t_scale, side="right")
    prv = nxt - 1
    ok = nxt < len(e4m3_grid)
    mids = (e4m3_grid[prv[ok]].astype(np.float64) + e4m3_grid[nxt[ok]]) / 2
    assert np.any(t_scale[ok] == mids), "no E4M3 rounding tie"

    w = make_case("subnormal_e4m3", dt)
    _, scale, gs = ref_nvfp4(w)
    assert np.any((scale >= 1) & (scale <= 7)), "no subnormal E4M3 scale"
    amax = np.abs(w.astype(np.float32).reshape(w.shape[0], -1, 16)).max(-1)
    rounds_to_zero = (scale == 0x20) & (amax > 0) & (gs * amax / 6 < 2.0**-10)
    assert np.any(rounds_to_zero), "no block scale rounding to 0"

    w = make_case("large", dt)
    packed, mx_scale = R.quantize_mxfp4(w)
    amax = np.abs(w.astype(np.float32).reshape(w.shape[0], -1, 32)).max(-1)
    limit = 1.75 * 2.0 ** (15 if dt == F16 else 127)
    assert np.any(amax >= limit), "no MXFP4 overflow"
    assert np.any((amax < limit) & (amax > limit / 2)), "nothing just below the overflow"
    assert np.all(mx_scale[amax >= limit] == 127)
    assert not np.any(packed.reshape(*amax.shape, 16)[amax >= limit])

    w = make_case("small", dt)
    x = np.abs(w.astype(np.float32))
    assert np.any((x > 0) & (x < ml_dtypes.finfo(dt).tiny)), "no subnormal input"
    assert R.nvfp4_global_scale(R.tensor_absmax(make_case("tiny_tensor", dt)), dt) == 1.0

    w = make_case("exponent_sweep", dt)
    _, rtn = R.quantize_mxfp4(w)
    _, mse = R.quantize_mxfp4(w, "mse")
    # both sides of the vector paths' bounds (fp16 groups, all scalar, reach 111 .. 140 only)
    for b in (0, 1, 2, 125, 126, 127, 128, 129) if dt != F16 else (111, 126, 127, 128, 140):
        assert np.any(rtn == b) and np.any(mse == b), b
    assert np.any(mse != rtn), "the search never moves a scale"

    w = make_case("signed_zeros", dt)
    codes = R.unpack_fp4(ref_nvfp4(w)[0])
    assert np.all(codes[0] == 0)  # a row of -0.0
    neg = (w.astype(np.float32) < 0) & (codes == 0x8)
    assert np.any(neg), "no negative value rounding to 0x8"


# ------------------------------------------------- reference == compressed-tensors


@pytest.mark.parametrize("name,dt", CASE_PARAMS)
def test_reference_nvfp4_matches_ct(name, dt):
    w = make_case(name, dt)
    packed, scale, gs = ref_nvfp4(w)
    ct = ct_nvfp4(to_torch(w))
    assert ct["weight_scale"].dtype == torch.float8_e4m3fn
    assert_bytes_equal(np.array([gs], np.float32), to_numpy(ct["weight_global_scale"]), "global")
    assert_bytes_equal(scale, to_numpy(ct["weight_scale"]), "weight_scale")
    assert_bytes_equal(packed, to_numpy(ct["weight_packed"]), "weight_packed")

    # decode: reference dequantize == CT decompression (bf16), bit for bit
    ct_w = ct_decompress_nvfp4(**ct)
    assert ct_w.dtype == torch.bfloat16
    ours = R.dequantize_nvfp4(packed, scale, gs)
    assert_float_bits_equal(ours, to_numpy(ct_w).astype(np.float32), "decode")


@pytest.mark.parametrize("name,dt", CASE_PARAMS)
def test_reference_mxfp4_matches_ct(name, dt):
    w = make_case(name, dt)
    packed, scale = R.quantize_mxfp4(w)
    ct = ct_mxfp4(to_torch(w))
    assert ct["weight_scale"].dtype == torch.uint8
    assert_bytes_equal(scale, to_numpy(ct["weight_scale"]), "weight_scale")
    assert_bytes_equal(packed, to_numpy(ct["weight_packed"]), "weight_packed")

    ct_w = ct_decompress_mxfp4(**ct)
    assert ct_w.dtype == torch.bfloat16
    ours = R.dequantize_mxfp4(packed, scale)
    assert_float_bits_equal(ours, to_numpy(ct_w).astype(np.float32), "decode")


@pytest.mark.parametrize("dt", DTYPES, ids=DTYPE_IDS)
def test_fused_partners_share_global_scale(dt):
    """gate_proj / up_proj: one global scale from the absmax over both."""
    rng = np.random.default_rng(5)
    gate = (rng.standard_normal((8, 64)) * 0.01).astype(np.float32).astype(dt)
    up = (rng.standard_normal((8, 64)) * 0.05).astype(np.float32).astype(dt)
    up[3, 7] = np.float32(0.75).astype(dt)  # the fused amax lives in `up`
    for w, partner in ((gate, up), (up, gate)):
        packed, scale, gs = ref_nvfp4(w, [partner])
        assert gs == R.nvfp4_global_scale(R.tensor_absmax(up), dt)
        assert gs != R.nvfp4_global_scale(R.tensor_absmax(gate), dt)
        ct = ct_nvfp4(to_torch(w), [to_torch(partner)])
        assert_bytes_equal(np.array([gs], np.float32), to_numpy(ct["weight_global_scale"]))
        assert_bytes_equal(scale, to_numpy(ct["weight_scale"]), "weight_scale")
        assert_bytes_equal(packed, to_numpy(ct["weight_packed"]), "weight_packed")
        kp, ks = K.quantize_nvfp4(w, gs)
        assert_bytes_equal(kp, packed)
        assert_bytes_equal(ks, scale)
    # the partner really changes the result of the smaller tensor
    assert not np.array_equal(ref_nvfp4(gate, [up])[1], ref_nvfp4(gate)[1])


@pytest.mark.parametrize("dt", [BF16, F16], ids=["bf16", "fp16"])
def test_global_scale_exhaustive(dt):
    """nvfp4_global_scale == generate_gparam for every positive finite value."""
    v = np.arange(0x7F80 if dt == BF16 else 0x7C00, dtype=np.uint16).view(dt)
    t = to_torch(v)
    expected = np.array(
        [generate_gparam(-t[i : i + 1], t[i : i + 1]).item() for i in range(len(v))],
        dtype=np.float32,
    )
    ours = np.array([R.nvfp4_global_scale(float(x), dt) for x in v.astype(np.float32)])
    assert_bytes_equal(ours.astype(np.float32), expected)


def test_global_scale_fp32_sample():
    rng = np.random.default_rng(3)
    v = rng.integers(0, 0x7F800000, size=3000, dtype=np.uint32).view(np.float32)
    v = np.concatenate([v, np.float32([0, 1e-45, 1.1754944e-38, 3.4e38, 2688, 1])])
    t = torch.from_numpy(v)
    expected = np.array(
        [generate_gparam(-t[i : i + 1], t[i : i + 1]).item() for i in range(len(v))],
        dtype=np.float32,
    )
    ours = np.array([R.nvfp4_global_scale(float(x), F32) for x in v], dtype=np.float32)
    assert_bytes_equal(ours, expected)


def test_global_scale_quirks():
    # all-zero tensor: amax clamps to tiny, 2688 / tiny overflows -> 1.0
    for dt in DTYPES:
        assert R.nvfp4_global_scale(0.0, dt) == 1.0
    # fp16: computed in fp16, so 2688 / amax overflows for amax < ~0.041 -> 1.0
    a = float(np.float16(0.03))
    assert R.nvfp4_global_scale(a, F16) == 1.0
    b = float(np.float32(0.03).astype(BF16))
    assert R.nvfp4_global_scale(b, BF16) > 8.0e4
    with pytest.raises(ValueError):
        R.nvfp4_global_scale(0.1, BF16)  # not a bf16 value
    assert R.nvfp4_global_scale(float("nan"), BF16) == 1.0  # torch.nan_to_num


def test_fp4_encode_matches_ct_rounding():
    """fp4_encode == CT cast_to_fp4 + pack_fp4_to_uint8 on a dense sweep of q."""
    q = np.concatenate(
        [
            np.linspace(-7, 7, 14001, dtype=np.float32),
            np.float32([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, 1e-40, 1e30]),
        ]
    )
    q = np.concatenate([q, -q, np.nextafter(q, np.float32(np.inf)), np.nextafter(q, -np.inf)])
    q = np.concatenate([q, np.float32([-0.0, 0.0])])
    q = q[: len(q) // 2 * 2]
    t = torch.from_numpy(q.copy())
    rounded = FP4_E2M1_DATA.cast_to_fp4(torch.clamp(t, -6.0, 6.0))
    expected = pack_fp4_to_uint8(rounded.reshape(1, -1)).numpy()
    ours = R.pack_fp4(R.fp4_encode(q).reshape(1, -1))
    assert_bytes_equal(ours, expected)


def test_fp4_encode_conventions():
    q = np.float32([0.0, -0.0, -0.1, 0.25, -0.25, 0.2500001, 0.75, 1.25, 1.75, 2.5,
                    3.5, 5.0, 5.0001, 6.0, 100.0, -100.0, -1e-30])
    expected = [0x0, 0x0, 0x8, 0x0, 0x8, 0x1, 0x2, 0x2, 0x4, 0x4,
                0x6, 0x6, 0x7, 0x7, 0x7, 0xF, 0x8]
    assert R.fp4_encode(q).tolist() == expected
    assert R.FP4_VALUES.tolist() == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    codes = np.arange(16, dtype=np.uint8).reshape(2, 8)
    assert_bytes_equal(R.unpack_fp4(R.pack_fp4(codes)), codes)


def test_formats_md_packing_example():
    """formats.md: row [0.5, 1, -6, 6] with a scale of 1 packs to 0x21 0x7F."""
    row = np.float32([0.5, 1.0, -6.0, 6.0])
    assert R.pack_fp4(R.fp4_encode(row).reshape(1, 4)).tolist() == [[0x21, 0x7F]]
    ct = pack_fp4_to_uint8(torch.tensor([[0.5, 1.0, -6.0, 6.0]]))
    assert ct.tolist() == [[0x21, 0x7F]]
    # through MXFP4: amax 6 -> exponent 127 (scale 1.0)
    w = np.zeros((1, 32), np.float32)
    w[0, :4] = row
    for dt in DTYPES:
        wd = w.astype(dt)
        packed, scale = R.quantize_mxfp4(wd)
        assert scale.tolist() == [[127]]
        assert packed[0, :2].tolist() == [0x21, 0x7F] and not packed[0, 2:].any()
        kp, ks = K.quantize_mxfp4(wd)
        assert_bytes_equal(kp, packed)
        assert_bytes_equal(ks, scale)
        ct = ct_mxfp4(to_torch(wd))
        assert_bytes_equal(packed, to_numpy(ct["weight_packed"]))
        assert_bytes_equal(scale, to_numpy(ct["weight_scale"]))


def test_decode_every_code_and_scale():
    """Reference dequantize == CT decompress for every (code, scale byte) pair."""
    codes = np.tile(np.arange(16, dtype=np.uint8), (256, 2))  # [256, 32]
    packed = R.pack_fp4(codes)
    # MXFP4: every E8M0 byte (255 decodes to inf, 0 x inf to NaN, as in CT)
    mx_scale = np.arange(256, dtype=np.uint8).reshape(256, 1)
    ct_w = ct_decompress_mxfp4(torch.from_numpy(packed), torch.from_numpy(mx_scale))
    assert_float_bits_equal(R.dequantize_mxfp4(packed, mx_scale), to_numpy(ct_w).astype(np.float32))
    # NVFP4: every non-NaN E4M3 byte, several global scales
    nv_scale = np.arange(256, dtype=np.uint8)
    nv_scale = nv_scale[(nv_scale & 0x7F) != 0x7F]
    nv_codes = np.tile(np.arange(16, dtype=np.uint8), (len(nv_scale), 1))
    nv_packed = R.pack_fp4(nv_codes)
    for gs in (1.0, 2688.0, 0.37, 7.9e-36, 3.1e38, 1e-3):
        gs = np.float32(gs)
        ct_w = ct_decompress_nvfp4(
            torch.from_numpy(nv_packed),
            torch.from_numpy(nv_scale.reshape(-1, 1).copy()).view(torch.float8_e4m3fn),
            torch.tensor([gs], dtype=torch.float32),
        )
        ours = R.dequantize_nvfp4(nv_packed, nv_scale.reshape(-1, 1), gs)
        assert_float_bits_equal(ours, to_numpy(ct_w).astype(np.float32), f"gs={gs}")


@given(data=st.data())
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_reference_matches_ct_hypothesis(data):
    dt = data.draw(st.sampled_from(DTYPES))
    w = draw_weight(data, dt, max_rows=4, max_groups=3)
    packed, scale, gs = ref_nvfp4(w)
    ct = ct_nvfp4(to_torch(w))
    assert_bytes_equal(np.array([gs], np.float32), to_numpy(ct["weight_global_scale"]))
    assert_bytes_equal(scale, to_numpy(ct["weight_scale"]))
    assert_bytes_equal(packed, to_numpy(ct["weight_packed"]))
    packed, scale = R.quantize_mxfp4(w)
    ct = ct_mxfp4(to_torch(w))
    assert_bytes_equal(scale, to_numpy(ct["weight_scale"]))
    assert_bytes_equal(packed, to_numpy(ct["weight_packed"]))


# ------------------------------------------------------------- kernels == reference


def check_kernels(w, gs=None, parallel_modes=(False, True), searches=("none", "4over6", "mse")):
    """Kernels == reference, byte for byte, for every scale-search mode in ``searches``
    (a mode a scheme does not have is skipped for it)."""
    if gs is None:
        gs = R.nvfp4_global_scale(R.tensor_absmax(w), w.dtype)
    for search in searches:
        if search in R.SEARCH_MODES["nvfp4"]:
            rp, rs = R.quantize_nvfp4(w, gs, search)
            for parallel in parallel_modes:
                kp, ks = K.quantize_nvfp4(w, gs, search, parallel=parallel)
                assert_bytes_equal(kp, rp, f"nvfp4 packed search={search} parallel={parallel}")
                assert_bytes_equal(ks, rs, f"nvfp4 scale search={search} parallel={parallel}")
        if search in R.SEARCH_MODES["mxfp4"]:
            mp, ms = R.quantize_mxfp4(w, search)
            for parallel in parallel_modes:
                kp, ks = K.quantize_mxfp4(w, search, parallel=parallel)
                assert_bytes_equal(kp, mp, f"mxfp4 packed search={search} parallel={parallel}")
                assert_bytes_equal(ks, ms, f"mxfp4 scale search={search} parallel={parallel}")


def _wide(w, width):
    """The case's groups laid out in rows of ``width`` values (its tail dropped), or None."""
    flat = w.reshape(-1)
    n = flat.size // width * width
    return np.ascontiguousarray(flat[:n].reshape(-1, width)) if n else None


@pytest.mark.parametrize("name,dt", CASE_PARAMS)
def test_kernels_match_reference(name, dt):
    """Every case as it is (mostly narrow rows: the kernels' per-group code) and laid out
    in rows of 256 and 288 values, where the NVFP4 kernels take 16 groups' scales at a
    time as vectors (288: and two groups after them the per-group way)."""
    w = make_case(name, dt)
    assert K.absmax(w) == R.tensor_absmax(w)
    check_kernels(w)
    for width in (256, 288):
        wide = _wide(w, width)
        if wide is not None:
            check_kernels(wide, parallel_modes=(False,))


@pytest.mark.parametrize("dt", DTYPES, ids=DTYPE_IDS)
def test_kernels_arbitrary_global_scales(dt):
    w = make_case("all_values_shuffled", dt)[:256]
    for gs in (1.0, 2688.0, 1e-30, 3e38, 0.37, 2.0**-20, 7.0e10):
        check_kernels(w, np.float32(gs))


@pytest.mark.parametrize("dt", DTYPES, ids=DTYPE_IDS)
def test_kernels_into_row_blocks_and_threads(dt):
    """Preallocated outputs, row blocks, non-contiguous input, concurrent threads."""
    w = make_case("rand_wide_33x160", dt)
    gs = R.nvfp4_global_scale(R.tensor_absmax(w), dt)
    rp, rs = R.quantize_nvfp4(w, gs)
    mp, ms = R.quantize_mxfp4(w)
    packed = np.full((33, 80), 0xAA, np.uint8)
    nv_scale = np.full((33, 10), 0xAA, np.uint8)
    mx_scale = np.full((33, 5), 0xAA, np.uint8)
    for lo, hi in ((0, 7), (7, 8), (8, 33)):
        K.quantize_nvfp4_into(w[lo:hi], gs, packed[lo:hi], nv_scale[lo:hi])
    assert_bytes_equal(packed, rp)
    assert_bytes_equal(nv_scale, rs)
    packed[:] = 0xAA
    for lo, hi in ((0, 20), (20, 33)):
        K.quantize_mxfp4_into(w[lo:hi], packed[lo:hi], mx_scale[lo:hi], parallel=True)
    assert_bytes_equal(packed, mp)
    assert_bytes_equal(mx_scale, ms)

    # a non-contiguous view is accepted (copied)
    wide = np.concatenate([w, w], axis=1)[:, :160]
    assert not wide.flags.c_contiguous
    assert_bytes_equal(K.quantize_mxfp4(wide)[0], mp)

    # threads on disjoint row blocks
    big = np.tile(w, (8, 1))
    ref = R.quantize_nvfp4(big, gs)
    out_p = np.empty((big.shape[0], 80), np.uint8)
    out_s = np.empty((big.shape[0], 10), np.uint8)
    blocks = [(i, min(i + 40, big.shape[0])) for i in range(0, big.shape[0], 40)]

    def work(block):
        lo, hi = block
        K.quantize_nvfp4_into(big[lo:hi], gs, out_p[lo:hi], out_s[lo:hi])

    with ThreadPoolExecutor(2) as ex:
        list(ex.map(work, blocks))
    assert_bytes_equal(out_p, ref[0])
    assert_bytes_equal(out_s, ref[1])

    with pytest.raises(ValueError):
        K.quantize_nvfp4_into(w, gs, np.empty((33, 79), np.uint8), nv_scale)
    with pytest.raises(ValueError):
        K.quantize_mxfp4(w[:, :48])


def test_kernels_release_the_gil():
    for fn in (KN._nvfp4_serial, KN._nvfp4_parallel, KM._mxfp4_serial, KM._mxfp4_parallel,
               KN._nvfp4_search_serial, KN._nvfp4_search_parallel, KM._mxfp4_search_serial,
               KM._mxfp4_search_parallel, KC._absmax_bits):
        assert fn.targetoptions.get("nogil") is True, fn
    # this thread keeps running Python while another thread is inside a kernel
    bits = np.ones((8192, 4096), dtype=BF16).view(np.uint16)
    packed = np.empty((8192, 2048), np.uint8)
    scale = np.empty((8192, 128), np.uint8)
    span = []

    def run():
        t0 = time.perf_counter()
        KM._mxfp4_serial(bits, packed, scale)
        span.extend([t0, time.perf_counter()])

    ticks = []
    t = threading.Thread(target=run)
    t.start()
    while t.is_alive():
        ticks.append(time.perf_counter())
    t.join()
    t0, t1 = span
    # with the GIL held, this thread would stall for the whole call (one big gap)
    points = np.array([t0] + [x for x in ticks if t0 < x < t1] + [t1])
    assert np.max(np.diff(points)) < 0.5 * (t1 - t0), (np.max(np.diff(points)), t1 - t0)


@pytest.mark.parametrize("dt", DTYPES, ids=DTYPE_IDS)
def test_absmax(dt):
    rng = np.random.default_rng(11)
    w = rng.standard_normal((7, 3, 33)).astype(np.float32).astype(dt)
    assert K.absmax(w) == float(np.max(np.abs(w.astype(np.float32))))
    assert K.absmax(w[:, 1]) == R.tensor_absmax(w[:, 1])
    assert K.absmax(np.zeros((0, 32), dt)) == 0.0
    assert K.absmax(np.full((2, 32), -0.0, dt)) == 0.0
    w[3, 1, 2] = np.nan
    assert np.isnan(K.absmax(w))
    w[3, 1, 2] = -np.inf
    assert K.absmax(w) == np.inf


def test_e4m3_encoder_exhaustive():
    """Kernel float32 -> E4M3 == torch's cast (saturating) everywhere, and ==
    ml_dtypes (RNE) wherever ml_dtypes does not overflow to NaN (|x| <= 464)."""
    every_bf16 = (np.arange(2**16, dtype=np.uint32) << 16).view(np.float32)
    dense = np.arange(0x3A000000, 0x44000000, 5, dtype=np.uint32).view(np.float32)
    # every rounding boundary pattern of the 20 dropped mantissa bits
    hi = np.arange(0x3A0, 0x440, dtype=np.uint32) << 20
    lo = np.uint32([0, 1, 0x7FFFF, 0x80000, 0x80001, 0xFFFFF])
    edges = (hi[:, None] | lo[None, :]).reshape(-1).view(np.float32)
    x = np.concatenate([every_bf16, dense, edges, np.float32([np.inf, -np.inf, 1e-45])])
    x = np.concatenate([x, -x])
    ours = K.e4m3_encode(x)
    expected = torch.from_numpy(x).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    assert_bytes_equal(ours, expected)
    ok = ~(np.abs(x) > 464)
    with np.errstate(invalid="ignore"):
        md = x[ok].astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
    assert_bytes_equal(ours[ok], md)


def test_search_fp4_magnitude_exhaustive():
    """The search's arithmetic FP4 rounding (rint on the grid spacing) == the magnitude of
    the RTN encoder's code, for all 2**31 non-negative float32 bit patterns (NaN too)."""
    assert KC._fp4_mag_mismatches(0, 2**31) == 0


def test_kernel_dtype_emulation_exhaustive():
    """In-kernel bf16/fp16 decoding and float32 -> bf16/fp16 rounding == numpy."""
    every16 = np.arange(2**16, dtype=np.uint16)
    for kind, dt in ((KC.K_BF16, BF16), (KC.K_F16, F16)):
        out = np.empty(2**16, np.float32)
        KC._decode_array(every16, kind, out)
        assert_float_bits_equal(out, every16.view(dt).astype(np.float32))
    rng = np.random.default_rng(2)
    x = np.concatenate(
        [
            rng.integers(0, 2**32, size=2**20, dtype=np.uint64).astype(np.uint32),
            np.arange(0x33000000, 0x47800000, 97, dtype=np.uint32),  # fp16 range
            (np.arange(2**16, dtype=np.uint32) << 16) | np.uint32(0x8000),  # bf16 ties
            (np.arange(2**16, dtype=np.uint32) << 13) | np.uint32(0x1000),  # fp16 ties
            np.arange(0x33000000, 0x33800000, 101, dtype=np.uint32),  # fp16 subnormal
        ]
    ).view(np.float32)
    x = x[~np.isnan(x)]
    for kind, dt in ((KC.K_BF16, BF16), (KC.K_F16, F16)):
        out = np.empty_like(x)
        KC._round_array(x, kind, out)
        with np.errstate(over="ignore"):
            expected = x.astype(dt).astype(np.float32)
        assert_float_bits_equal(out, expected, str(dt))


# ------------------------------------------------------------------ hypothesis


def draw_weight(data, dt, max_rows=6, max_groups=4) -> np.ndarray:
    rows = data.draw(st.integers(1, max_rows))
    cols = 32 * data.draw(st.integers(1, max_groups))
    n = rows * cols
    mode = data.draw(st.sampled_from(["bits", "normal", "mixed"]))
    u = UINT[dt]
    if mode == "bits":  # any finite value of the dtype
        size = n * np.dtype(u).itemsize
        raw = data.draw(st.binary(min_size=size, max_size=size))
        w = np.frombuffer(raw, dtype=u).view(dt)
    else:
        seed = data.draw(st.integers(0, 2**32 - 1))
        rng = np.random.default_rng(seed)
        exp = data.draw(st.integers(-30, 10))
        w = rng.standard_normal(n) * 2.0**exp
        if mode == "mixed":
            w *= np.exp2(rng.integers(-24, 8, size=n))
            w[rng.random(n) < 0.1] = 0.0
            w[rng.random(n) < 0.05] = -0.0
        fmax = float(_finfo(dt).max)
        w = np.clip(w, -fmax, fmax).astype(np.float32).astype(dt)
    w = w.copy()
    w[~np.isfinite(w.astype(np.float32))] = 0
    return w.reshape(rows, cols)


@given(data=st.data())
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_kernels_match_reference_hypothesis(data):
    dt = data.draw(st.sampled_from(DTYPES))
    w = draw_weight(data, dt)
    assert K.absmax(w) == R.tensor_absmax(w)
    if data.draw(st.booleans()):
        gs = None
    else:
        gs = np.float32(
            data.draw(st.floats(float(np.float32(1e-38)), float(np.float32(3e38)), width=32))
        )
    # numba's parallel launch costs milliseconds on a busy 2-core box: sample it
    modes = (False, True) if data.draw(st.integers(0, 9)) == 0 else (False,)
    check_kernels(w, gs, modes)
