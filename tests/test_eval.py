"""`qstream eval`: the layer-by-layer figures equal those of both models loaded whole in
transformers (KL within 1% relative, perplexity within 0.1%), on the tiny fixture and on
SmolLM2; the CLI prints them as JSON; a run without `eval` never imports torch."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from conftest import REPO, run_qstream  # noqa: E402
from qstream.convert import convert  # noqa: E402
from qstream.evaluate import evaluate, windows  # noqa: E402
from qstream.plan.plan import Options, make_plan  # noqa: E402
from qstream.sources.source import open_checkpoint  # noqa: E402

TEXT = REPO / "tests" / "data" / "pride_and_prejudice.txt"


def _convert(src, dst, **opts):
    convert(make_plan(open_checkpoint(src), Options(**opts)), dst, threads=2)
    return dst


def _load(path):
    """A whole model in bf16 (a compressed-tensors output dequantized, as examples/smollm2.py
    loads it); a multimodal one (Mistral3) as transformers' image-text-to-text model."""
    import warnings

    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, CompressedTensorsConfig, Mxfp4Config

    cfg = json.loads((path / "config.json").read_text())
    kw = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if "quantization_config" in cfg else {}
    if cfg.get("quantization_config", {}).get("quant_method") == "mxfp4":  # gpt-oss's own MXFP4 blocks
        kw = {"quantization_config": Mxfp4Config(dequantize=True)}
    auto = AutoModelForImageTextToText if "vision_config" in cfg else AutoModelForCausalLM
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return auto.from_pretrained(str(path), dtype=torch.bfloat16, **kw).eval()


def _whole(src, dst, ids, ctx, prepare=None):
    """The same metrics with both models loaded whole in transformers (bf16, CT dequantized);
    ``prepare(model)`` adjusts the output's model first (W4A4: CT's activation QDQ)."""
    import smollm2

    ref, test = _load(src), _load(dst)
    if prepare is not None:
        prepare(test)
    kls, nll_ref, nll_test, agree, n = [], 0.0, 0.0, 0, 0
    for w in windows(ids, ctx):
        t = w[1:].unsqueeze(1)
        a = smollm2._window_logprobs(ref, w)
        b = smollm2._window_logprobs(test, w)
        nll_ref -= float(a.gather(1, t).double().sum())
        nll_test -= float(b.gather(1, t).double().sum())
        kls.append((a.exp() * (a - b)).sum(-1).double().numpy())
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        n += t.shape[0]
    kl = np.concatenate(kls)
    return {"kld_mean": kl.mean(), "kld_median": np.median(kl), "kld_p99": np.percentile(kl, 99),
            "ppl_source": math.exp(nll_ref / n), "ppl_output": math.exp(nll_test / n), "top1_agree": agree / n,
            "tokens": n}


def _assert_same(r, w, lossless: bool = False):
    assert r.tokens == w["tokens"]
    for k in ("kld_mean", "kld_median", "kld_p99"):
        assert getattr(r, k) == pytest.approx(w[k], rel=0.01), k
    for k in ("ppl_source", "ppl_output"):
        assert getattr(r, k) == pytest.approx(w[k], rel=0.001), k
    assert abs(r.top1_agree - w["top1_agree"]) <= 0.01
    if lossless:
        assert r.kld_p99 < 1e-6 and w["kld_p99"] < 1e-6 and r.top1_agree == 1.0
    else:
        assert r.kld_mean > 0 and r.kld_median <= r.kld_p99


@pytest.mark.parametrize("mlp", ["nvfp4", "mxfp4"])
def test_tiny_matches_whole_model(tiny_ckpt, tmp_path, mlp):
    dst = _convert(tiny_ckpt, tmp_path / mlp, mlp=mlp)
    ids = torch.randint(0, 256, (300,), generator=torch.Generator().manual_seed(0))
    r = evaluate(dst, tiny_ckpt, ids, ctx=128, device="cpu")
    _assert_same(r, _whole(tiny_ckpt, dst, ids, 128))
    assert r.windows == 3 and r.tokens == 127 + 127 + 43
    assert [d.layer for d in r.layers] == [0, 1, 2]
    assert all(0.9 < d.cosine < 1 and 0 < d.rel_error < 0.5 for d in r.layers)


def test_identical_model_has_no_drift(tiny_ckpt):
    ids = torch.arange(64) % 256
    r = evaluate(tiny_ckpt, tiny_ckpt, ids, ctx=32, device="cpu")
    assert r.kld_mean == 0 and r.kld_p99 == 0 and r.top1_agree == 1 and r.ppl_source == r.ppl_output
    assert all(d.rel_error == 0 and d.cosine == pytest.approx(1, abs=1e-6) for d in r.layers)


def test_modelopt_decodes_as_compressed_tensors(tiny_ckpt, tmp_path):
    ct = _convert(tiny_ckpt, tmp_path / "ct", mlp="nvfp4")
    mo = _convert(tiny_ckpt, tmp_path / "mo", mlp="nvfp4", format="modelopt")
    ids = torch.arange(100) * 7 % 256
    a, b = (evaluate(d, tiny_ckpt, ids, ctx=50, device="cpu") for d in (ct, mo))
    assert a.kld_mean > 0
    assert (a.kld_mean, a.ppl_output, a.top1_agree) == (b.kld_mean, b.ppl_output, b.top1_agree)


@pytest.fixture(scope="module")
def smollm2_outputs(smollm2_checkpoint, tmp_path_factory):
    """SmolLM2 converted once per scheme (default --scale-search) for this module."""
    root = tmp_path_factory.mktemp("smollm2-eval")
    made = {}

    def get(mlp):
        if mlp not in made:
            made[mlp] = _convert(smollm2_checkpoint, root / mlp, mlp=mlp)
        return made[mlp]
    return get


@pytest.mark.parametrize("mlp", ["nvfp4", "mxfp4"])
def test_smollm2_matches_whole_model(smollm2_checkpoint, smollm2_outputs, mlp):
    import smollm2

    dst = smollm2_outputs(mlp)
    ids = smollm2.eval_tokens(smollm2.load_tokenizer(smollm2_checkpoint), 512)
    r = evaluate(dst, smollm2_checkpoint, ids, ctx=256, device="cpu")
    _assert_same(r, _whole(smollm2_checkpoint, dst, ids, 256))
    assert len(r.layers) == 30 and r.layers[-1].rel_error > r.layers[0].rel_error


def test_cli_json(smollm2_checkpoint, smollm2_outputs):
    dst = smollm2_outputs("nvfp4")
    p = run_qstream("eval", dst, "--source", smollm2_checkpoint, "--text", TEXT, "--tokens", 256, "--ctx", 128,
                    "--json", check=True)
    out = json.loads(p.stdout)
    for k in ("kld_mean", "kld_median", "kld_p99", "ppl_source", "ppl_output", "top1_agree", "tokens", "layers"):
        assert k in out, k
    assert out["tokens"] == 254 and len(out["layers"]) == 30
    assert 0 < out["kld_mean"] < 1 and out["ppl_output"] > out["ppl_source"] > 1


def test_cli_errors(tiny_ckpt, tmp_path):
    p = run_qstream("eval", tiny_ckpt, "--source", tiny_ckpt, "--text", tmp_path / "missing.txt")
    assert p.returncode != 0 and "missing.txt" in p.stderr and "Traceback" not in p.stderr


def test_convert_never_imports_torch(tiny_ckpt, tmp_path):
    code = ("import sys; import qstream.cli as c; sys.argv = ['qstream', 'convert', sys.argv[1], sys.argv[2], "
            "'--mlp', 'nvfp4', '-q']\ntry:\n    c.run()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'torch imported'\nprint('ok')")
    p = subprocess.run([sys.executable, "-c", code, str(tiny_ckpt), str(tmp_path / "out")], capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0 and p.stdout.strip().endswith("ok"), p.stderr
    assert (tmp_path / "out" / "config.json").is_file()


def test_block_fp8_source(tmp_path):
    """Qwen3 with 128x128 block FP8 weights (partial edge blocks): the source is decoded as
    fp8 * scale; the whole-model reference is its BF16 twin (the same values) against the
    output with attention dequantized to BF16 (a single-scheme output CT can dequantize)."""
    from synth import write_qwen3_block_fp8

    src = write_qwen3_block_fp8(tmp_path / "fp8", twin=tmp_path / "twin")
    dst = _convert(src, tmp_path / "nv", mlp="nvfp4", attn="bf16")
    ids = torch.randint(0, 256, (200,), generator=torch.Generator().manual_seed(1))
    r = evaluate(dst, src, ids, ctx=100, device="cpu")
    _assert_same(r, _whole(tmp_path / "twin", dst, ids, 100))
    # the FP8 attention kept as it is (FP8 block weights in the output) decodes to the source's values
    kept = _convert(src, tmp_path / "kept", mlp="none")
    k = evaluate(kept, src, ids, ctx=100, device="cpu")
    assert k.kld_mean == 0 and all(d.rel_error == 0 for d in k.layers)


def test_mistral3_text_tower_fp8(tmp_path):
    """Mistral3 from Mistral's per-tensor FP8 layout: only the text model runs; against the
    BF16 twin loaded whole (Mistral3ForConditionalGeneration) and the output dequantized."""
    from synth import write_mistral3_fp8

    src = write_mistral3_fp8(tmp_path / "fp8", twin=tmp_path / "twin")
    dst = _convert(src, tmp_path / "nv", mlp="nvfp4", attn="bf16")
    ids = torch.randint(0, 256, (120,), generator=torch.Generator().manual_seed(2))
    r = evaluate(dst, src, ids, ctx=60, device="cpu")
    assert len(r.layers) == 2
    _assert_same(r, _whole(tmp_path / "twin", dst, ids, 60))


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen3_moe_fused", "mixtral"])
def test_moe_matches_whole_model(tmp_path, family):
    """MoE: each model routes with its own router; per-expert (and fused 3-D) experts are
    assembled into transformers' 3-D expert parameters."""
    from synth import mixtral_config, mixtral_tensors, qwen3_moe_config, qwen3_moe_tensors, write_checkpoint

    if family == "mixtral":
        cfg = mixtral_config()
        tensors = mixtral_tensors(cfg)
    else:
        cfg = qwen3_moe_config()
        tensors = qwen3_moe_tensors(cfg, fused=family.endswith("fused"))
    src = write_checkpoint(tmp_path / "src", cfg, tensors, n_shards=2)
    dst = _convert(src, tmp_path / "nv", mlp="nvfp4")
    ids = torch.randint(0, 256, (160,), generator=torch.Generator().manual_seed(3))
    r = evaluate(dst, src, ids, ctx=80, device="cpu")
    _assert_same(r, _whole(src, _ct_decompressed(dst, tmp_path / "deq"), ids, 80))
    assert r.kld_mean < 0.1


@pytest.mark.parametrize("source,mlp", [("bf16", "nvfp4"), ("mxfp4", "nvfp4"), ("bf16", "mxfp4")])
def test_gpt_oss_matches_whole_model(tmp_path, source, mlp):
    """gpt-oss: the per-expert NVFP4 output is assembled into gpt-oss's interleaved, input-major
    experts with their biases; its own MXFP4 blocks (the released layout, and the --mlp mxfp4
    output) are decoded as transformers decodes them. Reference: transformers with both models
    whole (an NVFP4 output decompressed by compressed-tensors and fused back into gpt-oss's
    layout; an MXFP4 one loaded by transformers itself)."""
    from synth import gpt_oss_config, gpt_oss_mxfp4_tensors, gpt_oss_tensors, write_checkpoint

    cfg = gpt_oss_config(mxfp4=source == "mxfp4")
    tensors = gpt_oss_mxfp4_tensors(cfg) if source == "mxfp4" else gpt_oss_tensors(cfg)
    src = write_checkpoint(tmp_path / "src", cfg, tensors, n_shards=2)
    dst = _convert(src, tmp_path / "out", mlp=mlp, allow_unloadable=mlp == "nvfp4")  # per expert: loads nowhere
    ids = torch.randint(0, 256, (160,), generator=torch.Generator().manual_seed(3))
    r = evaluate(dst, src, ids, ctx=80, device="cpu")
    # MXFP4 -> NVFP4 is exact here: each 32-block's power-of-two scale is an E4M3 scale of
    # both its 16-halves under the global scale, so both sides see no difference at all
    ref = _ct_decompressed(dst, tmp_path / "deq", gpt_oss=True) if mlp == "nvfp4" else dst
    _assert_same(r, _whole(src, ref, ids, 80), lossless=source == "mxfp4")
    assert r.kld_mean < 0.1


def _gpt_oss_fused(sd: dict) -> dict:
    """Per-expert gate/up/down Linears (and biases) back into gpt-oss's fused experts."""
    import re

    out = {k: v for k, v in sd.items() if not re.search(r"\.experts\.\d+\.", k)}
    for pre in sorted({k.split(".experts.")[0] for k in sd if re.search(r"\.experts\.\d+\.", k)}):
        p = pre + ".experts."
        E = 1 + max(int(k[len(p):].split(".")[0]) for k in sd if k.startswith(p))
        st = lambda f: torch.stack([f(e) for e in range(E)])  # noqa: E731
        out[p + "gate_up_proj"] = st(lambda e: torch.stack([sd[f"{p}{e}.gate_proj.weight"].T,
                                                           sd[f"{p}{e}.up_proj.weight"].T], -1).flatten(1))
        out[p + "gate_up_proj_bias"] = st(lambda e: torch.stack([sd[f"{p}{e}.gate_proj.bias"],
                                                                sd[f"{p}{e}.up_proj.bias"]], -1).flatten())
        out[p + "down_proj"] = st(lambda e: sd[f"{p}{e}.down_proj.weight"].T)
        out[p + "down_proj_bias"] = st(lambda e: sd[f"{p}{e}.down_proj.bias"])
    return out


def _ct_decompressed(dst, out, gpt_oss: bool = False):
    """transformers 5.23 cannot dequantize per-expert FP4 MoE outputs (it fuses experts into
    3-D parameters that compressed-tensors does not quantize: the loaded experts are garbage).
    As tests/test_moe.py does: compressed-tensors' own decompression of every module, saved as
    a BF16 checkpoint under the same names (transformers fuses the experts on load)."""
    from ct_reference import ct_decompress_nvfp4
    from safetensors.torch import load_file, save_file

    t = {}
    for f in sorted(dst.glob("*.safetensors")):
        t.update(load_file(str(f)))
    sd = {}
    for k, v in t.items():
        if k.endswith(".weight_packed"):
            m = k.removesuffix(".weight_packed")
            sd[m + ".weight"] = ct_decompress_nvfp4(v, t[m + ".weight_scale"], t[m + ".weight_global_scale"])
        elif not k.endswith((".weight_scale", ".weight_global_scale")):
            sd[k] = v
    if gpt_oss:
        sd = _gpt_oss_fused(sd)
    out.mkdir()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((dst / "config.json").read_text())
    cfg.pop("quantization_config")
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def test_convert_eval_writes_the_card(smollm2_checkpoint, tmp_path):
    text = tmp_path / "short.txt"
    text.write_text(TEXT.read_text(encoding="utf-8")[:1500], encoding="utf-8")
    dst = tmp_path / "out"
    p = run_qstream("convert", smollm2_checkpoint, dst, "--mlp", "nvfp4", "--eval", text, check=True)
    card = (dst / "README.md").read_text()
    assert card.count("## Quality against the source") == 1 and "short.txt" in card
    row = card.split("|---:|---:|---:|---:|---:|---:|\n")[1].splitlines()[0]
    kl_mean, _, _, ppl_src, ppl_out, top1 = (float(x) for x in row.strip("|").split("|"))
    assert 0 < kl_mean < 1 and ppl_out > ppl_src > 1 and 0.5 < top1 <= 1
    assert "--eval" not in card  # the recorded command is the conversion's own
    assert "KL mean" in p.stdout


def test_card_section_is_replaced_not_repeated(tmp_path):
    from qstream.evaluate import EvalResult, LayerDrift, write_card_section

    (tmp_path / "README.md").write_text("# model\n\ntext\n")
    r = EvalResult(0.1, 0.05, 0.9, 20.0, 22.0, 0.8, 100, 1, 101, [LayerDrift(0, 0.99, 0.1)], text="a.txt",
                   text_tokens=101)
    write_card_section(tmp_path, r)
    r.kld_mean = 0.2
    card = write_card_section(tmp_path, r).read_text()
    assert card.startswith("# model\n\ntext\n") and card.count("Quality against the source") == 1
    assert "| 0.2000 |" in card and "| 0.1000 |" not in card
