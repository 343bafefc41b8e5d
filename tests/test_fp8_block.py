"""--attn fp8-block: compressed-tensors FP8_BLOCK attention (128x128 weight blocks, dynamic
per-group-128 activations), byte for byte against compressed-tensors' own quantization of the
same weights, from BF16 / FP16 / FP32 sources and from FP8 ones."""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch

from conftest import run_qstream
from synth import dequant, llama_config, llama_tensors, write_checkpoint, write_mistral3_fp8, write_qwen3_block_fp8
from test_convert import load_dir, raw
from test_fp8 import IDS, close, logits

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")


def ct_fp8_block(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """compressed-tensors 0.20 FP8_BLOCK of one Linear weight, as llm-compressor's model_free_ptq
    makes it (see ct_reference): observer statistics over zero-padded 128x128 blocks
    (observers/helpers.py _flatten_weight), calculate_qparams, compress_module."""
    import ct_reference as R
    from compressed_tensors.compressors import compress_module
    from compressed_tensors.quantization.utils import calculate_qparams, maybe_pad_tensor_for_block_quant
    from compressed_tensors.utils import update_offload_parameter

    mod = R._linear(w, R._scheme("FP8_BLOCK"))
    args = mod.quantization_scheme.weights
    b0, b1 = args.block_structure
    v = maybe_pad_tensor_for_block_quant(mod.weight.data, args.block_structure)
    obs = v.reshape(v.shape[0] // b0, b0, v.shape[1] // b1, b1).transpose(1, 2).flatten(-2, -1).unsqueeze(0)
    scale, _ = calculate_qparams(torch.amin(obs, dim=(0, -1)), torch.amax(obs, dim=(0, -1)), args)
    update_offload_parameter(mod, "weight_scale", scale)
    compress_module(mod)
    out = {k: t.detach().clone() for k, t in mod.state_dict().items()}
    assert set(out) == {"weight", "weight_scale"}, out
    return out


def fp8_group(dst: Path) -> dict:
    qc = json.loads((dst / "config.json").read_text())["quantization_config"]
    groups = [g for g in qc["config_groups"].values() if g["format"] == "float-quantized"]
    assert len(groups) == 1, qc["config_groups"]
    return groups[0]


def assert_fp8_block_preset(g: dict) -> None:
    """The group is compressed-tensors' FP8_BLOCK preset, field for field."""
    from compressed_tensors.quantization import preset_name_to_scheme

    ref = preset_name_to_scheme("FP8_BLOCK", ["Linear"])
    assert g["weights"] == ref.weights.model_dump()
    assert g["input_activations"] == ref.input_activations.model_dump()
    assert g["weights"] == {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None, "strategy": "block",
                            "dynamic": False, "block_structure": [128, 128]}
    assert g["input_activations"] == {"num_bits": 8, "type": "float", "symmetric": True, "group_size": 128,
                                      "strategy": "group", "dynamic": True}
    assert g["format"] == "float-quantized" and g["output_activations"] is None


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_attn_fp8_block_matches_compressed_tensors(tmp_path, dtype):
    """hidden 320 = 2.5 blocks, k/v 64 rows: partial edge blocks in both dimensions; one all-zero
    block (eps scale) and one tiny-valued module (FP16: subnormal scales)."""
    np_dt = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16, "float32": np.float32}[dtype]
    cfg = llama_config(hidden=320, inter=256, layers=2, heads=5, kv_heads=1)
    t = llama_tensors(cfg, dtype=np_dt, seed=4)
    t["model.layers.0.self_attn.q_proj.weight"][128:256, :128] = 0
    t["model.layers.1.self_attn.k_proj.weight"] = (t["model.layers.1.self_attn.k_proj.weight"].astype(np.float32)
                                                   * 1e-4).astype(np_dt)
    src = write_checkpoint(tmp_path / "src", cfg, t, n_shards=2)
    dst = tmp_path / "out"
    run_qstream("convert", src, dst, "--mlp", "nvfp4", "--attn", "fp8-block", "--scale-search", "none", "-q", check=True)
    s, out = load_dir(src), load_dir(dst)
    for L in range(2):
        for a in ATTN:
            m = f"model.layers.{L}.self_attn.{a}"
            ref = ct_fp8_block(s[m + ".weight"])
            for k in ("weight", "weight_scale"):
                assert out[m + "." + k].dtype == ref[k].dtype and out[m + "." + k].shape == ref[k].shape, (m, k)
                assert raw(out[m + "." + k]) == raw(ref[k]), (m, k)
    assert out["model.layers.0.self_attn.q_proj.weight_scale"].shape == (3, 3)
    assert out["model.layers.0.self_attn.k_proj.weight_scale"].shape == (1, 3)
    assert_fp8_block_preset(fp8_group(dst))
    assert "model.layers.0.mlp.up_proj.weight_packed" in out  # the MLP is still NVFP4
    p = run_qstream("verify", dst, "--source", src, check=True)
    assert "verify: OK" in p.stdout + p.stderr


def test_attn_fp8_block_row_blocks_do_not_change_bytes(tmp_path):
    """Work items of a few rows are widened to whole 128-row blocks: the output is the same."""
    from qstream.convert import Executor
    from qstream.plan.plan import Options, make_plan
    from qstream.sources.source import open_checkpoint
    from qstream.writer import prepare_dst

    cfg = llama_config(hidden=320, inter=256, layers=1, heads=5, kv_heads=1)
    src = write_checkpoint(tmp_path / "src", cfg, llama_tensors(cfg, seed=6), n_shards=1)
    files = []
    for name, block_bytes in (("whole", 16 << 20), ("rows", 1000)):
        dst = tmp_path / name
        plan = make_plan(open_checkpoint(src), Options(mlp="none", attn="fp8-block"))
        prepare_dst(src, dst, overwrite=False, resume=False)
        Executor(plan, dst, threads=2, block_bytes=block_bytes).run()
        files.append((dst / "model-00001-of-00001.safetensors").read_bytes())
    assert files[0] == files[1]
    out = load_dir(tmp_path / "rows")
    m = "model.layers.0.self_attn.q_proj"
    assert raw(out[m + ".weight_scale"]) == raw(ct_fp8_block(load_dir(src)[m + ".weight"])["weight_scale"])


def test_attn_fp8_block_loads_in_transformers(tmp_path):
    """Attention in whole 128x128 blocks: compressed-tensors' forward quantizes the activations
    in groups of 128 and fails on an input width that is not a multiple of 128 (320: "unflatten:
    Provided sizes [3, 128] don't multiply up to ... 320")."""
    cfg = llama_config(hidden=256, inter=256, layers=2, heads=2, kv_heads=1)
    src = write_checkpoint(tmp_path / "src", cfg, llama_tensors(cfg, seed=3), n_shards=2)
    dst = tmp_path / "out"
    run_qstream("convert", src, dst, "--mlp", "nvfp4", "--attn", "fp8-block", "-q", check=True)
    out = load_dir(dst)
    assert out["model.layers.1.self_attn.q_proj.weight"].dtype == torch.float8_e4m3fn
    assert out["model.layers.1.self_attn.q_proj.weight_scale"].shape == (2, 2)
    a, b = logits(src, IDS), logits(dst, IDS)
    assert torch.isfinite(b).all()
    assert close(a, b) > 0.95


def test_attn_fp8_block_from_fp8_sources(tmp_path):
    """A per-tensor FP8 source (Mistral) is decoded to its exact float32 values and re-blocked
    (float32 scales); a 128x128 block FP8 source (Qwen3-FP8) is already FP8_BLOCK: its bytes pass."""
    m3 = write_mistral3_fp8(tmp_path / "m3", tmp_path / "m3twin")
    dst = tmp_path / "m3out"
    run_qstream("convert", m3, dst, "--mlp", "mxfp4", "--attn", "fp8-block", "--scale-search", "none", "-q", check=True)
    s, out = load_dir(m3), load_dir(dst)
    for L in range(2):
        for a in ATTN:
            m = f"model.language_model.layers.{L}.self_attn.{a}"
            q = s[m + ".weight"].view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn)
            ref = ct_fp8_block(torch.from_numpy(dequant(q, s[m + ".weight_scale_inv"].numpy())))
            assert out[m + ".weight_scale"].dtype == torch.float32 and m + ".input_scale" not in out
            for k in ("weight", "weight_scale"):
                assert raw(out[m + "." + k]) == raw(ref[k]), (m, k)
    assert_fp8_block_preset(fp8_group(dst))
    inspect = run_qstream("inspect", m3, "--mlp", "mxfp4", "--attn", "fp8-block", check=True).stdout
    assert "fp8 block (from fp8)" in inspect

    q3 = write_qwen3_block_fp8(tmp_path / "q3", tmp_path / "q3twin")
    dst = tmp_path / "q3out"
    run_qstream("convert", q3, dst, "--mlp", "mxfp4", "--attn", "fp8-block", "--scale-search", "none", "-q", check=True)
    s, out = load_dir(q3), load_dir(dst)
    m = "model.layers.1.self_attn.k_proj"
    assert raw(out[m + ".weight"]) == raw(s[m + ".weight"])
    assert torch.equal(out[m + ".weight_scale"], s[m + ".weight_scale_inv"])
    assert_fp8_block_preset(fp8_group(dst))
    # transformers on the Qwen3 output only: the Mistral3 attention inputs are 64 wide, and
    # compressed-tensors' per-group-128 activation quantization needs a multiple of 128
    assert close(logits(tmp_path / "q3twin", IDS), logits(dst, IDS)) > 0.95


def test_attn_fp8_block_warns_where_vllm_cannot_fuse(tmp_path):
    """vLLM fuses q/k/v into one GEMM and its FP8_BLOCK layer wants each part in whole 128-row
    blocks (SmolLM2's 576-row q_proj: the strict xfail of tests/test_vllm.py): the plan says so,
    naming the tensor; whole blocks (256 rows) plan without that warning."""
    from qstream.plan.plan import Options, make_plan
    from qstream.sources.source import open_checkpoint

    found = {}
    for name, cfg in (("odd", llama_config(hidden=320, inter=256, layers=1, heads=5, kv_heads=1)),
                      ("whole", llama_config(hidden=256, inter=256, layers=1, heads=2, kv_heads=1))):
        src = write_checkpoint(tmp_path / name, cfg, llama_tensors(cfg, seed=6), n_shards=1)
        ws = make_plan(open_checkpoint(src), Options(mlp="mxfp4", attn="fp8-block")).warnings
        found[name] = [w for w in ws if "not whole 128-row blocks" in w]
    assert not found["whole"], found
    (w,) = found["odd"]
    assert "model.layers.0.self_attn." in w and "--attn fp8" in w and "vLLM" in w, w
    # per-channel FP8 has no such limit
    ws = make_plan(open_checkpoint(tmp_path / "odd"), Options(mlp="mxfp4", attn="fp8")).warnings
    assert not [w for w in ws if "128-row" in w], ws
