"""`convert --calibrate`: GPTQ one decoder layer at a time (qstream/calibrate.py, qstream/gptq.py).

* the GPTQ grid is qstream's FP4 spec: with no input correlation (identity Hessian) GPTQ is
  exactly the reference encoder, byte for byte, for both schemes and scale searches;
* on the tiny Llama fixture: the output loads in transformers / compressed-tensors, its error
  on the calibration tokens is below round-to-nearest's, an interrupted pass resumes at the
  next layer with the same bytes, --threads 1 and 2 write the same bytes, ModelOpt gets the
  same codes and scales;
* an FP8 (block-scaled) source calibrates from its decoded weights;
* on SmolLM2 through the CLI: a few samples, output loads and beats round-to-nearest on a text
  it did not see; the calibration input statistics are written; clear errors for a missing
  extra, an unreadable or too short FILE.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from conftest import REPO, run_qstream  # noqa: E402
from qstream import calibrate  # noqa: E402
from qstream.convert import convert  # noqa: E402
from qstream.evaluate import evaluate  # noqa: E402
from qstream.gptq import gptq_quantize  # noqa: E402
from qstream.plan.plan import Options, make_plan  # noqa: E402
from qstream.schemes import reference  # noqa: E402
from qstream.sources.source import open_checkpoint  # noqa: E402
from qstream.writer import STAGING_DIR  # noqa: E402

PRIDE = REPO / "tests" / "data" / "pride_and_prejudice.txt"
ALICE = REPO / "tests" / "data" / "alice_in_wonderland.txt"


def _ids(n=6, length=48, seed=0, vocab=256):
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


def _run(src, dst, ids, *, threads=2, stop_after=None, resume=False, on_note=None, expert_budget=None, **opts):
    """calibrate + convert through the API (the CLI's own sequence); ``stop_after``: interrupt
    the pass after that layer; ``on_note``, ``expert_budget``: calibrate's."""
    plan = make_plan(open_checkpoint(src), Options(calibration=calibrate.calibration_key(ids), **opts))
    (dst / STAGING_DIR).mkdir(parents=True, exist_ok=True)

    def on_layer(i, n):
        if stop_after is not None and i == stop_after:
            raise KeyboardInterrupt

    kw = {"expert_budget": expert_budget} if expert_budget is not None else {}
    cal = calibrate.calibrate(plan, dst, ids, device="cpu", resume=resume, on_layer=on_layer, on_note=on_note, **kw)
    convert(plan, dst, threads=threads, calibrated=cal)
    return cal


def _shards(dst):
    return {p.name: p.read_bytes() for p in sorted(dst.glob("*.safetensors"))}


def _logits(path, ids):
    import warnings

    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    cfg = json.loads((path / "config.json").read_text())
    kw = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if "quantization_config" in cfg else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, **kw).eval()
    with torch.inference_mode():
        return torch.cat([torch.log_softmax(m(w.unsqueeze(0)).logits[0].float(), -1) for w in ids])


def _kl(ref, test):
    return float((ref.exp() * (ref - test)).sum(-1).mean())


@pytest.mark.parametrize("scheme", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("search", ["none", "mse"])
def test_identity_hessian_is_the_reference_encoder(scheme, search):
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((48, 256)) * 0.05).astype(np.float32)
    gs = reference.nvfp4_global_scale(reference.tensor_absmax(w), np.float32) if scheme == "nvfp4" else None
    packed, scale, q = gptq_quantize(torch.from_numpy(w), torch.eye(256), scheme, gs, search)
    if scheme == "nvfp4":
        want = reference.quantize_nvfp4(w, gs, search)
        dec = reference.dequantize_nvfp4(packed, scale, gs)
    else:
        want = reference.quantize_mxfp4(w, search)
        dec = reference.dequantize_mxfp4(packed, scale)
    assert np.array_equal(packed, want[0]) and np.array_equal(scale, want[1])
    assert np.array_equal(dec, q.numpy())  # the error feedback uses the values the decoder gives


@pytest.mark.parametrize("scheme", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gptq_loss_scale_choice_beats_plain_squared_error(monkeypatch, scheme, seed):
    """With --scale-search mse, GPTQ picks each group's scale by the GPTQ loss of its own pass
    (gptq._Grid._gptq_search). On correlated inputs that leaves a lower output error in the
    Hessian's norm, tr((W - Q) H (W - Q)^T), than choosing by the plain squared error of the
    group's current values (the kernels' search, what GPTQ did before)."""
    from qstream import gptq

    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((96, 256)) * 0.05).astype(np.float32)
    mix = rng.standard_normal((256, 256)).astype(np.float32) * 0.3 + np.eye(256, dtype=np.float32)
    x = rng.standard_normal((1024, 256)).astype(np.float32) @ mix * np.linspace(0.2, 3, 256).astype(np.float32)
    h = torch.from_numpy(x.T @ x / 1024 * 2)
    gs = reference.nvfp4_global_scale(reference.tensor_absmax(w), np.float32) if scheme == "nvfp4" else None

    def h_error(q):
        d = torch.from_numpy(w) - q
        return float(torch.einsum("ri,ij,rj->", d, h, d))

    new = h_error(gptq_quantize(torch.from_numpy(w), h, scheme, gs, "mse")[2])
    plain = gptq._Grid.scale
    monkeypatch.setattr(gptq._Grid, "scale", lambda self, wg, hinv=None, values=None: plain(self, wg))
    old = h_error(gptq_quantize(torch.from_numpy(w), h, scheme, gs, "mse")[2])
    assert new < old, (new, old)


@pytest.mark.parametrize("scheme", ["nvfp4", "mxfp4"])
def test_handed_over_hessian_gives_the_same_bytes(scheme):
    """calibrate hands each dense Linear's Hessian to GPTQ (Hessian.take, overwrite_hessian),
    which damps it in place on its diagonal and frees it as soon as it is factored. The bytes
    are those of the copying path, which leaves the caller's matrix as it was, and the factor
    is the one of H + d * I written out in full (the formula before the change), bit for bit;
    a dead input column (all zeros) is included."""
    from qstream import gptq

    rng = np.random.default_rng(7)
    w = (rng.standard_normal((64, 256)) * 0.05).astype(np.float32)
    x = rng.standard_normal((512, 256)).astype(np.float32) @ (np.eye(256, dtype=np.float32) + 0.2)
    x[:, 5] = 0.0
    hess = gptq.Hessian(256, torch.device("cpu"))
    hess.add(torch.from_numpy(x))
    gs = reference.nvfp4_global_scale(reference.tensor_absmax(w), np.float32) if scheme == "nvfp4" else None
    kept = hess.matrix()
    before = kept.clone()
    copied = gptq_quantize(torch.from_numpy(w), kept, scheme, gs, "mse")
    assert torch.equal(kept, before)  # overwrite_hessian=False: the caller's matrix untouched
    taken = gptq_quantize(torch.from_numpy(w), hess.take(), scheme, gs, "mse", overwrite_hessian=True)
    assert hess.h is None  # the accumulator was handed over
    for a, b in zip(copied[:2], taken[:2]):
        assert np.array_equal(a, b)
    assert torch.equal(copied[2], taken[2])
    H = before.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    full = H + gptq.DAMP * torch.mean(torch.diag(H)) * torch.eye(256)
    want = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(full)), upper=True)
    assert torch.equal(gptq._inverse_factor([H], gptq.DAMP), want)


@pytest.mark.parametrize("scheme", ["nvfp4", "mxfp4"])
def test_group_loss_is_the_row_by_row_loop(scheme):
    """gptq._group_loss (one scale candidate's GPTQ trial, columns over all rows at once) is,
    bit for bit, the row-by-row float32 loop it replaced: quantize column i, e = (w - q) /
    Hinv_ii, loss += e * e, w_j -= e * Hinv_ij for the later columns, in that order."""
    from qstream import gptq
    from qstream.schemes.kernels_common import _fp4, _round_bf16

    rng = np.random.default_rng(11)
    n = 16 if scheme == "nvfp4" else 32
    rows = 37
    G = (rng.standard_normal((rows, n)) * 0.05).astype(np.float32)
    Hinv = (np.triu(rng.standard_normal((n, n))) * 0.2 + np.eye(n) * 1.5).astype(np.float32)
    fac = (rng.uniform(0.004, 0.02, rows)).astype(np.float32)
    dec = fac.copy() if scheme == "nvfp4" else (1.0 / fac).astype(np.float32)
    values = np.concatenate([reference.FP4_VALUES, -reference.FP4_VALUES]).astype(np.float32)
    divide = scheme == "nvfp4"
    want = np.empty(rows, dtype=np.float32)
    for r in range(rows):
        w = G[r].copy()
        loss = np.float32(0.0)
        for i in range(n):
            c = _fp4(np.float32(w[i] / fac[r]) if divide else np.float32(w[i] * fac[r]))
            q = _round_bf16(np.float32(values[c] * dec[r]))
            e = np.float32(np.float32(w[i] - q) / Hinv[i, i])
            loss = np.float32(loss + np.float32(e * e))
            for j in range(i + 1, n):
                w[j] = np.float32(w[j] - np.float32(e * Hinv[i, j]))
        want[r] = loss
    got = gptq._group_loss(G, Hinv, fac, dec, values, divide)
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


@pytest.fixture(scope="module")
def tiny_runs(tiny_ckpt, tmp_path_factory):
    """GPTQ (scale search mse) and round-to-nearest outputs of the tiny fixture, per scheme."""
    root = tmp_path_factory.mktemp("calib")
    ids = _ids()
    out = {}
    for scheme in ("nvfp4", "mxfp4"):
        out[scheme, "gptq"] = root / f"{scheme}-gptq"
        out[scheme, "cal"] = _run(tiny_ckpt, out[scheme, "gptq"], ids, mlp=scheme)
        out[scheme, "rtn"] = root / f"{scheme}-rtn"
        convert(make_plan(open_checkpoint(tiny_ckpt), Options(mlp=scheme, scale_search="none")), out[scheme, "rtn"])
    out["ids"] = ids
    return out


@pytest.mark.parametrize("scheme", ["nvfp4", "mxfp4"])
def test_tiny_loads_and_beats_rtn(tiny_ckpt, tiny_runs, scheme):
    ids = tiny_runs["ids"]
    ref = _logits(tiny_ckpt, ids)
    gptq, rtn = _kl(ref, _logits(tiny_runs[scheme, "gptq"], ids)), _kl(ref, _logits(tiny_runs[scheme, "rtn"], ids))
    assert 0 < gptq < rtn, (gptq, rtn)
    cfg = json.loads((tiny_runs[scheme, "gptq"] / "config.json").read_text())
    assert cfg["quantization_config"]["format"] in ("nvfp4-pack-quantized", "mxfp4-pack-quantized")
    # the input statistics of every calibrated Linear, for W4A4 activation scales
    absmax = tiny_runs[scheme, "cal"].input_absmax()
    assert sorted(absmax) == sorted(f"model.layers.{i}.mlp.{n}" for i in range(3) for n in ("gate_proj", "up_proj",
                                                                                              "down_proj"))
    assert all(v > 0 for v in absmax.values())
    assert json.loads((tiny_runs[scheme, "gptq"] / STAGING_DIR / "calibration" / "input_absmax.json").read_text()) \
        == pytest.approx(absmax)


def test_resume_after_interrupt_gives_the_same_bytes(tiny_ckpt, tiny_runs, tmp_path):
    dst = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        _run(tiny_ckpt, dst, tiny_runs["ids"], mlp="nvfp4", stop_after=0)
    root = dst / STAGING_DIR / "calibration"
    assert (root / "layer-00000").is_dir() and not (root / "layer-00001").exists()
    done = []
    plan = make_plan(open_checkpoint(tiny_ckpt), Options(mlp="nvfp4",
                                                         calibration=calibrate.calibration_key(tiny_runs["ids"])))
    cal = calibrate.calibrate(plan, dst, tiny_runs["ids"], device="cpu", resume=True,
                              on_layer=lambda i, n: done.append(i))
    assert done == [1, 2]  # layer 0 was kept
    convert(plan, dst, calibrated=cal)
    assert _shards(dst) == _shards(tiny_runs["nvfp4", "gptq"])


def test_threads_do_not_change_the_bytes(tiny_ckpt, tiny_runs, tmp_path):
    _run(tiny_ckpt, tmp_path / "t1", tiny_runs["ids"], mlp="mxfp4", threads=1)
    assert _shards(tmp_path / "t1") == _shards(tiny_runs["mxfp4", "gptq"])  # written with --threads 2


def test_modelopt_writes_the_same_codes(tiny_ckpt, tiny_runs, tmp_path):
    from safetensors.torch import load_file

    _run(tiny_ckpt, tmp_path / "mo", tiny_runs["ids"], mlp="nvfp4", format="modelopt")
    ct = {k: v for p in (tiny_runs["nvfp4", "gptq"]).glob("*.safetensors") for k, v in load_file(p).items()}
    mo = {k: v for p in (tmp_path / "mo").glob("*.safetensors") for k, v in load_file(p).items()}
    name = "model.layers.1.mlp.down_proj"
    assert torch.equal(mo[name + ".weight"], ct[name + ".weight_packed"])
    assert torch.equal(mo[name + ".weight_scale"].view(torch.uint8), ct[name + ".weight_scale"].view(torch.uint8))


def test_fp8_block_source(tmp_path):
    """Qwen3 with 128x128 block FP8 weights: GPTQ from the decoded weights beats RTN on the
    calibration tokens (attention dequantized to BF16, as test_eval compares)."""
    from synth import write_qwen3_block_fp8

    src = write_qwen3_block_fp8(tmp_path / "fp8")
    ids = _ids(4, 64, seed=5)
    _run(src, tmp_path / "gptq", ids, mlp="nvfp4", attn="bf16")
    convert(make_plan(open_checkpoint(src), Options(mlp="nvfp4", attn="bf16", scale_search="none")), tmp_path / "rtn")
    flat = ids.reshape(-1)
    g = evaluate(tmp_path / "gptq", src, flat, ctx=64, device="cpu")
    r = evaluate(tmp_path / "rtn", src, flat, ctx=64, device="cpu")
    assert 0 < g.kld_mean < r.kld_mean, (g.kld_mean, r.kld_mean)


@pytest.fixture(scope="module")
def smollm2_gptq(smollm2_checkpoint, tmp_path_factory):
    dst = tmp_path_factory.mktemp("smol") / "nv"
    run_qstream("convert", smollm2_checkpoint, dst, "--mlp", "nvfp4", "--calibrate", PRIDE, "--calib-samples", "2",
                "--calib-seqlen", "256", "-q", check=True, timeout=1200)
    return dst


def test_smollm2_cli(smollm2_checkpoint, smollm2_gptq, tmp_path):
    import smollm2

    rtn = tmp_path / "rtn"
    run_qstream("convert", smollm2_checkpoint, rtn, "--mlp", "nvfp4", "--scale-search", "none", "-q", check=True)
    ids = smollm2.eval_tokens(smollm2.load_tokenizer(smollm2_checkpoint), 512)
    from qstream.evaluate import evaluate_text

    g = evaluate_text(smollm2_gptq, smollm2_checkpoint, ALICE, n_tokens=512, ctx=256, device="cpu")
    r = evaluate_text(rtn, smollm2_checkpoint, ALICE, n_tokens=512, ctx=256, device="cpu")
    assert 0 < g.kld_mean < r.kld_mean, (g.kld_mean, r.kld_mean)
    # transformers + compressed-tensors load it (dequantized) and it predicts like the source
    ref, out = _logits(smollm2_checkpoint, ids[:128].unsqueeze(0)), _logits(smollm2_gptq, ids[:128].unsqueeze(0))
    assert _kl(ref, out) < 0.5
    staging = smollm2_gptq / STAGING_DIR / "calibration"
    assert not list(staging.glob("layer-*"))  # per-layer results removed once the conversion finished
    assert len(json.loads((staging / "input_absmax.json").read_text())) == 90


def test_smollm2_cli_from_the_hub(smollm2_checkpoint, smollm2_gptq, tmp_path):
    """--calibrate with a Hub SRC (the local Hub-compatible server, real huggingface_hub
    client): the shards are downloaded whole before the pass, the tokenizer comes with the
    side files, and the output's weights are the local conversion's, byte for byte."""
    from hub_server import HubServer, hub_env

    with HubServer(tmp_path / "hubroot") as hub:
        hub.state.seed("org/smol", smollm2_checkpoint)
        env = hub_env(hub, tmp_path / "home")
        p = run_qstream("convert", "org/smol", tmp_path / "x", "--mlp", "nvfp4", "--calibrate", PRIDE, "--low-disk",
                        env=env)
        assert p.returncode == 2 and "--low-disk" in p.stderr and "Traceback" not in p.stderr, p.stderr
        dst = tmp_path / "out"
        p = run_qstream("convert", "org/smol", dst, "--mlp", "nvfp4", "--calibrate", PRIDE, "--calib-samples", "2",
                        "--calib-seqlen", "256", env=env, check=True, timeout=1200)
    assert "before the calibration pass" in p.stdout
    local = {f.name: f.read_bytes() for f in smollm2_gptq.glob("*.safetensors")}
    assert local and {f.name: f.read_bytes() for f in dst.glob("*.safetensors")} == local
    assert json.loads((dst / "config.json").read_text()) == json.loads((smollm2_gptq / "config.json").read_text())
    assert "base_model: org/smol" in (dst / "README.md").read_text()


def test_cli_errors(smollm2_checkpoint, tiny_ckpt, tmp_path):
    p = run_qstream("convert", smollm2_checkpoint, tmp_path / "a", "--mlp", "nvfp4", "--calibrate", tmp_path / "no.txt")
    assert p.returncode != 0 and "no.txt" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "a" / "config.json").exists()
    short = tmp_path / "short.txt"
    short.write_text("It is a truth universally acknowledged.")
    p = run_qstream("convert", smollm2_checkpoint, tmp_path / "b", "--mlp", "nvfp4", "--calibrate", short)
    assert p.returncode != 0 and "short.txt" in p.stderr and "--calib-samples" in p.stderr, p.stderr
    assert not (tmp_path / "b").exists()
    p = run_qstream("convert", smollm2_checkpoint, tmp_path / "c", "--mlp", "none", "--calibrate", PRIDE,
                    "--calib-samples", "1", "--calib-seqlen", "16")
    assert p.returncode != 0 and "nothing to calibrate" in p.stderr
    p = run_qstream("convert", tiny_ckpt, tmp_path / "d", "--calib-samples", "4")
    assert p.returncode != 0 and "--calibrate" in p.stderr


def test_missing_extra_is_one_sentence(smollm2_checkpoint, tmp_path):
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "torch.py").write_text("raise ImportError('No module named torch (test stand-in)')\n")
    p = run_qstream("convert", smollm2_checkpoint, tmp_path / "out", "--mlp", "nvfp4", "--calibrate", PRIDE,
                    env={"PYTHONPATH": f"{fake}:{REPO}"})
    assert p.returncode != 0 and "pip install 'qstream-convert[calibrate]'" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr and not (tmp_path / "out").exists()
    assert sys.modules.get("torch") is not None  # (this process is untouched)
