"""ModelOpt NVFP4: ``--format modelopt`` output (TensorRT-LLM, vLLM modelopt_fp4) and ModelOpt
NVFP4 checkpoints as sources, on a tiny dense Llama and a tiny Mixtral.

What is bit-identical between the two outputs of one conversion (qstream/layouts/modelopt.py): the
packed FP4 bytes and the E4M3 block scales; ModelOpt's ``weight_scale_2`` is float32(1 /
weight_global_scale), the very value vLLM computes from the compressed-tensors checkpoint
before it calls the same kernel. Decoded with each library's own formula, the bfloat16
weights are equal (proved for BF16/FP16 sources in qstream/layouts/modelopt.py), and the float32
values agree to 2**-21 (relative).
"""

from __future__ import annotations

import fnmatch
import json
import re

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from conftest import run_qstream
from ct_reference import ct_decompress_nvfp4
from qstream.layouts import modelopt
from qstream.errors import QStreamError
from qstream.plan.plan import Options, make_plan
from qstream.sources.source import open_checkpoint
from synth import mixtral_config, mixtral_tensors, write_checkpoint, write_mistral3_fp8
from test_convert import load_dir, raw


def bits(t: torch.Tensor) -> bytes:
    return raw(t.reshape(-1))


E2M1 = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6, 0, -0.5, -1, -1.5, -2, -3, -4, -6], dtype=torch.float32)


def modelopt_decode(weight: torch.Tensor, scale: torch.Tensor, scale_2: torch.Tensor, dtype=torch.bfloat16):
    """ModelOpt NVFP4QTensor.dequantize (modelopt/torch/quantization/qtensor/nvfp4_tensor.py, non-fast
    path): low nibble = even column, per_block_scale = float32(s) * weight_scale_2 in float32,
    fp4 * per_block_scale in float32, then cast. Its table decodes code 0x8 to +0.0."""
    codes = torch.stack([weight & 0x0F, weight >> 4], dim=-1).reshape(weight.shape[0], -1).long()
    x = E2M1[codes]
    per_block = scale.to(torch.float32) * scale_2.to(torch.float32)
    return (x.view(x.shape[0], -1, 16) * per_block.unsqueeze(-1)).reshape(x.shape).to(dtype)


def modelopt_quantize(w: torch.Tensor, scale_2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ModelOpt NVFP4QTensor.get_weights_scaling_factor + quantize + _cast_fp4, for a source that
    ModelOpt itself made (a float32 weight_scale_2 = amax / 2688, not a CT reciprocal). This and
    modelopt_decode are held bit for bit to nvidia-modelopt by test_against_modelopt_library."""
    amax = w.float().abs().view(w.shape[0], -1, 16).amax(-1)
    s = amax / (6.0 * scale_2)
    s[s == 0] = 1.0
    s = s.clamp(min=2**-9).to(torch.float8_e4m3fn)
    q = (w.view(w.shape[0], -1, 16) / (s.to(torch.float32) * scale_2).unsqueeze(-1)).view(w.shape)
    bounds = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5])
    a = q.abs()
    code = torch.searchsorted(bounds, a, out_int32=True).to(torch.uint8)
    code += (a.unsqueeze(-1) == bounds[[1, 3, 5]]).any(-1).to(torch.uint8)
    code += (q < 0).to(torch.uint8) << 3
    return (code[..., 1::2] << 4) | code[..., 0::2], s


@pytest.fixture(scope="module")
def outputs(tiny_ckpt, tmp_path_factory):
    """Per model: source, compressed-tensors output, ModelOpt output, ModelOpt output -> CT."""
    root = tmp_path_factory.mktemp("modelopt")
    cfg = mixtral_config()
    mixtral = write_checkpoint(root / "mixtral", cfg, mixtral_tensors(cfg), n_shards=2)
    out = {}
    for name, src in (("llama", tiny_ckpt), ("mixtral", mixtral)):
        ct, mo, rt = root / f"{name}-ct", root / f"{name}-mo", root / f"{name}-rt"
        run_qstream("convert", src, ct, "--mlp", "nvfp4", "-q", check=True)
        run_qstream("convert", src, mo, "--mlp", "nvfp4", "--format", "modelopt", "--max-shard-size", "60KB", "-q",
                    check=True)
        run_qstream("convert", mo, rt, "--mlp", "nvfp4", "-q", check=True)
        out[name] = (src, ct, mo, rt)
    return out


def quantized_modules(ct_dir) -> list[str]:
    return sorted(k.removesuffix(".weight_packed") for k in load_dir(ct_dir) if k.endswith(".weight_packed"))


def linear_modules(src: dict[str, torch.Tensor]) -> list[str]:
    return sorted(k.removesuffix(".weight") for k, v in src.items()
                  if k.endswith(".weight") and v.ndim == 2 and "embed_tokens" not in k)


@pytest.mark.parametrize("name", ["llama", "mixtral"])
def test_modelopt_layout_and_configs(outputs, name):
    src_dir, ct_dir, mo_dir, _ = outputs[name]
    src, mo = load_dir(src_dir), load_dir(mo_dir)
    q = quantized_modules(ct_dir)
    assert len(q) == (9 if name == "llama" else 24)
    for m in q:
        w = src[m + ".weight"]
        assert mo[m + ".weight"].dtype == torch.uint8 and mo[m + ".weight"].shape == (w.shape[0], w.shape[1] // 2)
        assert mo[m + ".weight_scale"].dtype == torch.float8_e4m3fn
        assert mo[m + ".weight_scale"].shape == (w.shape[0], w.shape[1] // 16)
        assert mo[m + ".weight_scale_2"].dtype == torch.float32 and mo[m + ".weight_scale_2"].shape == ()
    assert not [k for k in mo if re.search(r"\.(weight_packed|weight_global_scale|input_scale)$", k)]
    for k, v in src.items():  # everything else byte for byte
        if k.removesuffix(".weight") not in q:
            assert raw(mo[k]) == raw(v) and mo[k].dtype == v.dtype, k
    assert len(mo) == len(src) + 2 * len(q)
    index = json.loads((mo_dir / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(mo) and len(set(index["weight_map"].values())) > 1

    # hf_quant_config.json: ModelOpt process_layer_quant_config's layout for weight-only NVFP4
    hf = json.loads((mo_dir / "hf_quant_config.json").read_text())
    assert hf["producer"]["name"] == "qstream" and hf["producer"]["version"]
    excl = hf["quantization"]["exclude_modules"]
    assert hf["quantization"] == {"quant_algo": "W4A16_NVFP4", "kv_cache_quant_algo": None, "group_size": 16,
                                  "exclude_modules": excl}
    # config.json: the source config + ModelOpt convert_hf_quant_config_format's quantization_config,
    # which vLLM's override_quantization_method maps to modelopt_fp4 (quant_method modelopt, FP4 algo)
    cfg = json.loads((mo_dir / "config.json").read_text())
    qc = cfg.pop("quantization_config")
    assert cfg == json.loads((src_dir / "config.json").read_text())
    assert qc == {
        "config_groups": {"group_0": {"weights": {"dynamic": False, "num_bits": 4, "type": "float", "group_size": 16},
                                      "targets": ["Linear"]}},
        "ignore": excl, "quant_algo": "W4A16_NVFP4", "producer": hf["producer"], "quant_method": "modelopt"}
    assert "modelopt" in (mo_dir / "README.md").read_text()


@pytest.mark.parametrize("name", ["llama", "mixtral"])
def test_decoded_weights_match_compressed_tensors(outputs, name):
    _, ct_dir, mo_dir, _ = outputs[name]
    ct, mo = load_dir(ct_dir), load_dir(mo_dir)
    differing_f32 = 0
    for m in quantized_modules(ct_dir):
        packed, scale, gs = ct[m + ".weight_packed"], ct[m + ".weight_scale"], ct[m + ".weight_global_scale"]
        w, s, s2 = mo[m + ".weight"], mo[m + ".weight_scale"], mo[m + ".weight_scale_2"]
        assert raw(w) == raw(packed) and raw(s) == raw(scale), m
        # the multiplier vLLM's compressed-tensors W4A16 path computes (1.0 / weight_global_scale in
        # float32) is ModelOpt's weight_scale_2, bit for bit: the Marlin kernel gets identical operands
        assert bits(1.0 / gs.to(torch.float32)) == bits(s2), m
        # each library's own decoding: compressed-tensors NVFP4PackedCompressor.decompress (bfloat16)
        # and ModelOpt's NVFP4QTensor.dequantize to bfloat16 give the same numbers (signed zeros aside)
        ct_bf16 = ct_decompress_nvfp4(packed, scale, gs)
        mo_bf16 = modelopt_decode(w, s, s2)
        assert torch.equal(ct_bf16, mo_bf16), m
        # in float32 they can differ in the last bits: fp4 * fl(s / g) vs fp4 * fl(s * fl(1 / g))
        codes = torch.stack([packed & 0x0F, packed >> 4], -1).reshape(packed.shape[0], -1).long()
        ct_f32 = (E2M1[codes].view(packed.shape[0], -1, 16) * (scale.to(torch.float32) / gs).unsqueeze(-1)).flatten(1)
        mo_f32 = modelopt_decode(w, s, s2, torch.float32)
        # each is within 3 * 2**-24 (relative) of fp4 * s / g: they agree to 2**-21 (a few float32 ulps)
        assert torch.all((ct_f32 - mo_f32).abs() <= ct_f32.abs() * 2**-21), m
        differing_f32 += int((ct_f32 != mo_f32).sum())
    assert differing_f32 > 0  # the float32 decodings are not identical, which is why the claim is bf16
    # fused partners share weight_scale_2 (vLLM warns and uses one value when they differ)
    for m in quantized_modules(ct_dir):
        partner = re.sub(r"\.gate_proj$", ".up_proj", re.sub(r"\.w1$", ".w3", m))
        if partner != m:
            assert bits(mo[m + ".weight_scale_2"]) == bits(mo[partner + ".weight_scale_2"]), m


@pytest.mark.parametrize("name", ["llama", "mixtral"])
def test_modelopt_source_repacks_to_the_same_compressed_tensors(outputs, name):
    """ModelOpt output read back as a source: the compressed-tensors files equal the direct
    conversion byte for byte (weight_global_scale recovered exactly from weight_scale_2)."""
    _, ct_dir, _, rt_dir = outputs[name]
    files = sorted(p.name for p in ct_dir.iterdir() if p.suffix in (".safetensors", ".json"))
    assert files == sorted(p.name for p in rt_dir.iterdir() if p.suffix in (".safetensors", ".json"))
    assert "hf_quant_config.json" not in files
    for f in files:
        assert (ct_dir / f).read_bytes() == (rt_dir / f).read_bytes(), f


def vllm_excluded(excludes: list[str], layer: str) -> bool:
    """vLLM ModelOptQuantConfigBase.is_layer_excluded after apply_vllm_mapper (``x*`` -> ``x``,
    ``x.*``): exact, substring, then fnmatch."""
    pats = [p for e in excludes for p in ((e[:-1], e[:-1] + ".*") if e.endswith("*") and e[-2] != "." else (e,))]
    return any(p == layer or p in layer or fnmatch.fnmatch(layer, p) for p in pats)


def trtllm_excluded(excludes: list[str], layer: str) -> bool:
    """TensorRT-LLM QuantConfig.is_module_excluded_from_quantization: fnmatchcase."""
    return any(fnmatch.fnmatchcase(layer, e) for e in excludes)


@pytest.mark.parametrize("name", ["llama", "mixtral"])
def test_exclude_modules_cover_every_unquantized_linear(outputs, name):
    src_dir, ct_dir, mo_dir, _ = outputs[name]
    excl = json.loads((mo_dir / "hf_quant_config.json").read_text())["quantization"]["exclude_modules"]
    q = quantized_modules(ct_dir)
    unq = sorted(set(linear_modules(load_dir(src_dir))) - set(q))
    assert "lm_head" in unq and any(".self_attn." in m for m in unq)
    if name == "mixtral":
        assert any(m.endswith("block_sparse_moe.gate") for m in unq)  # the routers
    fused = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "gate_proj": "gate_up_proj",
             "up_proj": "gate_up_proj"}

    def runtime(m):  # the layer names vLLM / TensorRT-LLM use for module m
        head, _, last = m.rpartition(".")
        names = [m] + ([f"{head}.{fused[last]}"] if last in fused else [])
        e = re.match(r"(.*\.experts)\.\d+\.", m)
        return names + ([e.group(1)] if e else [])

    for m in unq:
        for layer in runtime(m):
            assert vllm_excluded(excl, layer) and trtllm_excluded(excl, layer), (m, layer)
    for m in q:
        for layer in runtime(m):
            assert not vllm_excluded(excl, layer) and not trtllm_excluded(excl, layer), (m, layer)
    # compressed-tensors' ignore of the CT output names the same modules
    ct_ignore = json.loads((ct_dir / "config.json").read_text())["quantization_config"]["ignore"]
    for m in unq:
        assert any(re.match(p[3:], m) if p.startswith("re:") else p == m for p in ct_ignore), m


def test_foreign_modelopt_w4a4_source(tiny_ckpt, tmp_path):
    """A checkpoint as ModelOpt exports it (W4A4 NVFP4: weight_scale_2 = amax / 2688 shared by
    fused partners, input_scale, FP8 KV-cache scales; only hf_quant_config.json, as older
    exports) converts to compressed-tensors without requantizing."""
    src = load_dir(tiny_ckpt)
    t, q = {}, []
    for k, v in src.items():
        m = k.removesuffix(".weight")
        if re.search(r"mlp\.(gate|up|down)_proj\.weight$", k):
            partners = [m] if "down_proj" in m else [re.sub(r"(gate|up)_proj$", p, m) for p in ("gate_proj", "up_proj")]
            amax = max(src[p + ".weight"].float().abs().max() for p in partners)
            s2 = amax / (6.0 * 448.0)
            t[k], t[m + ".weight_scale"] = modelopt_quantize(v, s2)
            t[m + ".weight_scale_2"] = s2.reshape(())
            t[m + ".input_scale"] = torch.tensor(0.02, dtype=torch.float32)
            q.append(m)
        else:
            t[k] = v
    for L in range(3):
        for kv in "kv":
            t[f"model.layers.{L}.self_attn.{kv}_proj.{kv}_scale"] = torch.tensor(0.1, dtype=torch.float32)
    root = tmp_path / "mo-src"
    root.mkdir()
    save_file({k: v.contiguous() for k, v in t.items()}, str(root / "model.safetensors"), metadata={"format": "pt"})
    (root / "config.json").write_text((tiny_ckpt / "config.json").read_text())
    (root / "hf_quant_config.json").write_text(json.dumps({
        "producer": {"name": "modelopt", "version": "0.47.0"},
        "quantization": {"quant_algo": "NVFP4", "kv_cache_quant_algo": "FP8", "group_size": 16,
                         "exclude_modules": ["lm_head", "model.layers.0.self_attn*", "model.layers.1.self_attn*",
                                             "model.layers.2.self_attn*"]}}))
    dst = tmp_path / "ct"
    p = run_qstream("convert", root, dst, "--mlp", "nvfp4", check=True)
    assert "input_scale" in p.stderr and "k_scale" in p.stderr
    out = load_dir(dst)
    assert not (dst / "hf_quant_config.json").exists()
    assert not [k for k in out if k.endswith(("input_scale", "k_scale", "v_scale", "weight_scale_2"))]
    qc = json.loads((dst / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "nvfp4-pack-quantized"
    for m in q:
        assert raw(out[m + ".weight_packed"]) == raw(t[m + ".weight"])
        assert raw(out[m + ".weight_scale"]) == raw(t[m + ".weight_scale"])
        g, s2 = out[m + ".weight_global_scale"], t[m + ".weight_scale_2"]
        assert g.shape == (1,) and g.dtype == torch.float32
        # vLLM's compressed-tensors path recomputes weight_scale_2 exactly (these amax / 2688 values all
        # have a float32 g with fl(1 / g) == weight_scale_2; test_global_scale_round_trip covers the rest)
        assert bits(1.0 / g) == bits(s2), m
        a = ct_decompress_nvfp4(out[m + ".weight_packed"], out[m + ".weight_scale"], g).float()
        b = modelopt_decode(t[m + ".weight"], t[m + ".weight_scale"], s2, torch.float32)
        assert torch.all((a - b).abs() <= b.abs() * 2**-8), m  # one bfloat16 rounding apart at most


def test_global_scale_round_trip():
    """CT -> ModelOpt -> CT recovers every global scale with <= 11 significant bits (BF16 / FP16
    sources) although float32(1 / float32(1 / g)) != g for many of them; and float32(1 / g) ==
    weight_scale_2 whenever such a g exists."""
    failures_naive = 0
    for bits in (8, 11):
        mant = np.arange(2 ** (bits - 1), dtype=np.uint32) << (24 - bits)
        for e in (120, 127, 135, 140):
            g = ((np.uint32(e) << 23) | mant).view(np.float32)
            for x in g:
                w = modelopt.weight_scale_2(x)
                assert modelopt.global_scale(w) == x
                failures_naive += np.float32(1) / w != x
    assert failures_naive > 0
    rng = np.random.default_rng(0)
    for w in rng.uniform(1e-6, 1e-2, 2000).astype(np.float32):
        g = modelopt.global_scale(w)
        g0 = np.float32(1) / w
        has = any(np.float32(1) / c == w for c in (np.nextafter(g0, np.float32(0)), g0, np.nextafter(g0, np.float32(9e9))))
        assert (np.float32(1) / g == w) == has
    for bad in (0.0, -1.0, np.inf, np.nan):
        with pytest.raises(QStreamError):
            modelopt.global_scale(bad)


def test_format_errors(tiny_ckpt, outputs, tmp_path):
    src = open_checkpoint(tiny_ckpt)
    with pytest.raises(QStreamError, match="NVFP4 only"):
        make_plan(src, Options(mlp="mxfp4", format="modelopt"))
    with pytest.raises(QStreamError, match="nothing would be quantized"):
        make_plan(src, Options(mlp="none", format="modelopt"))
    with pytest.raises(QStreamError, match="unknown output format"):
        make_plan(src, Options(mlp="nvfp4", format="gguf"))
    mo = open_checkpoint(outputs["llama"][2])
    with pytest.raises(QStreamError, match="--mlp nvfp4"):
        make_plan(mo, Options(mlp="mxfp4"))
    with pytest.raises(QStreamError, match="already a ModelOpt"):
        make_plan(mo, Options(mlp="nvfp4", format="modelopt"))
    fp8 = write_mistral3_fp8(tmp_path / "m3")  # FP8 attention kept would make a mixed-precision checkpoint
    with pytest.raises(QStreamError, match="--attn bf16"):
        make_plan(open_checkpoint(fp8), Options(mlp="nvfp4", format="modelopt"))
    plan = make_plan(open_checkpoint(fp8), Options(mlp="nvfp4", attn="bf16", format="modelopt"))
    assert plan.quantization_config["quant_algo"] == "W4A16_NVFP4"
    p = run_qstream("convert", tiny_ckpt, tmp_path / "x", "--mlp", "mxfp4", "--format", "modelopt")
    assert p.returncode == 2 and "NVFP4 only" in p.stderr


def test_against_modelopt_library(outputs):
    """With nvidia-modelopt installed (not a test dependency: skipped otherwise): the quantize /
    decode mirrors above equal NVFP4QTensor bit for bit, and the configs equal what ModelOpt's own
    process_layer_quant_config + convert_hf_quant_config_format build for the same layers."""
    qtensor = pytest.importorskip("modelopt.torch.quantization.qtensor")
    from modelopt.torch.export.convert_hf_config import convert_hf_quant_config_format
    from modelopt.torch.export.quant_utils import process_layer_quant_config

    torch.manual_seed(0)
    for k in range(8):
        w = (torch.randn(32, 64) * (0.01 + 0.1 * k)).to(torch.bfloat16)
        w[0, :16] = 0
        s2 = qtensor.NVFP4QTensor.get_weights_scaling_factor_2(w)
        qt, s, _ = qtensor.NVFP4QTensor.quantize(w, 16, None, s2)
        mine_w, mine_s = modelopt_quantize(w, s2)
        assert raw(mine_w) == raw(qt._quantized_data) and raw(mine_s) == raw(s)
        for dt in (torch.float32, torch.bfloat16):
            ref = qt.dequantize(dtype=dt, scale=s, double_scale=s2, block_sizes={-1: 16})
            assert raw(modelopt_decode(mine_w, mine_s, s2, dt)) == raw(ref)
    for name in ("llama", "mixtral"):
        src_dir, ct_dir, mo_dir, _ = outputs[name]
        q = set(quantized_modules(ct_dir))
        layers = {}
        for m in linear_modules(load_dir(src_dir)):
            layers[m + ".quantization"] = "w4a16_nvfp4" if m in q else None
            layers[m + ".awq_block_size"] = 16 if m in q else 0
        hf = json.loads((mo_dir / "hf_quant_config.json").read_text())
        quantization = process_layer_quant_config(layers)
        quantization["kv_cache_quant_algo"] = None
        assert {"producer": hf["producer"], "quantization": quantization} == hf
        assert convert_hf_quant_config_format(hf) == json.loads((mo_dir / "config.json").read_text())["quantization_config"]
