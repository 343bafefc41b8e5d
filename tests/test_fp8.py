"""FP8 sources (Mistral per-tensor static, DeepSeek/Qwen3 block), multimodal layout,
and the --attn choices."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_qstream
from ct_reference import ct_mxfp4, ct_nvfp4
from synth import dequant, llama_config, llama_tensors, write_checkpoint, write_mistral3_fp8, write_qwen3_block_fp8
from test_convert import ignored, load_dir, raw


@pytest.fixture(scope="module")
def mistral3(tmp_path_factory):
    root = tmp_path_factory.mktemp("m3")
    return write_mistral3_fp8(root / "src", root / "twin")


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    root = tmp_path_factory.mktemp("q3")
    return write_qwen3_block_fp8(root / "src", root / "twin")


def logits(path: Path, ids: torch.Tensor, cls=None) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    cls = cls or AutoModelForCausalLM
    m = cls.from_pretrained(path, dtype=torch.bfloat16)
    with torch.no_grad():
        return m(input_ids=ids).logits.float()


def close(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()


IDS = torch.tensor([[1, 17, 33, 200, 5, 9, 77, 120], [3, 3, 250, 41, 8, 19, 64, 2]])


@pytest.mark.parametrize("scheme", ["mxfp4", "nvfp4"])
def test_mistral3_fp8_static(mistral3, tmp_path, scheme):
    from transformers import Mistral3ForConditionalGeneration

    dst = tmp_path / "out"
    run_qstream("convert", mistral3, dst, "--mlp", scheme, "--scale-search", "none", "-q", check=True)
    src, out = load_dir(mistral3), load_dir(dst)
    qc = json.loads((dst / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "mixed-precision"
    groups = {g["format"]: g for g in qc["config_groups"].values()}
    fp8g = groups["float-quantized"]
    assert fp8g["weights"]["strategy"] == "tensor" and fp8g["input_activations"]["dynamic"] is False
    assert groups[f"{scheme}-pack-quantized"]["weights"]["num_bits"] == 4
    for L in range(2):
        p = f"model.language_model.layers.{L}."
        for a in ("q_proj", "k_proj", "v_proj", "o_proj"):
            m = p + "self_attn." + a
            # attention FP8 bytes are the source's bytes; scales renamed, float32 [1]
            assert out[m + ".weight"].dtype == torch.float8_e4m3fn and raw(out[m + ".weight"]) == raw(src[m + ".weight"])
            assert out[m + ".weight_scale"].shape == (1,) and out[m + ".weight_scale"].dtype == torch.float32
            assert out[m + ".weight_scale"].item() == src[m + ".weight_scale_inv"].item()
            assert out[m + ".input_scale"].item() == src[m + ".activation_scale"].item()
            assert m + ".weight_scale_inv" not in out and m + ".activation_scale" not in out
            assert any(t.startswith("re:") and __import__("re").match(t[3:], m) for t in fp8g["targets"])
        # MLP: requantized from the exact dequantized float32 values, as compressed-tensors would
        deq = {n: torch.from_numpy(dequant(src[p + f"mlp.{n}.weight"].view(torch.uint8).numpy().view(np.dtype("float8_e4m3fn") if False else __import__("ml_dtypes").float8_e4m3fn), src[p + f"mlp.{n}.weight_scale_inv"].numpy()))
               for n in ("gate_proj", "up_proj", "down_proj")}
        for n, w in deq.items():
            if scheme == "nvfp4":
                partners = [deq[q] for q in ("gate_proj", "up_proj") if q != n] if n != "down_proj" else []
                ref = ct_nvfp4(w, partners)
            else:
                ref = ct_mxfp4(w)
            for k, v in ref.items():
                assert raw(out[p + f"mlp.{n}.{k}"]) == raw(v), (n, k)
    # vision tower, projector, embeddings, norms, lm_head: byte for byte, and ignored
    for name, t in src.items():
        if not name.startswith("model.language_model.layers."):
            assert raw(out[name]) == raw(t), name
    for m in ("model.vision_tower.transformer.layers.0.feed_forward.gate_proj",
              "model.vision_tower.transformer.layers.0.attention.q_proj",
              "model.multi_modal_projector.linear_1", "model.multi_modal_projector.patch_merger.merging_layer", "lm_head"):
        assert ignored(qc, m), m
    # loads in transformers through compressed-tensors; logits close to the BF16 twin
    twin = mistral3.parent / "twin"
    a = logits(twin, IDS, Mistral3ForConditionalGeneration)
    b = logits(dst, IDS, Mistral3ForConditionalGeneration)
    assert torch.isfinite(b).all()
    # FP4 MLP + FP8 activations on random weights: strongly correlated, not equal
    assert close(a, b) > 0.95


def test_fp8_attention_to_bf16(mistral3, tmp_path):
    dst = tmp_path / "out"
    run_qstream("convert", mistral3, dst, "--mlp", "nvfp4", "--attn", "bf16", "-q", check=True)
    src, out = load_dir(mistral3), load_dir(dst)
    m = "model.language_model.layers.1.self_attn.k_proj"
    assert out[m + ".weight"].dtype == torch.bfloat16
    exact = dequant(src[m + ".weight"].view(torch.uint8).numpy().view(__import__("ml_dtypes").float8_e4m3fn),
                    src[m + ".weight_scale_inv"].numpy())
    assert torch.equal(out[m + ".weight"], torch.from_numpy(exact).to(torch.bfloat16))
    assert m + ".weight_scale" not in out
    qc = json.loads((dst / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "nvfp4-pack-quantized" and ignored(qc, m)


@pytest.mark.parametrize("attn", ["keep", "bf16"])
def test_block_fp8_source(qwen3, tmp_path, attn):
    dst = tmp_path / "out"
    run_qstream("convert", qwen3, dst, "--mlp", "mxfp4", "--attn", attn, "--scale-search", "none", "-q", check=True)
    src, out = load_dir(qwen3), load_dir(dst)
    import ml_dtypes

    for L in range(2):
        p = f"model.layers.{L}."
        for n in ("gate_proj", "up_proj", "down_proj"):
            q = src[p + f"mlp.{n}.weight"].view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn)
            w = torch.from_numpy(dequant(q, src[p + f"mlp.{n}.weight_scale_inv"].numpy()))
            for k, v in ct_mxfp4(w).items():
                assert raw(out[p + f"mlp.{n}.{k}"]) == raw(v), (L, n, k)
        m = p + "self_attn.o_proj"
        if attn == "keep":
            assert raw(out[m + ".weight"]) == raw(src[m + ".weight"])
            assert torch.equal(out[m + ".weight_scale"], src[m + ".weight_scale_inv"])
        else:
            assert out[m + ".weight"].dtype == torch.bfloat16
    qc = json.loads((dst / "config.json").read_text())["quantization_config"]
    if attn == "keep":
        fp8g = [g for g in qc["config_groups"].values() if g["format"] == "float-quantized"][0]
        assert fp8g["weights"]["strategy"] == "block" and fp8g["weights"]["block_structure"] == [128, 128]
    a = logits(qwen3.parent / "twin", IDS)
    b = logits(dst, IDS)
    assert close(a, b) > 0.95


def test_attn_fp8_dynamic_matches_compressed_tensors(tmp_path):
    import ct_reference as R
    from compressed_tensors.compressors import compress_module
    from compressed_tensors.quantization.utils import calculate_qparams
    from compressed_tensors.utils import update_offload_parameter

    cfg = llama_config(hidden=64, inter=128, layers=2)
    cfg["architectures"], cfg["model_type"] = ["MistralForCausalLM"], "mistral"
    src = write_checkpoint(tmp_path / "src", cfg, llama_tensors(cfg, seed=3), n_shards=2)
    dst = tmp_path / "out"
    run_qstream("convert", src, dst, "--mlp", "nvfp4", "--attn", "fp8", "-q", check=True)
    s, out = load_dir(src), load_dir(dst)
    for L in range(2):
        for a in ("q_proj", "k_proj", "v_proj", "o_proj"):
            m = f"model.layers.{L}.self_attn.{a}"
            w = s[m + ".weight"]
            mod = R._linear(w, R._scheme("FP8_DYNAMIC"))
            obs = w.unsqueeze(-2).unsqueeze(0)  # llm-compressor _flatten_weight, channel strategy
            scale, _ = calculate_qparams(torch.amin(obs, dim=(0, -1)), torch.amax(obs, dim=(0, -1)), mod.quantization_scheme.weights)
            update_offload_parameter(mod, "weight_scale", scale)
            compress_module(mod)
            ref = mod.state_dict()
            assert raw(out[m + ".weight"]) == raw(ref["weight"]) and out[m + ".weight"].dtype == ref["weight"].dtype
            assert raw(out[m + ".weight_scale"]) == raw(ref["weight_scale"]) and out[m + ".weight_scale"].dtype == ref["weight_scale"].dtype
    qc = json.loads((dst / "config.json").read_text())["quantization_config"]
    g = [g for g in qc["config_groups"].values() if g["format"] == "float-quantized"][0]
    assert g["weights"]["strategy"] == "channel" and g["input_activations"] == {
        "num_bits": 8, "type": "float", "symmetric": True, "group_size": None, "strategy": "token", "dynamic": True}
    a = logits(src, IDS)
    b = logits(dst, IDS)
    assert close(a, b) > 0.95


def test_inspect_fp8_sizes(mistral3):
    j = json.loads(run_qstream("inspect", mistral3, "--mlp", "mxfp4", "--json", check=True).stdout)
    roles = j["roles"]
    assert roles["mlp"]["bytes_out"] < roles["mlp"]["bytes_in"] * 0.6  # FP8 -> FP4 (+ scales)
    assert roles["attention"]["bytes_out"] == roles["attention"]["bytes_in"]
    assert roles["vision"]["bytes_out"] == roles["vision"]["bytes_in"]


def test_compressed_tensors_fp8_source_chain(tmp_path):
    """A compressed-tensors FP8_DYNAMIC checkpoint (written by --attn fp8) is itself a valid
    source: its attention stays FP8 byte for byte, the MLP is quantized."""
    cfg = llama_config(hidden=64, inter=128, layers=2)
    src = write_checkpoint(tmp_path / "src", cfg, llama_tensors(cfg, seed=5), n_shards=2)
    mid, dst = tmp_path / "mid", tmp_path / "out"
    run_qstream("convert", src, mid, "--mlp", "none", "--attn", "fp8", "-q", check=True)
    run_qstream("convert", mid, dst, "--mlp", "mxfp4", "-q", check=True)
    a, b = load_dir(mid), load_dir(dst)
    m = "model.layers.1.self_attn.v_proj"
    assert raw(b[m + ".weight"]) == raw(a[m + ".weight"]) and torch.equal(b[m + ".weight_scale"], a[m + ".weight_scale"])
    assert "model.layers.1.mlp.up_proj.weight_packed" in b
    qc = json.loads((dst / "config.json").read_text())["quantization_config"]
    fp8g = [g for g in qc["config_groups"].values() if g["format"] == "float-quantized"][0]
    assert fp8g["weights"]["strategy"] == "channel" and fp8g["input_activations"]["dynamic"] is True
    assert close(logits(mid, IDS), logits(dst, IDS)) > 0.95


def test_old_multimodal_prefixes_are_never_quantized():
    from qstream.roles import Classifier, load_families, select_family

    fams = load_families()
    c = Classifier(select_family({"architectures": ["Mistral3ForConditionalGeneration"]}, fams), fams["generic"])
    assert c.role("vision_tower.transformer.layers.3.feed_forward.gate_proj.weight") == "vision"
    assert c.role("multi_modal_projector.linear_1.weight") == "projector"
    assert c.role("language_model.model.layers.3.mlp.gate_proj.weight") == "mlp"
    assert c.role("language_model.model.layers.3.self_attn.q_proj.weight") == "attention"
    assert c.role("language_model.lm_head.weight") == "lm_head"
    assert c.role("model.vision_tower.transformer.layers.0.attention.q_proj.weight") == "vision"
    g = select_family({"architectures": ["Gemma3ForConditionalGeneration"]}, fams)
    cg = Classifier(g, fams["generic"])
    assert cg.role("model.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight") == "vision"
    assert cg.role("model.language_model.layers.0.mlp.gate_proj.weight") == "mlp"


@pytest.mark.parametrize("layout", ["tensor", "channel", "block"])
def test_fused_fp8_dequant_equals_numpy(layout):
    """convert's one-pass FP8 decode (kernels.fp8_dequant) gives exactly the float32 values of
    the numpy reference, fp8.apply_scale(fp8.decode_fp8(codes)), every code (NaN, zeros,
    subnormals) and any row offset into the scale."""
    from qstream.schemes import fp8, kernels

    rng = np.random.default_rng(3)
    rows, cols, r0 = 300, 260, 130  # not multiples of the 128 x 128 blocks
    codes = rng.integers(0, 256, (rows, cols), dtype=np.uint8)
    scale = {"tensor": rng.random((1,), np.float32),
             "channel": rng.random((r0 + rows, 1), np.float32) * 1e-3,
             "block": rng.random(((r0 + rows + 127) // 128, (cols + 127) // 128), np.float32)}[layout]
    want = fp8.apply_scale(fp8.decode_fp8(codes), scale, layout, r0, (128, 128))
    got = kernels.fp8_dequant(codes, scale, layout, r0, (128, 128))
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_array_equal(got.view(np.uint32)[~np.isnan(want)], want.view(np.uint32)[~np.isnan(want)])
    assert np.array_equal(np.isnan(got), np.isnan(want)) and np.isnan(want).any()


def test_fp8_absmax_from_codes_equals_decoded():
    """The NVFP4 global-scale pass over a per-tensor FP8 source takes max |w| from the codes:
    exactly the absmax of the decoded values, NaN codes included."""
    from qstream.schemes import fp8, kernels

    rng = np.random.default_rng(4)
    for s in (np.float32(3.7e-4), np.float32(-2.5), np.float32(1e-30)):
        for trial in range(20):
            codes = rng.integers(0, 256, 500, dtype=np.uint8)
            codes[codes & 0x7F == 0x7F] = 0  # no NaN
            if trial % 5 == 0:
                codes[:] = rng.integers(0, 8, 500)  # zeros and subnormals only
            x = fp8.apply_scale(fp8.decode_fp8(codes), np.asarray([s]), "tensor", 0, None)
            assert kernels.fp8_absmax(codes, np.asarray([s])) == float(kernels.absmax(x))
    codes[7] = 0xFF
    assert np.isnan(kernels.fp8_absmax(codes, np.asarray([1.0], np.float32)))
