"""End-to-end conversion of a tiny synthetic Llama: plan, bytes, config, CLI."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_qstream
from ct_reference import ct_mxfp4, ct_nvfp4
from qstream.plan.plan import Options, make_plan
from qstream.sources.source import open_checkpoint


def load_dir(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def ignored(qc: dict, module: str) -> bool:
    """Whether `module` is in the ignore list, matched as compressed-tensors and vLLM do."""
    return any(re.match(p[3:], module) if p.startswith("re:") else p == module for p in qc["ignore"])


def raw(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""


@pytest.fixture(scope="module", params=["mxfp4", "nvfp4"])
def converted(request, tiny_ckpt, tmp_path_factory):
    dst = tmp_path_factory.mktemp(request.param) / "out"
    p = run_qstream("convert", tiny_ckpt, dst, "--mlp", request.param, "--scale-search", "none", check=True)
    return request.param, dst, p


def test_output_is_exactly_the_plan(converted, tiny_ckpt):
    scheme, dst, _ = converted
    plan = make_plan(open_checkpoint(tiny_ckpt), Options(mlp=scheme))
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert index == plan.index()
    for shard in plan.shards:
        data = (dst / shard.filename).read_bytes()
        assert len(data) == shard.file_bytes
        assert data[: len(shard.header)] == shard.header
    names = {f.name for f in dst.glob("*.safetensors")}
    assert names == {s.filename for s in plan.shards}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in load_dir(dst).values())


def test_passthrough_is_byte_identical(converted, tiny_ckpt):
    scheme, dst, _ = converted
    src, out = load_dir(tiny_ckpt), load_dir(dst)
    kept = [n for n in src if not re.search(r"mlp\.(gate|up|down)_proj\.weight$", n)]
    assert len(kept) == len(src) - 9
    for n in kept:
        assert out[n].dtype == src[n].dtype and raw(out[n]) == raw(src[n]), n
    for n in src:
        if n not in kept:
            assert n not in out  # quantized: only weight_packed & co are written


def test_quantized_bytes_match_compressed_tensors(converted, tiny_ckpt):
    scheme, dst, _ = converted
    src, out = load_dir(tiny_ckpt), load_dir(dst)
    for layer in range(3):
        p = f"model.layers.{layer}.mlp."
        for proj in ("gate_proj", "up_proj", "down_proj"):
            w = src[p + proj + ".weight"]
            if scheme == "nvfp4":
                partners = [src[p + q + ".weight"] for q in ("gate_proj", "up_proj") if q != proj] if proj != "down_proj" else []
                ref = ct_nvfp4(w, partners)
            else:
                ref = ct_mxfp4(w)
            for k, v in ref.items():
                got = out[p + proj + "." + k]
                assert got.dtype == v.dtype and got.shape == v.shape, (k, got.dtype, v.dtype)
                assert raw(got) == raw(v), f"{p}{proj}.{k} differs from compressed-tensors"


def test_straddling_partners_share_global_scale(tiny_ckpt, converted):
    scheme, dst, _ = converted
    index = json.loads((tiny_ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    straddled = [L for L in range(3) if index[f"model.layers.{L}.mlp.gate_proj.weight"] != index[f"model.layers.{L}.mlp.up_proj.weight"]]
    assert straddled, "fixture must put a gate/up pair in different shards"
    if scheme != "nvfp4":
        return
    out = load_dir(dst)
    for L in range(3):
        g = out[f"model.layers.{L}.mlp.gate_proj.weight_global_scale"]
        u = out[f"model.layers.{L}.mlp.up_proj.weight_global_scale"]
        assert torch.equal(g, u)


def test_config_and_side_files(converted, tiny_ckpt):
    from compressed_tensors.quantization import QuantizationConfig

    scheme, dst, _ = converted
    cfg = json.loads((dst / "config.json").read_text())
    src_cfg = json.loads((tiny_ckpt / "config.json").read_text())
    qc = cfg.pop("quantization_config")
    assert cfg == src_cfg
    parsed = QuantizationConfig.model_validate({k: v for k, v in qc.items() if k != "version"})
    assert parsed.format == f"{scheme}-pack-quantized"
    assert qc["quant_method"] == "compressed-tensors" and qc["quantization_status"] == "compressed"
    for f in ("tokenizer_config.json", "generation_config.json", "chat_template.jinja"):
        assert (dst / f).read_bytes() == (tiny_ckpt / f).read_bytes()
    card = (dst / "README.md").read_text()
    # a local source without a Hub id: no base_model (and so no relation), never a folder name
    assert card.startswith("---\n") and "base_model" not in card and "license: apache-2.0" in card
    assert f"--mlp {scheme}" in card and scheme in card and str(tiny_ckpt) not in card and str(dst) not in card
    # only the journal stays in the hidden staging folder: nothing half-written, and it is where
    # `hf upload DST` (huggingface_hub's default ignore patterns) does not take it
    from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects

    staging = dst / ".cache" / "huggingface" / "qstream"
    assert [p.name for p in staging.iterdir()] == ["journal.json"] and not (dst / ".qstream").exists()
    journal = json.loads((staging / "journal.json").read_text())
    assert journal["complete"] and set(journal["shards"]) == {p.name for p in dst.glob("*.safetensors")}
    every = [str(p.relative_to(dst)) for p in dst.rglob("*") if p.is_file()]
    published = list(filter_repo_objects(every, ignore_patterns=DEFAULT_IGNORE_PATTERNS))
    assert not [f for f in published if "qstream" in f or f.startswith(".")], published


def test_config_resolves_every_module(converted):
    """compressed-tensors' own matcher, on the real transformers model, finds exactly the
    quantized modules as targets, and every other Linear ignored."""
    from compressed_tensors.utils import match_named_modules
    from transformers import AutoConfig, AutoModelForCausalLM

    scheme, dst, _ = converted
    qc = json.loads((dst / "config.json").read_text())["quantization_config"]
    config = AutoConfig.from_pretrained(dst)
    config.quantization_config = None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    (group,) = qc["config_groups"].values()
    matched = {n for n, _ in match_named_modules(model, group["targets"], qc["ignore"])}
    expected = {n.removesuffix(".weight_packed") for n in load_dir(dst) if n.endswith(".weight_packed")}
    assert matched == expected
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert "lm_head" in linears - matched


def test_transformers_loads_and_decodes(converted, tiny_ckpt):
    from transformers import AutoModelForCausalLM

    scheme, dst, _ = converted
    ref = AutoModelForCausalLM.from_pretrained(tiny_ckpt, dtype=torch.bfloat16)
    q = AutoModelForCausalLM.from_pretrained(dst, dtype=torch.bfloat16)
    ids = torch.tensor([[1, 5, 9, 42, 7, 100]])
    with torch.no_grad():
        a = ref(ids).logits.float()
        b = q(ids).logits.float()
    assert torch.isfinite(b).all()
    # 4-bit MLP on random weights: logits stay strongly correlated with the source.
    cos = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)
    assert cos > 0.9, cos


def test_dry_run_writes_nothing(tiny_ckpt, tmp_path):
    dst = tmp_path / "never"
    p = run_qstream("convert", tiny_ckpt, dst, "--mlp", "nvfp4", "--dry-run", check=True)
    assert not dst.exists()
    assert "mlp" in p.stdout and "dry run" in p.stdout


def test_inspect_reports_roles_and_sizes(tiny_ckpt):
    p = run_qstream("inspect", tiny_ckpt, "--mlp", "mxfp4", check=True)
    for role in ("mlp", "attention", "embedding", "lm_head", "norm", "total"):
        assert role in p.stdout
    j = json.loads(run_qstream("inspect", tiny_ckpt, "--json", check=True).stdout)
    plan = make_plan(open_checkpoint(tiny_ckpt), Options(mlp="mxfp4"))
    assert j["bytes_out"] == plan.bytes_out and j["bytes_in"] == plan.bytes_in
    assert j["roles"]["mlp"]["quantized"] == 9
    assert len(j["tensors"]) == len(plan.ops)


def test_max_shard_size_splits_output(tiny_ckpt, tmp_path):
    dst = tmp_path / "out"
    run_qstream("convert", tiny_ckpt, dst, "--max-shard-size", "40KB", "-q", check=True)
    shards = sorted(dst.glob("model-*.safetensors"))
    assert len(shards) > 2
    n = len(shards)
    assert [s.name for s in shards] == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    for s in shards[:-1]:
        assert s.stat().st_size < 40_000 + 4096  # header slack
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(load_dir(dst))


def test_ignore_and_recipe(tiny_ckpt, tmp_path):
    dst = tmp_path / "ign"
    run_qstream("convert", tiny_ckpt, dst, "--mlp", "nvfp4", "--ignore", r"layers\.0\.mlp", "-q", check=True)
    out = load_dir(dst)
    assert "model.layers.0.mlp.gate_proj.weight" in out
    assert "model.layers.1.mlp.gate_proj.weight_packed" in out
    qc = json.loads((dst / "config.json").read_text())["quantization_config"]
    assert ignored(qc, "model.layers.0.mlp.gate_proj") and not ignored(qc, "model.layers.1.mlp.gate_proj")

    recipe = tmp_path / "recipe.toml"
    recipe.write_text('[schemes]\nattention = "nvfp4"\n')
    dst2 = tmp_path / "rec"
    run_qstream("convert", tiny_ckpt, dst2, "--mlp", "mxfp4", "--recipe", recipe, "-q", check=True)
    out2 = load_dir(dst2)
    qc2 = json.loads((dst2 / "config.json").read_text())["quantization_config"]
    assert qc2["format"] == "mixed-precision" and len(qc2["config_groups"]) == 2
    for L in range(3):
        scales = {out2[f"model.layers.{L}.self_attn.{p}.weight_global_scale"].item() for p in ("q_proj", "k_proj", "v_proj")}
        assert len(scales) == 1  # q/k/v share one NVFP4 global scale
        assert f"model.layers.{L}.self_attn.o_proj.weight_global_scale" in out2
        assert f"model.layers.{L}.mlp.up_proj.weight_scale" in out2
        assert out2[f"model.layers.{L}.mlp.up_proj.weight_scale"].dtype == torch.uint8


def test_group_size_mismatch_is_left_unquantized(tmp_path):
    from synth import llama_config, llama_tensors, write_checkpoint

    cfg = llama_config(hidden=64, inter=40, layers=1)
    src = write_checkpoint(tmp_path / "src", cfg, llama_tensors(cfg), n_shards=1)
    p = run_qstream("convert", src, tmp_path / "out", "--mlp", "mxfp4", check=True)
    assert "down_proj" in p.stderr and "not a multiple" in p.stderr
    out = load_dir(tmp_path / "out")
    assert "model.layers.0.mlp.down_proj.weight" in out
    assert "model.layers.0.mlp.gate_proj.weight_packed" in out
    qc = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert ignored(qc, "model.layers.0.mlp.down_proj") and not ignored(qc, "model.layers.0.mlp.up_proj")
