"""`convert --calibrate` of mixture-of-experts models (qstream/calib_experts.py).

On tiny Mixtral (per-expert w1/w3/w2 checkpoint, one expert of layer 1 that no token is
routed to), Qwen3-MoE (fused 3-D experts in the checkpoint) and DeepSeek-V3 (a dense first
layer, shared experts, routed experts):

* the output decodes with compressed-tensors and loads in transformers (which fuses the
  per-expert weights back), its logits close to the source's;
* every routed expert's output error on the tokens the source model routes to it (the
  calibration windows) is below the data-free conversion's, expert by expert;
* an expert no token reaches is said in the log and written exactly as data-free;
* --threads 1 and 2, and holding one expert's Hessians at a time (one pass per expert),
  write the same bytes.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from synth import (byte_tokenizer, deepseek_v3_config, deepseek_v3_tensors, mixtral_config,  # noqa: E402
                   mixtral_with_dead_expert, qwen3_moe_config, qwen3_moe_tensors, write_checkpoint)
from test_calibrate import _ids, _run, _shards  # noqa: E402
from test_convert import load_dir, raw  # noqa: E402
from test_moe import _dequantized_checkpoint  # noqa: E402

from qstream.convert import convert  # noqa: E402
from qstream.plan.plan import Options, make_plan  # noqa: E402
from qstream.sources.source import open_checkpoint  # noqa: E402
from qstream.writer import STAGING_DIR  # noqa: E402

DEAD = "model.layers.1.block_sparse_moe.experts.3"


FAMILIES = {  # config, weights, their options, scheme, routed experts that get tokens
    "mixtral": (mixtral_config, mixtral_with_dead_expert, {}, "nvfp4", 7),  # 2 MoE layers x 4, one dead
    "qwen3_moe_fused": (qwen3_moe_config, qwen3_moe_tensors, {"fused": True}, "mxfp4", 8),
    "deepseek_v3": (deepseek_v3_config, deepseek_v3_tensors, {}, "nvfp4", 4),  # layer 0 is dense
}


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    """Per family: the source, its GPTQ output (--threads 2), its data-free output (the
    default scale search, what the calibrated run is compared with) and the notes."""
    root = tmp_path_factory.mktemp("calib-moe")
    ids = _ids(6, 48)
    out = {"ids": ids}
    for name, (cfg_fn, t_fn, kw, scheme, _) in FAMILIES.items():
        cfg = cfg_fn()
        src = write_checkpoint(root / name / "src", cfg, t_fn(cfg, **kw), n_shards=2)
        notes: list[str] = []
        cal = _run(src, root / name / "gptq", ids, mlp=scheme, on_note=notes.append)
        convert(make_plan(open_checkpoint(src), Options(mlp=scheme)), root / name / "df")
        out[name] = {"src": src, "gptq": root / name / "gptq", "df": root / name / "df", "cal": cal,
                     "notes": notes, "scheme": scheme}
    return out


def _load(path):
    import warnings

    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16).eval()


def _decoded_model(dst, scheme, folder):
    """DST decoded by compressed-tensors' own decompressors, saved per expert as DST names
    them, and loaded by transformers (its conversion mapping fuses the experts back)."""
    from safetensors.torch import save_file

    folder.mkdir()
    sd = _dequantized_checkpoint(dst, scheme)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg.pop("quantization_config")["format"] == f"{scheme}-pack-quantized"
    (folder / "config.json").write_text(json.dumps(cfg))
    return _load(folder)


def _experts_modules(model):
    return {n: m for n, m in model.named_modules() if getattr(m, "gate_up_proj", None) is not None}


def _expert_errors(src_model, models, ids):
    """{(experts module, expert): [relative squared output error of each model in ``models``]}
    on the tokens the source model routes to each expert over the windows ``ids``; the
    experts' outputs in float32 from each model's own (decoded) fused weights."""
    routed: dict[str, list] = {}
    handles = []
    for name, m in _experts_modules(src_model).items():
        def hook(mod, args, name=name):
            routed.setdefault(name, []).append((args[0].reshape(-1, args[0].shape[-1]).float(), args[1]))
        handles.append(m.register_forward_pre_hook(hook))
    with torch.inference_mode():
        for w in ids:
            src_model(w.unsqueeze(0))
    for h in handles:
        h.remove()
    others = [_experts_modules(m) for m in models]
    out: dict = {}
    src_mods = _experts_modules(src_model)
    for name, calls in routed.items():
        x_all = torch.cat([c[0] for c in calls])
        idx = torch.cat([c[1] for c in calls])
        for e in range(src_mods[name].gate_up_proj.shape[0]):
            x = x_all[(idx == e).any(-1)]
            if len(x) == 0:
                out[name, e] = None
                continue

            def f(mod):
                gu, dn = mod.gate_up_proj[e].float(), mod.down_proj[e].float()
                return torch.nn.functional.linear(mod._apply_gate(torch.nn.functional.linear(x, gu)), dn)

            with torch.inference_mode():
                ref = f(src_mods[name])
                out[name, e] = [float(((f(o[name]) - ref) ** 2).sum() / (ref ** 2).sum()) for o in others]
    return out


@pytest.mark.parametrize("name", list(FAMILIES))
def test_loads_and_every_expert_beats_data_free(moe, tmp_path, name):
    r = moe[name]
    src_model = _load(r["src"])
    gptq = _decoded_model(r["gptq"], r["scheme"], tmp_path / "gptq")
    df = _decoded_model(r["df"], r["scheme"], tmp_path / "df")
    ids = moe["ids"]
    with torch.inference_mode():  # loads and predicts like the source
        la, lb = src_model(ids[:2]).logits.float(), gptq(ids[:2]).logits.float()
    assert torch.nn.functional.cosine_similarity(la.flatten(), lb.flatten(), dim=0) > 0.95
    errors = _expert_errors(src_model, [gptq, df], ids)
    live = {k: v for k, v in errors.items() if v is not None}
    assert len(live) == FAMILIES[name][4], errors
    for k, (g, d) in live.items():
        assert 0 < g < d, (k, g, d)
    print(f"{name}:", "; ".join(f"{q.split('.')[2]}.{e} {g:.5f}/{d:.5f}" for (q, e), (g, d) in live.items()))


def test_dead_expert_is_data_free_and_said(moe):
    r = moe["mixtral"]
    dead = [f"{DEAD}.{p}" for p in ("w1", "w2", "w3")]
    assert sorted(r["cal"].data_free) == dead
    assert len(r["notes"]) == 1 and "expert 3 of model.layers.1.mlp.experts" in r["notes"][0] \
        and "data-free" in r["notes"][0], r["notes"]
    assert "input scales" not in r["notes"][0]  # weight-only: no activation scale to speak of
    g, d = load_dir(r["gptq"]), load_dir(r["df"])
    for m in dead:  # exactly the data-free bytes; every other expert of the layer is GPTQ's
        for k in ("weight_packed", "weight_scale", "weight_global_scale"):
            assert raw(g[f"{m}.{k}"]) == raw(d[f"{m}.{k}"]), (m, k)
    other = "model.layers.1.block_sparse_moe.experts.2.w2"
    assert raw(g[f"{other}.weight_packed"]) != raw(d[f"{other}.weight_packed"])
    assert not any(n.startswith(DEAD) for n in r["cal"].input_absmax())
    for name in ("qwen3_moe_fused", "deepseek_v3"):
        assert moe[name]["notes"] == [] and moe[name]["cal"].data_free == []
    # DeepSeek: the dense first layer and the shared experts are GPTQ'd as the Linears they are
    got = sorted(moe["deepseek_v3"]["cal"].input_absmax())
    want = [f"model.layers.0.mlp.{p}" for p in ("down_proj", "gate_proj", "up_proj")] + sorted(
        f"model.layers.1.mlp.{m}.{p}" for m in ("experts.0", "experts.1", "experts.2", "experts.3", "shared_experts")
        for p in ("gate_proj", "up_proj", "down_proj"))
    assert got == want


def test_threads_and_expert_passes_do_not_change_the_bytes(moe, tmp_path):
    r = moe["mixtral"]
    _run(r["src"], tmp_path / "t1", moe["ids"], mlp=r["scheme"], threads=1, expert_budget=1)
    assert _shards(tmp_path / "t1") == _shards(r["gptq"])


def test_expert_hessians_are_its_routed_tokens(moe):
    """Layer 0 of Mixtral (its inputs are the embeddings, before any quantized layer): each
    expert's codes are GPTQ's from the Hessian of exactly the tokens transformers' router sends
    it (gate/up: their hidden states; down: act(gate) * up of them, as the experts' eager
    forward computes it), captured here on the source model loaded whole."""
    from qstream.gptq import Hessian, gptq_quantize

    r = moe["mixtral"]
    model = _load(r["src"])
    experts = model.model.layers[0].mlp.experts
    seen = []
    h = experts.register_forward_pre_hook(lambda m, a: seen.append((a[0].reshape(-1, a[0].shape[-1]), a[1])))
    with torch.inference_mode():
        for w in moe["ids"]:
            model(w.unsqueeze(0))
    h.remove()
    src, out = load_dir(r["src"]), load_dir(r["gptq"])
    for e in (0, 2):
        hin, hdown = Hessian(64, torch.device("cpu")), Hessian(96, torch.device("cpu"))
        with torch.inference_mode():
            for x, idx in seen:
                xe = x[(idx == e).any(-1)]
                hin.add(xe)
                gate, up = torch.nn.functional.linear(xe, experts.gate_up_proj[e]).chunk(2, dim=-1)
                hdown.add(experts.act_fn(gate) * up)
        assert 0 < hin.n < 6 * 48  # routed tokens only
        for proj, hess in (("w1", hin), ("w3", hin), ("w2", hdown)):
            m = f"model.layers.0.block_sparse_moe.experts.{e}.{proj}"
            gs = np.float32(out[f"{m}.weight_global_scale"].item())
            packed, scale, _ = gptq_quantize(src[f"{m}.weight"].float(), hess.matrix(), "nvfp4", gs, "mse")
            assert np.array_equal(packed, out[f"{m}.weight_packed"].numpy()), m
            assert np.array_equal(scale, out[f"{m}.weight_scale"].view(torch.uint8).numpy()), m


def test_cli_mixtral(tmp_path):
    """The command itself on Mixtral, NVFP4 W4A4: the dead expert is said on stderr, the rest
    is GPTQ'd; every expert gets its input global scale from the tokens routed to it (CT's
    gparam of the recorded absmax), the dead one the largest of its layer's other experts'."""
    from compressed_tensors.quantization.utils.helpers import generate_gparam

    from conftest import run_qstream
    from test_calibrate import PRIDE

    from qstream.schemes import act_scales

    cfg = mixtral_config()
    src = write_checkpoint(tmp_path / "src", cfg, mixtral_with_dead_expert(cfg), n_shards=2)
    byte_tokenizer(src)
    dst = tmp_path / "out"
    p = run_qstream("convert", src, dst, "--mlp", "nvfp4", "--activations", "nvfp4", "--calibrate", PRIDE,
                    "--calib-samples", "4", "--calib-seqlen", "64", "-q", check=True)
    assert "note:" in p.stderr and "expert 3 of model.layers.1.mlp.experts (w1, w2, w3)" in p.stderr, p.stderr
    assert "its NVFP4 input scales are its layer's largest for the same projection" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr and (dst / "config.json").is_file()
    absmax = json.loads((dst / STAGING_DIR / "calibration" / "input_absmax.json").read_text())
    assert len(absmax) == 3 * 7 and not any(k.startswith(DEAD) for k in absmax)  # 7 live experts x 3
    t = load_dir(dst)
    for L in range(2):
        for e in range(4):
            for w in ("w1", "w2", "w3"):
                m = f"model.layers.{L}.block_sparse_moe.experts.{e}.{w}"
                if m.startswith(DEAD):
                    a = max(v for k, v in absmax.items() if k.startswith(f"model.layers.{L}.") and k.endswith(f".{w}"))
                else:
                    a = max(absmax[m.replace(w, x)] for x in (("w1", "w3") if w != "w2" else ("w2",)))
                a = torch.tensor([act_scales.recorded_amax(a)], dtype=torch.float32)
                assert torch.equal(t[m + ".input_global_scale"], generate_gparam(-a, a)), m
    assert not [k for k in t if k.endswith("input_global_scale") and (".gate." in k or ".self_attn." in k)]


def test_resume_mid_moe(moe, tmp_path):
    """Interrupted after layer 0, resumed: the same bytes as the run in one go."""
    from qstream import calibrate

    r = moe["qwen3_moe_fused"]
    dst = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        _run(r["src"], dst, moe["ids"], mlp=r["scheme"], stop_after=0)
    plan = make_plan(open_checkpoint(r["src"]), Options(mlp=r["scheme"],
                                                        calibration=calibrate.calibration_key(moe["ids"])))
    done = []
    cal = calibrate.calibrate(plan, dst, moe["ids"], device="cpu", resume=True, on_layer=lambda i, n: done.append(i))
    assert done == [1]
    convert(plan, dst, calibrated=cal)
    assert _shards(dst) == _shards(r["gptq"])


def test_gpt_oss_is_refused_before_any_work(tmp_path):
    """gpt-oss's experts (interleaved gate/up, input-major, biases, clamped activation) are not
    calibrated: one sentence naming the module, nothing written."""
    from qstream import calibrate
    from qstream.errors import QStreamError
    from synth import gpt_oss_config, gpt_oss_tensors

    cfg = gpt_oss_config()
    src = write_checkpoint(tmp_path / "src", cfg, gpt_oss_tensors(cfg), n_shards=1)
    ids = _ids(2, 16)
    plan = make_plan(open_checkpoint(src), Options(mlp="mxfp4", calibration=calibrate.calibration_key(ids)))
    with pytest.raises(QStreamError, match=r"model\.layers\.0\.mlp\.experts \(GptOssExperts\).*without --calibrate"):
        calibrate.calibrate(plan, tmp_path / "out", ids, device="cpu")
    assert not (tmp_path / "out").exists()
