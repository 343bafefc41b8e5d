"""From "converted" to "published and served": the model card is true for every option, the
output loads as is, and the foot-guns of issue 14 stop with one sentence (each test here
failed before its fix)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from conftest import run_qstream
from synth import gpt_oss_config, gpt_oss_mxfp4_tensors, llama_config, llama_tensors, write_checkpoint

SOURCE_CARD = ("---\nlicense: other\nlicense_name: tiny-community-license\nlicense_link: LICENSE\nlanguage:\n- en\n- fr\n"
               "pipeline_tag: text-generation\ntags:\n- chat\n---\n# Tiny\n\nThe original text of the card.\n")


def card_meta(text: str) -> dict:
    import yaml

    assert text.startswith("---\n")
    return yaml.safe_load(text[4:text.index("\n---\n", 4)])


def assert_one_error(p, *words):
    assert p.returncode not in (0, None), (p.stdout, p.stderr)
    assert "Traceback" not in p.stderr, p.stderr
    msg = " ".join(p.stderr.split())
    assert "error:" in msg, msg
    for w in words:
        assert w in msg, (w, msg)


@pytest.fixture(scope="module")
def local_src(tmp_path_factory) -> Path:
    """A Llama checkpoint whose _name_or_path is a training path and whose card has metadata."""
    cfg = llama_config(hidden=64, inter=160, layers=2)
    cfg["_name_or_path"] = "/fsx/alice/ckpt/step-5000"
    root = tmp_path_factory.mktemp("pub") / "smollm2-bf16"
    return write_checkpoint(root, cfg, llama_tensors(cfg), n_shards=2, extra_files={"README.md": SOURCE_CARD})


@pytest.fixture(scope="module")
def gpt_oss_src(tmp_path_factory) -> Path:
    cfg = gpt_oss_config(mxfp4=True)
    root = tmp_path_factory.mktemp("goss") / "src"
    return write_checkpoint(root, cfg, gpt_oss_mxfp4_tensors(cfg), n_shards=1)


# --------------------------------------------------------------------------- the card

def test_card_carries_source_metadata_and_text_and_no_paths(local_src, tmp_path):
    dst = tmp_path / "out"
    run_qstream("convert", local_src, dst, "--mlp", "nvfp4", "-q", check=True)
    card = (dst / "README.md").read_text()
    meta = card_meta(card)
    assert meta["license"] == "other" and meta["license_name"] == "tiny-community-license"
    assert meta["license_link"] == "LICENSE" and meta["language"] == ["en", "fr"]
    assert meta["pipeline_tag"] == "text-generation" and {"chat", "qstream", "nvfp4"} <= set(meta["tags"])
    assert "The original text of the card." in card
    # no base_model: neither the folder name nor the training path is a Hub id
    assert "base_model" not in meta
    assert "/fsx" not in card and str(tmp_path) not in card and "smollm2-bf16" not in card.split("\n# ")[0]
    # the project link is the distribution that `pip install` gets (not PyPI's unrelated `qstream`)
    assert "https://pypi.org/project/qstream-convert/" in card and "pypi.org/project/qstream/" not in card
    assert "pip install qstream-convert" in card
    # usage that works: vllm serve and transformers with the dtype compressed-tensors decodes to
    assert "vllm serve ./this-folder" in card and "dtype=torch.bfloat16" in card
    assert "LlamaForCausalLM.from_pretrained" in card
    # requirements, as read in vLLM's source
    assert "vLLM 0.32.0" in card and "Marlin" in card and "7.5" in card


def test_card_base_model_option_and_hub_id_name_or_path(local_src, tmp_path):
    dst = tmp_path / "out"
    run_qstream("convert", local_src, dst, "--mlp", "mxfp4", "--base-model", "HuggingFaceTB/SmolLM2-135M-Instruct",
                "-q", check=True)
    meta = card_meta((dst / "README.md").read_text())
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and meta["base_model_relation"] == "quantized"
    assert_one_error(run_qstream("convert", local_src, tmp_path / "o2", "--base-model", "/fsx/x/y"),
                     "--base-model", "not a Hub model id")
    src2 = tmp_path / "src2"
    shutil.copytree(local_src, src2)
    cfg = json.loads((src2 / "config.json").read_text())
    cfg["_name_or_path"] = "HuggingFaceTB/SmolLM2-135M-Instruct"
    (src2 / "config.json").write_text(json.dumps(cfg))
    run_qstream("convert", src2, tmp_path / "o3", "--mlp", "mxfp4", "-q", check=True)
    assert card_meta((tmp_path / "o3" / "README.md").read_text())["base_model"] == cfg["_name_or_path"]


def test_card_measured_error_is_verify_per_role_error(local_src, tmp_path):
    from qstream.verify.verify import verify

    dst = tmp_path / "out"
    run_qstream("convert", local_src, dst, "--mlp", "nvfp4", "--attn", "fp8", "-q", check=True)
    card = (dst / "README.md").read_text()
    roles = verify(dst, local_src).by(lambda m: f"{m.role}/{m.scheme}")
    assert set(roles) == {"mlp/nvfp4", "attention/fp8"}
    for key, agg in roles.items():
        role, fmt = key.split("/")
        row = re.search(rf"^\| {role} \| {fmt} \| (\d+) \| ([0-9.]+) \| ([0-9.]+) \|$", card, re.M)
        assert row, (key, card)
        assert int(row.group(1)) == agg["tensors"]
        assert float(row.group(2)) == pytest.approx(agg["rel_error"], abs=6e-5)
        assert float(row.group(3)) == pytest.approx(agg["snr_db"], abs=6e-3)


@pytest.mark.parametrize("dt", [ml_dtypes.bfloat16, np.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("scheme", ["nvfp4", "mxfp4"])
def test_card_measure_is_the_decoded_error(scheme, dt):
    """The card's per-block sums (sum x^2, sum (x - decoded)^2; measure.fp4_error, vector
    steps) equal float64 sums over the compressed-tensors decode of the same bytes
    (schemes.decode, bit for bit CT's), to summation-order rounding: every FP4 code, zero
    and negative values, subnormal NVFP4 scales."""
    from qstream.schemes import decode, kernels as K, measure

    rng = np.random.default_rng(3)
    x = rng.standard_normal((48, 512)).astype(np.float32) * np.float32(0.02)
    x *= np.exp2(rng.integers(-12, 3, size=(48, 32, 1))).repeat(16, -1).reshape(48, 512)
    x[0, :40] = 0.0
    x[1, ::3] = -0.0
    x = x.astype(dt)
    if scheme == "nvfp4":
        gs = np.float32(448 * 6 / float(np.abs(x.astype(np.float32)).max()))
        packed, scale = K.quantize_nvfp4(x, gs, "mse")
        dec = decode.decode_nvfp4(packed, scale, gs)
        got = measure.fp4_error(x, packed, scale, gs)
    else:
        packed, scale = K.quantize_mxfp4(x, "mse")
        dec = decode.decode_mxfp4(packed, scale)
        got = measure.fp4_error(x, packed, scale, None, decode._E8M0_BF16)
    codes = np.stack([packed & 15, packed >> 4], -1)
    assert len(np.unique(codes)) == 16  # every FP4 code is decoded
    if scheme == "nvfp4":
        assert np.any(scale.view(np.uint8) < 8)  # subnormal E4M3 block scales
    xf = x.astype(np.float32).astype(np.float64)
    want = (float(np.sum(xf * xf)), float(np.sum((x.astype(np.float32) - dec).astype(np.float64) ** 2)))
    assert got[0] == pytest.approx(want[0], rel=1e-12) and got[1] == pytest.approx(want[1], rel=1e-12)


def test_card_with_fp8_attention_does_not_claim_it_kept(local_src, tmp_path):
    dst = tmp_path / "out"
    run_qstream("convert", local_src, dst, "--mlp", "nvfp4", "--attn", "fp8", "-q", check=True)
    card = (dst / "README.md").read_text()
    kept = re.search(r"^Kept byte for byte as in the source: (.*)\.$", card, re.M).group(1)
    assert "attention" not in kept and "byte for byte as in the source" not in card.replace(
        "Kept byte for byte as in the source: " + kept, "")
    assert re.search(r"^\| attention \| 8 \| 8 \| fp8 \(FP8_DYNAMIC, made from the source\) \|", card, re.M), card
    assert "**FP8**, attention" in card and "compute capability 8.9" in card
    assert "fp8" in card_meta(card)["tags"]


def test_gpt_oss_repack_card_and_inspect_agree(gpt_oss_src, tmp_path):
    """A gpt-oss MXFP4 -> MXFP4 conversion (OpenAI's layout kept: the blocks copied) is quantized
    (losslessly): the card, inspect's role table and its total count it by the same rule."""
    p = run_qstream("inspect", gpt_oss_src, "--mlp", "mxfp4", "--json", check=True)
    plan = json.loads(p.stdout)
    per_role = sum(r["quantized"] for r in plan["roles"].values())
    assert per_role == 4  # 2 layers x stacked gate_up / down blocks
    table = run_qstream("inspect", gpt_oss_src, "--mlp", "mxfp4", check=True).stdout
    total = re.search(r"total\s*│\s*(\d+)\s*│\s*(\d+)", table)
    assert total and int(total.group(2)) == per_role, table
    dst = tmp_path / "out"
    run_qstream("convert", gpt_oss_src, dst, "--mlp", "mxfp4", "-q", check=True)
    card = (dst / "README.md").read_text()
    assert "(unquantized)" not in card and "nothing (all tensors kept)" not in card
    assert "# " in card and "(MXFP4)" in card and "the source's gpt-oss MXFP4 blocks, copied: lossless" in card
    assert "| mlp | mxfp4 | 4 | 0 (lossless repack) |" in card
    assert "`quant_method: mxfp4`" in card and "cannot load per-expert" not in card
    assert card_meta(card)["tags"][-1] == "mxfp4"


def test_modelopt_card(local_src, tmp_path):
    dst = tmp_path / "out"
    run_qstream("convert", local_src, dst, "--mlp", "nvfp4", "--format", "modelopt", "-q", check=True)
    card = (dst / "README.md").read_text()
    assert "modelopt_fp4" in card and "W4A16_NVFP4" in card and "from_pretrained" not in card
    assert "vLLM 0.32.0 or later" in card and "compute capability 7.5" in card and "FP4 Marlin" in card
    assert "| mlp | nvfp4 | 6 |" in card  # measured, as the compressed-tensors output of the same conversion
    assert "modelopt" in card_meta(card)["tags"]


# --------------------------------------------------------------------------- 2. nothing quantized

def test_nothing_quantized_fails_unless_mlp_none(tmp_path):
    cfg = llama_config(hidden=40, inter=72, layers=2)  # no input dimension is a multiple of 32 or 16
    src = write_checkpoint(tmp_path / "src", cfg, llama_tensors(cfg), n_shards=1, extra_files={"README.md": SOURCE_CARD})
    p = run_qstream("convert", src, tmp_path / "out", "--mlp", "mxfp4")
    assert_one_error(p, "nothing would be quantized", "--mlp none")
    assert not (tmp_path / "out" / "config.json").exists()
    run_qstream("convert", src, tmp_path / "copy", "--mlp", "none", "--base-model", "org/tiny", "-q", check=True)
    card = (tmp_path / "copy" / "README.md").read_text()
    meta = card_meta(card)
    assert meta["base_model"] == "org/tiny" and "base_model_relation" not in meta  # a copy is not "quantized"
    assert "(unquantized copy)" in card and "Nothing: every tensor is kept" in card
    assert "nvfp4" not in meta["tags"] and "mxfp4" not in meta["tags"]


# --------------------------------------------------------------------------- 1. foreign quantization

def _gptq(root: Path) -> Path:
    cfg = llama_config(hidden=64, inter=128, layers=1)
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 32}
    t = {k: v for k, v in llama_tensors(cfg).items() if ".mlp." not in k}
    for proj, (o, i) in {"gate_proj": (128, 64), "up_proj": (128, 64), "down_proj": (64, 128)}.items():
        p = f"model.layers.0.mlp.{proj}."
        t[p + "qweight"] = np.zeros((i // 8, o), np.int32)
        t[p + "qzeros"] = np.zeros((i // 32, o // 8), np.int32)
        t[p + "scales"] = np.ones((i // 32, o), np.float16)
        t[p + "g_idx"] = np.zeros(i, np.int32)
    return write_checkpoint(root, cfg, t, n_shards=1)


def test_foreign_quantized_sources_are_refused(tmp_path):
    assert_one_error(run_qstream("convert", _gptq(tmp_path / "gptq"), tmp_path / "o1"), "already quantized",
                     "GPTQ/AWQ", "quant_method gptq")
    cfg = llama_config(hidden=64, inter=128, layers=1)
    t = llama_tensors(cfg)
    t["model.layers.0.mlp.down_proj.weight"] = np.zeros((64 * 128 // 2, 1), np.uint8)
    t["model.layers.0.mlp.down_proj.weight.absmax"] = np.ones(128, np.float32)
    t["model.layers.0.mlp.down_proj.weight.quant_map"] = np.ones(16, np.float32)
    bnb = write_checkpoint(tmp_path / "bnb", cfg, t, n_shards=1)
    assert_one_error(run_qstream("convert", bnb, tmp_path / "o2", "--mlp", "none"), "bitsandbytes")
    cfg2 = dict(cfg, quantization_config={"quant_method": "awq", "bits": 4})
    awq_cfg_only = write_checkpoint(tmp_path / "awq", cfg2, llama_tensors(cfg), n_shards=1)
    assert_one_error(run_qstream("inspect", awq_cfg_only), "quant_method 'awq'", "does not decode")
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


# --------------------------------------------------------------------------- 3. FP16 / FP32 sources

@pytest.mark.parametrize("dtype,np_dtype", [("float16", np.float16), ("float32", np.float32)])
@pytest.mark.parametrize("scheme", ["nvfp4", "mxfp4"])
def test_fp16_fp32_outputs_load_and_run_in_transformers(tmp_path, dtype, np_dtype, scheme):
    """transformers' default load (no dtype argument) through compressed-tensors, then a forward pass."""
    import torch
    from transformers import AutoModelForCausalLM

    cfg = llama_config(hidden=64, inter=128, layers=2)
    cfg["torch_dtype"] = dtype
    src = write_checkpoint(tmp_path / "src", cfg, llama_tensors(cfg, dtype=np_dtype), n_shards=1)
    dst = tmp_path / "out"
    run_qstream("convert", src, dst, "--mlp", scheme, "-q", check=True)
    out_cfg = json.loads((dst / "config.json").read_text())
    assert out_cfg["torch_dtype"] == "bfloat16"
    model = AutoModelForCausalLM.from_pretrained(dst)
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    with torch.no_grad():
        ref_logits = ref(torch.tensor([[1, 2, 3, 4]])).logits
    cos = torch.nn.functional.cosine_similarity(logits.float().flatten(), ref_logits.flatten(), dim=0)
    assert torch.isfinite(logits).all() and cos > 0.9, cos
    assert f"The source is {dtype}" in (dst / "README.md").read_text()


# --------------------------------------------------------------------------- 4. verify

def test_verify_wrong_source_and_unquantized_folder_fail(local_src, tmp_path):
    dst = tmp_path / "out"
    run_qstream("convert", local_src, dst, "--mlp", "nvfp4", "-q", check=True)
    cfg = json.loads((local_src / "config.json").read_text())
    other = write_checkpoint(tmp_path / "other", cfg, llama_tensors(cfg, seed=7), n_shards=1)
    p = run_qstream("verify", dst, "--source", other)
    assert p.returncode == 1 and "verify: OK" not in p.stdout, p.stdout
    assert "exceeds --max-rel-error 0.5 (the default)" in p.stderr and "is --source the checkpoint" in p.stderr
    assert run_qstream("verify", dst, "--source", local_src).returncode == 0
    p = run_qstream("verify", local_src)
    assert p.returncode == 1 and "no quantized module" in p.stderr and "unquantized checkpoint" in p.stderr


# --------------------------------------------------------------------------- 5. DST locked

def test_second_conversion_into_a_locked_dst_is_refused(local_src, tmp_path):
    from qstream.writer import DstLock

    dst = tmp_path / "out"
    run_qstream("convert", local_src, dst, "--mlp", "mxfp4", "-q", check=True)
    before = {p.name: p.read_bytes() for p in dst.iterdir() if p.is_file()}
    lock = DstLock(dst)  # a conversion holding DST (the real flock, in this process)
    try:
        for extra in ((), ("--overwrite",), ("--resume",)):
            p = run_qstream("convert", local_src, dst, "--mlp", "nvfp4", *extra)
            assert_one_error(p, "another qstream conversion is writing into this folder")
    finally:
        lock.release()
    assert {p.name: p.read_bytes() for p in dst.iterdir() if p.is_file()} == before
    run_qstream("convert", local_src, dst, "--mlp", "nvfp4", "--overwrite", "-q", check=True)


# --------------------------------------------------------------------------- 6. mistyped path

def test_mistyped_local_path_is_not_a_network_error(tmp_path):
    p = run_qstream("inspect", "ck/basik", env={"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf")})
    assert_one_error(p, "ck/basik: no local folder of that name exists", "not a reachable Hub repo either")


# --------------------------------------------------------------------------- 7. kernel compile notice

def test_first_run_says_the_kernels_compile(local_src, tmp_path):
    env = {"NUMBA_CACHE_DIR": str(tmp_path / "numba-cache")}
    p = run_qstream("convert", local_src, tmp_path / "out", "--mlp", "mxfp4", "--scale-search", "none", env=env,
                    check=True)
    assert "compiling the FP4 kernels" in p.stdout, p.stdout
    p = run_qstream("convert", local_src, tmp_path / "out2", "--mlp", "mxfp4", "--scale-search", "none", env=env,
                    check=True)
    assert "compiling the FP4 kernels" not in p.stdout  # cached now


# --------------------------------------------------------------------------- 8. dry run and free space

def test_dry_run_checks_dst(local_src, tmp_path):
    assert_one_error(run_qstream("convert", local_src, local_src / "out", "--dry-run"), "inside SRC")
    full = tmp_path / "full"
    full.mkdir()
    (full / "x.txt").write_text("x")
    assert_one_error(run_qstream("convert", local_src, full, "--dry-run"), "not empty")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if os.access(ro, os.W_OK):
            r = run_qstream("convert", local_src, ro / "out", "--dry-run", env={"QSTREAM_TEST_NOTE": "root"})
            assert r.returncode == 0 or "cannot write" in r.stderr  # root writes anywhere
        else:
            assert_one_error(run_qstream("convert", local_src, ro / "out", "--dry-run"), "cannot write")
    finally:
        ro.chmod(0o755)
    ok = run_qstream("convert", local_src, tmp_path / "new", "--dry-run", check=True)
    assert "has room for" in ok.stdout and not (tmp_path / "new").exists()


@pytest.fixture
def small_fs(tmp_path):
    """A 64 KB tmpfs (needs mount rights: root in the CI container)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {r.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


def test_free_space_is_checked_before_starting(local_src, small_fs):
    for extra in (("--dry-run",), ()):
        p = run_qstream("convert", local_src, small_fs / "out", "--mlp", "nvfp4", *extra)
        assert_one_error(p, "the output needs", "free on that device")
    assert not list((small_fs / "out").rglob("*.partial"))


# --------------------------------------------------------------------------- 9. --overwrite

def test_overwrite_replaces_only_what_qstream_wrote(local_src, tmp_path):
    foreign = tmp_path / "foreign"
    shutil.copytree(local_src, foreign)  # a checkpoint qstream never wrote
    before = {p.name: p.read_bytes() for p in foreign.iterdir()}
    p = run_qstream("convert", local_src, foreign, "--mlp", "nvfp4", "--overwrite")
    assert_one_error(p, "which qstream did not write")
    assert {p.name: p.read_bytes() for p in foreign.iterdir()} == before
    ours = tmp_path / "ours"
    run_qstream("convert", local_src, ours, "--mlp", "nvfp4", "--max-shard-size", "60KB", "-q", check=True)
    (ours / "notes.txt").write_text("mine")
    run_qstream("convert", local_src, ours, "--mlp", "mxfp4", "--overwrite", "-q", check=True)
    assert (ours / "notes.txt").read_text() == "mine"
    index = json.loads((ours / "model.safetensors.index.json").read_text())
    assert sorted(p.name for p in ours.glob("*.safetensors")) == sorted(set(index["weight_map"].values()))


# --------------------------------------------------------------------------- 10. leftovers

def test_no_leftovers_after_success_or_failure(tmp_path):
    cfg = llama_config(hidden=64, inter=160, layers=3)
    t = llama_tensors(cfg)
    t["model.layers.2.mlp.up_proj.weight"][3, 5] = np.float32("nan")
    src = write_checkpoint(tmp_path / "src", cfg, t, n_shards=2)
    dst = tmp_path / "out"
    p = run_qstream("convert", src, dst, "--mlp", "nvfp4", "--max-shard-size", "60KB")
    assert_one_error(p, "NaN")
    staging = dst / ".cache" / "huggingface" / "qstream"
    assert not list(staging.glob("*.partial")), list(staging.iterdir())  # no hidden half-written shard
    assert (staging / "journal.json").is_file()  # what --resume needs
    t["model.layers.2.mlp.up_proj.weight"][3, 5] = 0
    src2 = write_checkpoint(tmp_path / "src2", cfg, t, n_shards=2)
    run_qstream("convert", src2, tmp_path / "ok", "--mlp", "nvfp4", "-q", check=True)
    ok = tmp_path / "ok"
    assert not list(ok.rglob("*.partial")) and not (ok / ".qstream").exists()
    assert [p.name for p in (ok / ".cache" / "huggingface" / "qstream").iterdir()] == ["journal.json"]


# --------------------------------------------------------------------------- 11. smaller ones

def test_warnings_are_grouped_and_silent_surprises_are_said(tmp_path):
    cfg = llama_config(hidden=64, inter=100, layers=3)  # down_proj in_features 100: not a multiple of 32
    cfg["architectures"], cfg["model_type"] = ["NovelForCausalLM"], "novel"
    src = write_checkpoint(tmp_path / "src", cfg, llama_tensors(cfg), n_shards=1)
    p = run_qstream("convert", src, tmp_path / "out", "--mlp", "mxfp4", "--max-shard-size", "10KB",
                    "--ignore", "no_such_tensor", "-q", check=True)
    warns = [line for line in p.stderr.splitlines() if line.startswith("warning:")]
    down = [w for w in warns if "not a multiple" in w]
    assert len(down) == 1 and down[0].startswith("warning: 3 tensors (model.layers.0.mlp.down_proj.weight"), warns
    assert any("--max-shard-size 10000 B is smaller than" in w for w in warns), warns
    assert any("--ignore 'no_such_tensor' matches no tensor" in w for w in warns), warns
    assert any("NovelForCausalLM" in w and "generic name rules" in w for w in warns), warns


def test_plain_progress_has_no_first_sample_rate_and_title_does_not_wrap(local_src, tmp_path):
    deep = tmp_path / ("d" * 60) / ("e" * 60) / "out"
    p = run_qstream("convert", local_src, deep, "--mlp", "mxfp4", env={"COLUMNS": "80"}, check=True)
    progress = [line for line in p.stdout.splitlines() if " tensors, " in line and "/s, ETA" in line]
    # a tiny conversion takes under 5 s: one line, the last, and no rate from a single tensor
    assert len(progress) == 1 and re.match(r"(\d+)/\1 tensors", progress[0]), p.stdout
    title = [line for line in p.stdout.splitlines() if line.startswith("Converted ")]
    assert title == [f"Converted {local_src} -> {deep}"], p.stdout
