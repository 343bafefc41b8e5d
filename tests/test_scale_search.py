"""Scale search (``--scale-search``): what the searched output is, and that the runtime
reads it unchanged.

* compressed-tensors' own decompressor decodes search output bit for bit like qstream's
  decoder (reference.dequantize_*): the format did not change.
* Each block's searched error (the reference's measure) is <= its round-to-nearest
  error; "mse" <= "4over6" <= "none" on whole matrices; a block whose scale is the
  RTN scale is written byte for byte as by "none"; the candidates are the documented ones.
* The option through plan / CLI: validated per scheme, part of the fingerprint,
  deterministic over threads, the numpy reference path writes the same bytes.

Kernel == reference (bytes) for every mode is in test_schemes.py.
"""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest
import torch

from conftest import run_qstream

try:
    from ct_reference import ct_decompress_mxfp4, ct_decompress_nvfp4
except ImportError:  # tests/ imported as a package
    from tests.ct_reference import ct_decompress_mxfp4, ct_decompress_nvfp4
from qstream.schemes import kernels as K
from qstream.schemes import reference as R

BF16 = np.dtype(ml_dtypes.bfloat16)
E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
DTYPES = [BF16, np.dtype(np.float16), np.dtype(np.float32)]
DTYPE_IDS = ["bf16", "fp16", "fp32"]


def weights(dt, rows=64, cols=512, seed=0, heavy=False) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, cols)).astype(np.float32) * np.float32(0.02)
    if heavy:  # outliers and a spread of block magnitudes, like real weights
        w *= np.exp2(rng.integers(-6, 3, size=(rows, cols // 16, 1))).repeat(16, -1).reshape(rows, cols)
        w[rng.random((rows, cols)) < 0.002] *= 20
    return w.astype(dt)


def to_torch(a: np.ndarray) -> torch.Tensor:
    a = np.ascontiguousarray(a)
    return torch.from_numpy(a.copy())


def f32_bits(a) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(a, dtype=np.float32)).view(np.uint32)


def sq_err(w, dec) -> float:
    d = dec.astype(np.float64) - w.astype(np.float32).astype(np.float64)
    return float(np.sum(d * d))


def nv_rtn_code(w, gs):
    dt, g = R._groups(w, R.NVFP4_GROUP)
    amax = np.max(np.abs(g), axis=-1)
    return R._nvfp4_scale_values(amax, dt, gs).astype(E4M3).view(np.uint8), amax, dt, g


# ------------------------------------------------------------ the format is unchanged


@pytest.mark.parametrize("dt", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("search", ["4over6", "mse"])
def test_ct_decodes_nvfp4_search_output_like_qstream(dt, search):
    w = weights(dt, heavy=True)
    gs = R.nvfp4_global_scale(K.absmax(w), dt)
    packed, scale = K.quantize_nvfp4(w, gs, search)
    ours = R.dequantize_nvfp4(packed, scale, gs)
    ct = ct_decompress_nvfp4(torch.from_numpy(packed), torch.from_numpy(scale).view(torch.float8_e4m3fn),
                             torch.tensor([gs], dtype=torch.float32))
    assert ct.dtype == torch.bfloat16
    theirs = ct.float().numpy()
    assert np.array_equal(f32_bits(theirs), f32_bits(ours))
    assert not np.array_equal(scale, K.quantize_nvfp4(w, gs)[1]), "the search changed nothing"


@pytest.mark.parametrize("dt", DTYPES, ids=DTYPE_IDS)
def test_ct_decodes_mxfp4_search_output_like_qstream(dt):
    w = weights(dt, heavy=True)
    packed, scale = K.quantize_mxfp4(w, "mse")
    ours = R.dequantize_mxfp4(packed, scale)
    ct = ct_decompress_mxfp4(torch.from_numpy(packed), torch.from_numpy(scale))
    theirs = ct.float().numpy()
    assert np.array_equal(f32_bits(theirs), f32_bits(ours))
    assert not np.array_equal(scale, K.quantize_mxfp4(w)[1]), "the search changed nothing"


# ---------------------------------------------------------------- what is searched


@pytest.mark.parametrize("dt", DTYPES, ids=DTYPE_IDS)
def test_nvfp4_candidates_and_per_block_error(dt):
    w = weights(dt, rows=96, heavy=True, seed=1)
    gs = R.nvfp4_global_scale(K.absmax(w), dt)
    rtn_code, amax, dt_, g = nv_rtn_code(w, gs)
    norm = R._err_norm(amax)
    c6 = R._nvfp4_code(amax, dt_, gs, 6).astype(np.int64)
    c4r = R._nvfp4_code(amax, dt_, gs, 4).astype(np.int64)
    c4 = R._nvfp4_nonzero(c4r.astype(np.uint8)).astype(np.int64)
    rtn_err = R._nvfp4_error(g, rtn_code, gs, norm)
    rtn_packed = K.quantize_nvfp4(w, gs)[0]
    for search in ("4over6", "mse"):
        packed, code = K.quantize_nvfp4(w, gs, search)
        c = code.astype(np.int64)
        allowed = (c == rtn_code) | (c == c4)
        if search == "mse":
            allowed |= (c >= c6 + 1) & (c <= c6 + 6)
        assert allowed.all()
        err = R._nvfp4_error(g, code, gs, norm)
        assert np.all(err <= rtn_err)
        assert np.all((err < rtn_err) == (code != rtn_code))  # only a strict gain moves a block
        # a block that keeps the RTN code is written exactly as round-to-nearest writes it
        same = np.repeat(code == rtn_code, 8, axis=-1)
        assert np.array_equal(packed[same], rtn_packed[same])
        assert 0.05 < np.mean(code != rtn_code) < 0.9


@pytest.mark.parametrize("dt", DTYPES, ids=DTYPE_IDS)
def test_mxfp4_candidates_and_per_block_error(dt):
    w = weights(dt, rows=96, heavy=True, seed=2)
    rtn_packed, rtn_byte = K.quantize_mxfp4(w)
    packed, byte = K.quantize_mxfp4(w, "mse")
    assert np.all(np.abs(byte.astype(int) - rtn_byte.astype(int)) <= 1)
    dt_, g = R._groups(w, R.MXFP4_GROUP)
    norm = R._err_norm(np.max(np.abs(g), axis=-1))
    _, err = R._mx_candidate(g, dt_, byte.astype(np.int64), norm)
    _, rtn_err = R._mx_candidate(g, dt_, rtn_byte.astype(np.int64), norm)
    assert np.all(err <= rtn_err)
    assert np.all((err < rtn_err) == (byte != rtn_byte))
    same = np.repeat(byte == rtn_byte, 16, axis=-1)
    assert np.array_equal(packed[same], rtn_packed[same])
    assert 0.01 < np.mean(byte != rtn_byte) < 0.5


@pytest.mark.parametrize("dt", DTYPES, ids=DTYPE_IDS)
def test_search_lowers_the_decoded_error(dt):
    """Whole-matrix squared error of the decoded weights: mse <= 4over6 <= none, with
    the margins measured on real weights (benchmarks/RESULTS-quality.md: NVFP4 -26 to
    -30 %, MXFP4 -1.1 to -1.3 %) roughly reproduced on Gaussian weights."""
    w = weights(dt, rows=128, cols=1024, seed=3)
    gs = R.nvfp4_global_scale(K.absmax(w), dt)
    nv = {s: sq_err(w, R.dequantize_nvfp4(*K.quantize_nvfp4(w, gs, s), gs)) for s in R.SEARCH_MODES["nvfp4"]}
    mx = {s: sq_err(w, R.dequantize_mxfp4(*K.quantize_mxfp4(w, s))) for s in R.SEARCH_MODES["mxfp4"]}
    assert nv["mse"] < 0.8 * nv["none"]
    assert nv["mse"] < nv["4over6"] < 0.9 * nv["none"]
    assert mx["mse"] < 0.995 * mx["none"]


@pytest.mark.parametrize("dt", [BF16, np.dtype(np.float32)], ids=["bf16", "fp32"])
def test_mxfp4_plus_one_never_beats_rtn(dt):
    """The kernels skip the candidate b0 + 1 for bf16 / f32 blocks (kernels_mxfp4's
    _mxfp4_row_search says why it cannot win): the reference's own error of b0 + 1 is
    never below b0's, per block, on heavy-tailed weights and on blocks of every binade."""
    rng = np.random.default_rng(9)
    sweep = rng.standard_normal((600, 32)) * np.exp2(rng.integers(-140, 126, (600, 1)))
    sweep *= np.exp2(-rng.integers(0, 30, (600, 32)) * (rng.random((600, 32)) < 0.5))
    for w in (weights(dt, rows=96, heavy=True, seed=5), sweep.astype(np.float32).astype(dt)):
        _, rtn = R.quantize_mxfp4(w)
        dt_, g = R._groups(w, R.MXFP4_GROUP)
        norm = R._err_norm(np.max(np.abs(g), axis=-1))
        b0 = rtn.astype(np.int64)
        ok = b0 <= 253
        _, e0 = R._mx_candidate(g, dt_, b0, norm)
        _, e1 = R._mx_candidate(g, dt_, np.minimum(b0 + 1, 254), norm)
        assert np.all(e1[ok] >= e0[ok])
        assert np.mean(e1[ok] > e0[ok]) > 0.9


@pytest.mark.parametrize("gs", [np.float32(448 * 6 / 3.0), np.float32(1024.0)], ids=["gs896", "gs1024"])
@pytest.mark.parametrize("dt", DTYPES, ids=DTYPE_IDS)
def test_nvfp4_search_at_the_fp4_thresholds(dt, gs):
    """Blocks made of the values where a candidate's FP4 index steps (the least float32
    reaching each index under each of the 8 candidate scales, and the float just below),
    for f32 exactly, for bf16 / fp16 their nearest values: the kernels' table search (an
    index from two compares per lane) chooses every block's code as the reference does,
    where a tie read the wrong way moves the error of the lanes it touches. A power-of-two
    global scale makes the odd-index ties (x / sc == 0.75, 1.75, 3.5) exact in every
    dtype."""
    from qstream.schemes import kernels_nvfp4 as KN

    rng = np.random.default_rng(11)
    tg = np.empty(128 * 80, np.float32)
    dg = np.empty(128 * 80, np.float32)
    assert KN._nv_tables(gs, KN._E4M3_VALUES, KN._NV_TAU, KN._NV_MAG, tg, dg)
    rows = []
    while len(rows) < 4096:
        amax = np.float32(rng.uniform(0.01, 3.0))
        amax = np.float32(amax.astype(dt))
        c6 = int(R._nvfp4_code(np.array([amax]), dt, gs, 6)[0])
        if not 8 <= c6 <= 0x76:
            continue
        cand = tg[c6 * 80 + 24: c6 * 80 + 80]  # T_1 .. T_7 of the codes c6 .. c6 + 7
        pool = np.concatenate([cand, np.nextafter(cand, np.float32(0))]).astype(np.float32)
        pool = pool[(pool > 0) & (pool < amax)]
        pool = pool.astype(dt).astype(np.float32)
        pool = pool[(pool > 0) & (pool < amax)]
        if pool.size == 0:
            continue
        row = rng.choice(pool, 16) * rng.choice(np.float32([-1, 1]), 16)
        row[rng.integers(16)] = amax * rng.choice([-1, 1])
        rows.append(row)
    w = np.array(rows, np.float32).reshape(256, 256).astype(dt)
    for search in ("4over6", "mse"):
        packed, code = K.quantize_nvfp4(w, gs, search)
        ref_packed, ref_code = R.quantize_nvfp4(w, gs, search)
        assert np.array_equal(code, ref_code), search
        assert np.array_equal(packed, ref_packed), search
        assert np.mean(code != K.quantize_nvfp4(w, gs)[1]) > 0.05  # the search moves blocks here


def test_mxfp4_search_reaches_the_format_optimum():
    """For MXFP4 the best codes for a given exponent are the nearest ones, so the
    format's least-squares block is the best exponent: no exponent two or three steps
    away does better than the searched one (on weights where +-1 does help)."""
    w = weights(BF16, rows=64, heavy=True, seed=4)
    _, byte = K.quantize_mxfp4(w, "mse")
    dt_, g = R._groups(w, R.MXFP4_GROUP)
    norm = R._err_norm(np.max(np.abs(g), axis=-1))
    _, best = R._mx_candidate(g, dt_, byte.astype(np.int64), norm)
    for d in (-3, -2, 2, 3):
        _, err = R._mx_candidate(g, dt_, np.clip(byte.astype(np.int64) + d, 0, 254), norm)
        assert np.all(best <= err)


def test_edge_blocks():
    """Zero blocks, -0.0, tiny blocks whose RTN E4M3 scale underflows (0 -> 0x20) and
    blocks at the tensor max (scale clamped at 448) stay valid and no worse than RTN."""
    rng = np.random.default_rng(5)
    w = rng.standard_normal((6, 64)).astype(np.float32)
    w[0] = 0.0
    w[1] = -0.0
    w[2, :16] = 1e-4 * np.linspace(0.5, 1, 16)  # far below the tensor max: RTN scale code 0 -> 0x20
    w[3, :16] = 50.0 * np.linspace(-1, 1, 16)  # the tensor max block
    w = w.astype(BF16)
    gs = R.nvfp4_global_scale(K.absmax(w), BF16)
    rtn = R.dequantize_nvfp4(*K.quantize_nvfp4(w, gs), gs)
    for search in ("4over6", "mse"):
        packed, scale = K.quantize_nvfp4(w, gs, search)
        assert np.array_equal(packed, R.quantize_nvfp4(w, gs, search)[0])
        dec = R.dequantize_nvfp4(packed, scale, gs)
        assert np.all(np.isfinite(dec))
        assert sq_err(w[:4], dec[:4]) <= sq_err(w[:4], rtn[:4])
        assert np.all(dec[0] == 0) and np.all(dec[1] == 0)
    assert K.quantize_nvfp4(w, gs)[1][2, 0] == 0x20
    assert K.quantize_nvfp4(w, gs, "mse")[1][2, 0] != 0x20  # the tiny block gets a usable scale
    packed, byte = K.quantize_mxfp4(w, "mse")
    assert np.all(R.dequantize_mxfp4(packed, byte)[:2] == 0)


def test_bad_mode():
    w = weights(BF16, rows=2, cols=32)
    for q in (K.quantize_mxfp4, R.quantize_mxfp4):
        with pytest.raises(ValueError, match="4over6"):
            q(w, "4over6")
    for q in (K.quantize_nvfp4, R.quantize_nvfp4):
        with pytest.raises(ValueError, match="exhaustive"):
            q(w, np.float32(1.0), "exhaustive")


# ------------------------------------------------------------------ through the CLI


def _decoded(dst, scheme):
    from safetensors.torch import load_file as load_torch

    out = {}
    for f in sorted(dst.glob("*.safetensors")):
        out.update(load_torch(str(f)))
    res = {}
    for name in out:
        if name.endswith(".weight_packed"):
            m = name.removesuffix(".weight_packed")
            packed, scale = out[name].numpy(), out[m + ".weight_scale"].view(torch.uint8).numpy()
            if scheme == "nvfp4":
                res[m] = R.dequantize_nvfp4(packed, scale, out[m + ".weight_global_scale"].numpy()[0])
            else:
                res[m] = R.dequantize_mxfp4(packed, scale)
    return res


def _source(src):
    import torch as _t
    from safetensors.torch import load_file as load_torch

    out = {}
    for f in sorted(src.glob("*.safetensors")):
        for k, v in load_torch(str(f)).items():
            out[k] = v.to(_t.float32).numpy()
    return out


@pytest.mark.parametrize("scheme", ["nvfp4", "mxfp4"])
def test_convert_with_search(tiny_ckpt, tmp_path, scheme):
    src = _source(tiny_ckpt)
    errs = {}
    for search in R.SEARCH_MODES[scheme]:
        dst = tmp_path / search
        run_qstream("convert", tiny_ckpt, dst, "--mlp", scheme, "--scale-search", search, "-q", check=True)
        cfg = json.loads((dst / "config.json").read_text())
        assert cfg["quantization_config"]["format"] == f"{scheme}-pack-quantized"  # same format
        dec = _decoded(dst, scheme)
        assert dec
        errs[search] = sum(sq_err(src[m + ".weight"], d) for m, d in dec.items())
    assert errs["mse"] < errs["none"]
    # another thread count, and the numpy reference, write the same bytes
    again = tmp_path / "again"
    run_qstream("convert", tiny_ckpt, again, "--mlp", scheme, "--scale-search", "mse", "--threads", "1", "-q",
                check=True, env={"QSTREAM_KERNELS": "reference"})
    for f in sorted((tmp_path / "mse").glob("*.safetensors")):
        assert f.read_bytes() == (again / f.name).read_bytes()


def test_cli_validates_and_fingerprints(tiny_ckpt, tmp_path):
    p = run_qstream("inspect", tiny_ckpt, "--mlp", "mxfp4", "--scale-search", "4over6")
    assert p.returncode == 2
    assert "4over6" in p.stderr and "mxfp4" in p.stderr and "none, mse" in p.stderr
    assert run_qstream("inspect", tiny_ckpt, "--mlp", "nvfp4", "--scale-search", "4over6").returncode == 0
    assert run_qstream("inspect", tiny_ckpt, "--mlp", "nvfp4", "--scale-search", "best").returncode == 2
    assert "--scale-search" in run_qstream("convert", "--help").stdout

    from qstream.plan.plan import Options, make_plan
    from qstream.sources.source import open_checkpoint

    ck = open_checkpoint(str(tiny_ckpt))
    fps = {s: make_plan(ck, Options(mlp="nvfp4", scale_search=s)).fingerprint() for s in R.SEARCH_MODES["nvfp4"]}
    assert len(set(fps.values())) == 3  # --resume refuses to mix modes
