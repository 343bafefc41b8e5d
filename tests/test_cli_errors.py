"""Bad input gets one clear sentence and a non-zero exit, and leaves nothing finished-looking."""

from __future__ import annotations

import json
import shutil
import struct

import pytest

from conftest import run_qstream


def assert_clean_error(p, *words):
    assert p.returncode != 0
    assert "Traceback" not in p.stderr, p.stderr
    msg = p.stderr.strip()
    assert msg.startswith("error:"), msg
    assert len(msg.splitlines()) <= 3, msg  # one sentence (rich may wrap it)
    for w in words:
        assert w in msg.replace("\n", " "), (w, msg)


def test_missing_src(tmp_path):
    p = run_qstream("convert", tmp_path / "nope", tmp_path / "out")
    assert_clean_error(p, "does not exist")
    assert not (tmp_path / "out").exists()


def test_folder_without_safetensors(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text("{}")
    (src / "pytorch_model.bin").write_bytes(b"x")
    assert_clean_error(run_qstream("inspect", src), "no safetensors")


def test_missing_config(tiny_ckpt, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_ckpt, src)
    (src / "config.json").unlink()
    assert_clean_error(run_qstream("convert", src, tmp_path / "out"), "config.json")
    (src / "config.json").write_text("{not json")
    assert_clean_error(run_qstream("convert", src, tmp_path / "out"), "config.json")
    assert not (tmp_path / "out" / "config.json").exists()


def test_dst_not_empty(tiny_ckpt, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    assert_clean_error(run_qstream("convert", tiny_ckpt, dst), "not empty", "--overwrite")
    run_qstream("convert", tiny_ckpt, dst, "--overwrite", "-q", check=True)
    assert (dst / "config.json").exists() and (dst / "keep.txt").read_text() == "mine"


def test_dst_inside_src(tiny_ckpt, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_ckpt, src)
    assert_clean_error(run_qstream("convert", src, src / "out"), "inside SRC")
    assert not (src / "out").exists()


def test_unreadable_dtype(tiny_ckpt, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_ckpt, src)
    f = sorted(src.glob("model-*.safetensors"))[0]
    data = bytearray(f.read_bytes())
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    name = next(k for k in header if k.endswith("mlp.up_proj.weight"))
    header[name]["dtype"] = "Q4_K"
    js = json.dumps(header, separators=(",", ":")).encode()
    js += b" " * (n - len(js)) if len(js) <= n else b""
    assert len(js) == n
    f.write_bytes(bytes(data[:8]) + js + bytes(data[8 + n:]))
    p = run_qstream("convert", src, tmp_path / "out")
    assert_clean_error(p, name, "Q4_K", f.name)
    assert not (tmp_path / "out" / "config.json").exists()


@pytest.mark.parametrize("cut", [4, 100, -1000])
def test_truncated_shard(tiny_ckpt, tmp_path, cut):
    src = tmp_path / "src"
    shutil.copytree(tiny_ckpt, src)
    f = sorted(src.glob("model-*.safetensors"))[-1]
    data = f.read_bytes()
    f.write_bytes(data[:cut])
    p = run_qstream("convert", src, tmp_path / "out")
    assert_clean_error(p, f.name)
    assert not (tmp_path / "out" / "config.json").exists()


def test_index_names_missing_shard(tiny_ckpt, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_ckpt, src)
    victim = sorted(src.glob("model-*.safetensors"))[-1]
    victim.unlink()
    assert_clean_error(run_qstream("inspect", src), victim.name, "missing")


def test_non_quantizable_dtype_in_mlp(tmp_path):
    import numpy as np

    from synth import llama_config, llama_tensors, write_checkpoint

    cfg = llama_config(layers=1)
    t = llama_tensors(cfg)
    t["model.layers.0.mlp.up_proj.weight"] = np.zeros(t["model.layers.0.mlp.up_proj.weight"].shape, np.int32)
    src = write_checkpoint(tmp_path / "src", cfg, t, n_shards=1)
    assert_clean_error(run_qstream("convert", src, tmp_path / "out"), "model.layers.0.mlp.up_proj.weight", "I32", "--ignore")


def test_nan_weight_is_named(tmp_path):
    import numpy as np

    from synth import llama_config, llama_tensors, write_checkpoint

    cfg = llama_config(layers=1)
    t = llama_tensors(cfg)
    w = t["model.layers.0.mlp.down_proj.weight"].astype(np.float32)
    w[3, 5] = np.nan
    w[7, 1] = np.inf
    t["model.layers.0.mlp.down_proj.weight"] = w.astype(t["model.layers.0.mlp.down_proj.weight"].dtype)
    src = write_checkpoint(tmp_path / "src", cfg, t, n_shards=1)
    p = run_qstream("convert", src, tmp_path / "out", "--mlp", "mxfp4")
    assert_clean_error(p, "model.layers.0.mlp.down_proj.weight", "2 NaN/Inf")
    assert not (tmp_path / "out" / "config.json").exists()
    assert not list((tmp_path / "out").glob("*.safetensors"))


def test_already_fp4_source_is_refused(tiny_ckpt, tmp_path):
    out = tmp_path / "out"
    run_qstream("convert", tiny_ckpt, out, "-q", check=True)
    assert_clean_error(run_qstream("convert", out, tmp_path / "again"), "already quantized", "mxfp4-pack-quantized", "weight_packed")
