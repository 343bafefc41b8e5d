"""Mixture-of-experts: Mixtral, Qwen3-MoE (per-expert and fused 3-D), DeepSeek-V3,
gpt-oss (BF16 fused, and MXFP4 blocks repacked without rounding)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import run_qstream
from ct_reference import ct_decompress_mxfp4, ct_decompress_nvfp4, ct_mxfp4, ct_nvfp4
from synth import (deepseek_v3_config, deepseek_v3_tensors, gpt_oss_config, gpt_oss_mxfp4_tensors, gpt_oss_tensors,
                   mixtral_config, mixtral_tensors, qwen3_moe_config, qwen3_moe_tensors, write_checkpoint)
from test_convert import ignored, load_dir, raw

IDS = torch.tensor([[1, 17, 33, 200, 5, 9, 77, 120], [3, 3, 250, 41, 8, 19, 64, 2]])

MODELS = {
    "mixtral": (mixtral_config, mixtral_tensors, {}),
    "qwen3_moe": (qwen3_moe_config, qwen3_moe_tensors, {}),
    "qwen3_moe_fused": (qwen3_moe_config, qwen3_moe_tensors, {"fused": True}),
    "deepseek_v3": (deepseek_v3_config, deepseek_v3_tensors, {}),
    "gpt_oss": (gpt_oss_config, gpt_oss_tensors, {}),
}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    out = {}
    for name, (cfg_fn, t_fn, kw) in MODELS.items():
        cfg = cfg_fn()
        out[name] = write_checkpoint(root / name, cfg, t_fn(cfg, **kw), n_shards=2)
    cfg = gpt_oss_config(mxfp4=True)
    out["gpt_oss_mxfp4"] = write_checkpoint(root / "gpt_oss_mxfp4", cfg, gpt_oss_mxfp4_tensors(cfg), n_shards=2)
    return out


def expected_linears(name: str, src: dict[str, torch.Tensor], cfg: dict) -> dict[str, torch.Tensor]:
    """module -> the 2-D [out, in] weight it must hold, from the source tensors."""
    lin = {}
    for k, v in src.items():
        if k.endswith(".weight") and v.ndim == 2 and re.search(r"\.(mlp|block_sparse_moe)\.(experts|shared_experts|gate_proj|up_proj|down_proj)", k):
            lin[k.removesuffix(".weight")] = v
        m = re.match(r"(.*\.experts)\.(gate_up_proj|down_proj)$", k)
        if m and v.ndim == 3:
            prefix, kind = m.groups()
            for e in range(v.shape[0]):
                if name == "gpt_oss":  # [E, H, 2I] input-major, gate/up interleaved
                    w = v[e].T
                    parts = {"gate_proj": w[0::2], "up_proj": w[1::2]} if kind == "gate_up_proj" else {"down_proj": w}
                else:  # [E, 2I, H], gate then up
                    half = v.shape[1] // 2
                    parts = {"gate_proj": v[e, :half], "up_proj": v[e, half:]} if kind == "gate_up_proj" else {"down_proj": v[e]}
                for proj, w2 in parts.items():
                    lin[f"{prefix}.{e}.{proj}"] = w2.contiguous()
    return lin


def partner_sets(modules: list[str]) -> list[list[str]]:
    sets: dict[str, list[str]] = {}
    for m in modules:
        k = re.sub(r"\.(gate_proj|up_proj|w1|w3)$", "", m)
        if k != m:
            sets.setdefault(k, []).append(m)
    return [v for v in sets.values() if len(v) == 2]


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("scheme", ["nvfp4", "mxfp4"])
def test_moe_bytes_routers_and_shared_scales(sources, tmp_path, name, scheme):
    src_dir = sources[name]
    dst = tmp_path / "out"
    force = ["--allow-unloadable"] if name == "gpt_oss" and scheme == "nvfp4" else []  # per expert: loads nowhere
    run_qstream("convert", src_dir, dst, "--mlp", scheme, "--scale-search", "none", "-q", *force, check=True)
    src, out = load_dir(src_dir), load_dir(dst)
    cfg = json.loads((src_dir / "config.json").read_text())
    if name == "gpt_oss" and scheme == "mxfp4":  # OpenAI's stacked layout: the same codes, stacked
        out = _openai_as_per_expert(out, src)
    lin = expected_linears(name, src, cfg)
    assert lin, "fixture has MLP linears"
    sets = partner_sets(list(lin))
    partner_of = {m: [p for p in s if p != m] for s in sets for m in s}
    for module, w in lin.items():
        ref = ct_nvfp4(w, [lin[p] for p in partner_of.get(module, [])]) if scheme == "nvfp4" else ct_mxfp4(w)
        for k, v in ref.items():
            assert raw(out[f"{module}.{k}"]) == raw(v), f"{module}.{k}"
        assert f"{module}.weight" not in out
    if scheme == "nvfp4":  # every fused partner set shares one global scale
        assert sets
        for s in sets:
            vals = {out[f"{m}.weight_global_scale"].item() for m in s}
            assert len(vals) == 1, s
    # routers, router biases, score corrections: never quantized, byte-identical, ignored
    qc = json.loads((dst / "config.json").read_text())["quantization_config"]
    routers = [k for k in src if re.search(r"\.(gate|router)\.(weight|bias|e_score_correction_bias)$", k)]
    assert routers
    for k in routers:
        assert raw(out[k]) == raw(src[k]), k
        if k.endswith(".weight"):
            assert ignored(qc, k.removesuffix(".weight")) if "ignore" in qc else \
                "model.layers.*.mlp.router" in qc["modules_to_not_convert"]
    # fused 3-D tensors are never left silently: they are split, nothing else remains
    assert not [k for k, v in out.items() if v.ndim == 3]


def _dequantized_checkpoint(dst: Path, scheme: str) -> dict[str, torch.Tensor]:
    """compressed-tensors' own decompression of every quantized module -> a BF16 state dict."""
    out = load_dir(dst)
    sd = {}
    for k, v in out.items():
        if k.endswith(".weight_packed"):
            m = k.removesuffix(".weight_packed")
            if scheme == "nvfp4":
                sd[m + ".weight"] = ct_decompress_nvfp4(v, out[m + ".weight_scale"], out[m + ".weight_global_scale"])
            else:
                sd[m + ".weight"] = ct_decompress_mxfp4(v, out[m + ".weight_scale"])
        elif not re.search(r"\.weight_(scale|global_scale)$", k):
            sd[k] = v
    return sd


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe", "qwen3_moe_fused", "deepseek_v3"])
def test_moe_logits_close_through_compressed_tensors_decoding(sources, tmp_path, name):
    """transformers 5.23 fuses experts into 3-D parameters, which compressed-tensors does
    not quantize, so it cannot load per-expert FP4 MoE checkpoints directly (vLLM can).
    We decode every module with compressed-tensors, save the BF16 result under the same
    per-expert names (transformers' conversion mapping fuses them on load) and compare
    logits with the source."""
    src_dir = sources[name]
    dst = tmp_path / "out"
    run_qstream("convert", src_dir, dst, "--mlp", "nvfp4", "-q", check=True)
    cos = _logits_cosine(src_dir, dst, _dequantized_checkpoint(dst, "nvfp4"), tmp_path / "deq")
    assert cos > 0.95, cos  # FP4 MLP on random weights: close, not equal


def _logits_cosine(src_dir: Path, dst: Path, state_dict: dict[str, torch.Tensor], deq: Path) -> float:
    """Save a decoded BF16 state dict with DST's config (minus quantization_config), load it
    and the source in transformers, and return the cosine similarity of their logits."""
    from transformers import AutoModelForCausalLM

    deq.mkdir()
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(deq / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((dst / "config.json").read_text())
    cfg.pop("quantization_config")
    (deq / "config.json").write_text(json.dumps(cfg))
    a = AutoModelForCausalLM.from_pretrained(src_dir, dtype=torch.bfloat16)
    b = AutoModelForCausalLM.from_pretrained(deq, dtype=torch.bfloat16)
    with torch.no_grad():
        la, lb = a(IDS).logits.float(), b(IDS).logits.float()
    return torch.nn.functional.cosine_similarity(la.flatten(), lb.flatten(), dim=0).item()


def _openai_as_per_expert(out: dict[str, torch.Tensor], src: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """gpt-oss MXFP4 in OpenAI's layout (``*_blocks`` [E, rows, G, 16], ``*_scales``; gate/up rows
    interleaved) -> the per-expert compressed-tensors names its rows are, checking on the way
    that nothing else changed: biases copied, no 3-D float expert left, quant_method mxfp4."""
    res = {k: v for k, v in out.items() if not re.search(r"\.experts\.(gate_up_proj|down_proj)", k)}
    for k, v in out.items():
        m = re.match(r"(.*\.experts)\.(gate_up_proj|down_proj)_blocks$", k)
        if not m:
            continue
        p, kind = m.groups()
        sc = out[f"{p}.{kind}_scales"]
        assert torch.equal(out[f"{p}.{kind}_bias"], src[f"{p}.{kind}_bias"])
        for e in range(v.shape[0]):
            packed = v[e].flatten(1)
            parts = {"gate_proj": slice(0, None, 2), "up_proj": slice(1, None, 2)} if kind == "gate_up_proj" else \
                {"down_proj": slice(None)}
            for proj, rows in parts.items():
                res[f"{p}.{e}.{proj}.weight_packed"] = packed[rows].contiguous()
                res[f"{p}.{e}.{proj}.weight_scale"] = sc[e][rows].contiguous()
    return res


def _gpt_oss_decode_source(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """transformers' own gpt-oss MXFP4 decoding -> [E, in, out] float32."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    return convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)


def test_gpt_oss_mxfp4_repack_is_lossless(sources, tmp_path):
    """An OpenAI-MXFP4 gpt-oss source -> --mlp mxfp4: written in the same OpenAI layout (what
    vLLM and transformers load for gpt-oss), so every tensor is the source's, byte for byte, and
    transformers' own MXFP4 decoding of the output equals compressed-tensors' MXFP4 decoding of
    the same rows (the codes mean the same in both formats)."""
    src_dir = sources["gpt_oss_mxfp4"]
    dst = tmp_path / "out"
    run_qstream("convert", src_dir, dst, "--mlp", "mxfp4", "-q", check=True)
    src, out = load_dir(src_dir), load_dir(dst)
    assert sorted(out) == sorted(src)
    for k in src:
        assert raw(out[k]) == raw(src[k]), k
    qc = json.loads((dst / "config.json").read_text())["quantization_config"]
    assert qc == json.loads((src_dir / "config.json").read_text())["quantization_config"]
    v = run_qstream("verify", dst, check=True).stdout  # structure of OpenAI's layout
    assert "quantized modules: mxfp4 4" in v, v
    p = "model.layers.1.mlp.experts."
    gu = _gpt_oss_decode_source(out[p + "gate_up_proj_blocks"], out[p + "gate_up_proj_scales"])  # [E, H, 2I]
    for e in range(gu.shape[0]):
        ct = ct_decompress_mxfp4(out[p + "gate_up_proj_blocks"][e].flatten(1), out[p + "gate_up_proj_scales"][e])
        assert torch.equal(ct.float(), gu[e].T), e


def test_gpt_oss_mxfp4_to_nvfp4_requantizes(sources, tmp_path):
    src_dir = sources["gpt_oss_mxfp4"]
    dst = tmp_path / "out"
    run_qstream("convert", src_dir, dst, "--mlp", "nvfp4", "--scale-search", "none", "--allow-unloadable", "-q",
                check=True)
    src, out = load_dir(src_dir), load_dir(dst)
    p = "model.layers.1.mlp.experts."
    gu = _gpt_oss_decode_source(src[p + "gate_up_proj_blocks"], src[p + "gate_up_proj_scales"])
    gate, up = gu[2][:, 0::2].T.contiguous(), gu[2][:, 1::2].T.contiguous()
    for proj, w, partner in (("gate_proj", gate, up), ("up_proj", up, gate)):
        for k, v in ct_nvfp4(w, [partner]).items():
            assert raw(out[f"{p}2.{proj}.{k}"]) == raw(v), (proj, k)


def test_gpt_oss_bf16_logits(sources, tmp_path):
    """gpt-oss BF16 -> --mlp mxfp4 (OpenAI's layout): transformers loads the output itself
    (its own MXFP4 integration, dequantized on the CPU) and its logits follow the source's."""
    from transformers import AutoModelForCausalLM, Mxfp4Config

    src_dir = sources["gpt_oss"]
    dst = tmp_path / "out"
    run_qstream("convert", src_dir, dst, "--mlp", "mxfp4", "-q", check=True)
    out = load_dir(dst)
    assert not any(re.search(r"\.experts\.\d+\.", k) for k in out)
    a = AutoModelForCausalLM.from_pretrained(src_dir, dtype=torch.bfloat16)
    b = AutoModelForCausalLM.from_pretrained(dst, dtype=torch.bfloat16, quantization_config=Mxfp4Config(dequantize=True))
    p = "model.layers.0.mlp.experts."  # the experts transformers built are the output's, decoded
    want = _gpt_oss_decode_source(out[p + "gate_up_proj_blocks"], out[p + "gate_up_proj_scales"]).to(torch.bfloat16)
    assert torch.equal(b.model.layers[0].mlp.experts.gate_up_proj.data, want)
    assert torch.equal(b.model.layers[0].mlp.experts.down_proj_bias.data, load_dir(src_dir)[p + "down_proj_bias"])
    with torch.no_grad():
        la, lb = a(IDS).logits.float(), b(IDS).logits.float()
    assert torch.nn.functional.cosine_similarity(la.flatten(), lb.flatten(), dim=0).item() > 0.95


@pytest.mark.parametrize("opts,openai", [({"mlp": "mxfp4"}, True), ({"mlp": "nvfp4"}, False),
                                         ({"mlp": "mxfp4", "attn": "fp8"}, False),
                                         ({"mlp": "mxfp4", "activations": "mxfp4"}, False)])
def test_gpt_oss_layout_and_unloadable_refusal(sources, opts, openai):
    """OpenAI's layout exactly where it holds the whole output (weight-only MXFP4 experts, the
    rest as in the source); the per-expert compressed-tensors fallback, which neither vLLM 0.32
    nor transformers 5.23 loads (README, "What vLLM does"), is refused at plan time, naming the
    option that caused it, unless --allow-unloadable (then said as a warning)."""
    from qstream.errors import QStreamError
    from qstream.plan.plan import Options, make_plan
    from qstream.sources.source import open_checkpoint

    for src in ("gpt_oss", "gpt_oss_mxfp4"):
        if not openai:
            with pytest.raises(QStreamError) as e:
                make_plan(open_checkpoint(sources[src]), Options(**opts))
            cause = next(f"--{k} {v}" for k, v in opts.items() if (k, v) != ("mlp", "mxfp4"))
            assert cause in str(e.value) and "--allow-unloadable" in str(e.value) and "--mlp mxfp4 alone" in str(e.value)
        plan = make_plan(open_checkpoint(sources[src]), Options(**opts, allow_unloadable=True))
        assert (plan.quantization_config["quant_method"] == "mxfp4") == openai, (src, plan.quantization_config)
        warned = [w for w in plan.warnings if "gpt-oss experts are written one by one" in w]
        assert bool(warned) == (not openai), (src, plan.warnings)
        if openai:
            assert not any(".experts.0." in t.name for s in plan.shards for t in s.tensors)


def test_gpt_oss_nvfp4_cli_refuses_before_writing(sources, tmp_path):
    """The CLI: one error line naming the option and the way out, a non-zero exit, no DST."""
    dst = tmp_path / "out"
    p = run_qstream("convert", sources["gpt_oss"], dst, "--mlp", "nvfp4")
    assert p.returncode != 0
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: gpt-oss with --mlp nvfp4:"), p.stderr
    assert "--allow-unloadable" in lines[0]
    assert not dst.exists()
