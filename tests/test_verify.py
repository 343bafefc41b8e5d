"""`qstream verify`: a fresh conversion passes, corruptions are caught with one clear line
each, and against the source the reported errors match a direct numpy computation."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch

from conftest import run_qstream
from synth import qwen3_moe_config, qwen3_moe_tensors, write_checkpoint, write_mistral3_fp8
from test_convert import load_dir
from qstream.convert import convert
from qstream.plan import Options, make_plan
from qstream.safetensors_io import build_header, read_header
from qstream.schemes import reference
from qstream.source import INDEX_NAME, open_checkpoint
from qstream.verify import decode_mxfp4, decode_nvfp4, verify

FORMAT = {"nvfp4": "nvfp4-pack-quantized", "mxfp4": "mxfp4-pack-quantized"}
MLP = [f"model.layers.{L}.mlp.{p}" for L in range(3) for p in ("gate_proj", "up_proj", "down_proj")]


def _convert(src: Path, dst: Path, scheme: str, **opts) -> Path:
    convert(make_plan(open_checkpoint(src), Options(mlp=scheme, **opts)), dst)
    return dst


@pytest.fixture(scope="module")
def outputs(tiny_ckpt, tmp_path_factory):
    """tiny_ckpt converted with both schemes, in several shards (so the index matters)."""
    root = tmp_path_factory.mktemp("verify")
    return {s: _convert(tiny_ckpt, root / s, s, max_shard_size=60_000) for s in ("mxfp4", "nvfp4")}


def f32(t: torch.Tensor) -> np.ndarray:
    return t.float().numpy()


def np_u8(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().view(torch.uint8).numpy()


def rel_error(w: np.ndarray, w_hat: np.ndarray) -> float:
    w, w_hat = w.astype(np.float64), w_hat.astype(np.float64)
    return math.sqrt(((w - w_hat) ** 2).sum() / (w ** 2).sum())


def decoded(out: dict, module: str, scheme: str) -> np.ndarray:
    """The module's weight as compressed-tensors decodes it, from the numpy spec."""
    packed, scale = np_u8(out[module + ".weight_packed"]), np_u8(out[module + ".weight_scale"])
    if scheme == "nvfp4":
        return reference.dequantize_nvfp4(packed, scale, out[module + ".weight_global_scale"].item())
    return reference.dequantize_mxfp4(packed, scale)


# --------------------------------------------------------------------------- a fresh conversion


@pytest.mark.parametrize("scheme", ["mxfp4", "nvfp4"])
def test_fresh_conversion_passes_and_errors_match_numpy(outputs, tiny_ckpt, scheme):
    dst = outputs[scheme]
    assert len(list(dst.glob("*.safetensors"))) > 1
    p = run_qstream("verify", dst, "--source", tiny_ckpt, "--json")
    assert p.returncode == 0, p.stderr
    j = json.loads(p.stdout)
    assert j["ok"] and j["errors"] == [] and j["warnings"] == []
    assert j["summary"]["quantized_modules"] == {FORMAT[scheme]: 9}
    assert j["summary"]["unquantized_linears"] == 13  # 3 x 4 attention + lm_head
    m = j["metrics"]
    tensors = {t["module"]: t for t in m["tensors"]}
    assert set(tensors) == set(MLP)
    rels = [t["rel_error"] for t in m["tensors"]]
    assert rels == sorted(rels, reverse=True)  # worst first
    assert set(m["roles"]) == {"mlp"} and m["roles"]["mlp"]["tensors"] == 9

    src, out = load_dir(tiny_ckpt), load_dir(dst)
    sum_sq = err_sq = 0.0
    for module in MLP:
        w, w_hat = f32(src[module + ".weight"]), decoded(out, module, scheme)
        d = (w.astype(np.float64) - w_hat)
        sum_sq += (w.astype(np.float64) ** 2).sum()
        err_sq += (d ** 2).sum()
        t = tensors[module]
        r = rel_error(w, w_hat)
        assert t["rel_error"] == pytest.approx(r, rel=1e-6), module
        assert t["rel_mse"] == pytest.approx(r * r, rel=1e-6)
        assert t["snr_db"] == pytest.approx(-20 * math.log10(r), rel=1e-6)
        assert t["max_abs_error"] == pytest.approx(np.abs(d).max(), rel=1e-6)
        assert t["shape"] == list(w.shape) and t["role"] == "mlp" and t["scheme"] == scheme
    role = m["roles"]["mlp"]
    assert role["rel_error"] == pytest.approx(math.sqrt(err_sq / sum_sq), rel=1e-6)
    assert role["snr_db"] == pytest.approx(10 * math.log10(sum_sq / err_sq), rel=1e-6)
    # Gaussian weights: NVFP4 ~0.095, MXFP4 ~0.112 relative error
    lo, hi = {"nvfp4": (0.085, 0.105), "mxfp4": (0.10, 0.125)}[scheme]
    assert lo < role["rel_error"] < hi


def test_table_output_and_threshold(outputs, tiny_ckpt):
    p = run_qstream("verify", outputs["nvfp4"], "--source", tiny_ckpt, "--top", "3")
    assert p.returncode == 0, p.stderr
    assert "Error by role" in p.stdout and "Worst tensors (top 3 of 9)" in p.stdout
    assert p.stdout.rstrip().splitlines()[-1].startswith("verify: OK")
    assert run_qstream("verify", outputs["nvfp4"]).returncode == 0  # structure only
    report = verify(outputs["mxfp4"], tiny_ckpt, max_rel_error=0.05)
    assert not report.ok and len(report.errors) == 9
    assert all("exceeds --max-rel-error 0.05" in e for e in report.errors)
    assert verify(outputs["mxfp4"], tiny_ckpt, max_rel_error=0.2).ok
    p = run_qstream("verify", outputs["mxfp4"], "--max-rel-error", "0.1")
    assert p.returncode == 2 and "needs --source" in p.stderr


def test_fast_decoders_are_the_spec():
    rng = np.random.default_rng(3)
    packed = rng.integers(0, 256, (32, 64), dtype=np.uint8)
    e4m3 = rng.integers(0, 256, (32, 8), dtype=np.uint8)
    e8m0 = rng.integers(0, 256, (32, 4), dtype=np.uint8)
    for gs in (1.0, 2688 / 0.37, 1e-3):
        a, b = decode_nvfp4(packed, e4m3, np.float32(gs)), reference.dequantize_nvfp4(packed, e4m3, np.float32(gs))
        assert np.array_equal(a.view(np.uint32), b.view(np.uint32))
    a, b = decode_mxfp4(packed, e8m0), reference.dequantize_mxfp4(packed, e8m0)
    assert np.array_equal(a.view(np.uint32), b.view(np.uint32))


# --------------------------------------------------------------------------- corruptions


def shard_of(dst: Path, name: str) -> Path:
    return dst / json.loads((dst / INDEX_NAME).read_text())["weight_map"][name]


def rewrite_shard(path: Path, edit) -> None:
    """Rewrite a shard after ``edit(entries)`` changed {name: [dtype, shape, bytes]}."""
    hdr = read_header(path)
    data = path.read_bytes()
    entries = {t.name: [t.dtype, list(t.shape), data[t.begin:t.end]]
               for t in sorted(hdr.tensors.values(), key=lambda t: t.begin)}
    edit(entries)
    rows, off = [], 0
    for name, (dtype, shape, b) in entries.items():
        rows.append((name, dtype, tuple(shape), off, off + len(b)))
        off += len(b)
    path.write_bytes(build_header(rows, hdr.metadata) + b"".join(e[2] for e in entries.values()))


def fix_index(dst: Path) -> None:
    """Make the index describe the shards as they now are."""
    index = json.loads((dst / INDEX_NAME).read_text())
    wm, total = {}, 0
    for f in sorted(set(index["weight_map"].values())):
        for t in read_header(dst / f).tensors.values():
            wm[t.name] = f
            total += t.nbytes
    (dst / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": wm}))


def patch(dst: Path, name: str, index: int, value: bytes) -> None:
    """Overwrite element ``index`` of tensor ``name`` in place."""
    path = shard_of(dst, name)
    info = read_header(path).tensors[name]
    with open(path, "r+b") as f:
        f.seek(info.begin + index * len(value))
        f.write(value)


def edit_index(dst: Path, fn) -> None:
    index = json.loads((dst / INDEX_NAME).read_text())
    fn(index)
    (dst / INDEX_NAME).write_text(json.dumps(index))


M = "model.layers.0.mlp.up_proj"


def _missing_scale(dst):
    rewrite_shard(shard_of(dst, M + ".weight_scale"), lambda e: e.pop(M + ".weight_scale"))
    fix_index(dst)
    return f"{M}.weight_scale is missing ({M} resolves to group_0, nvfp4-pack-quantized)"


def _wrong_dtype(dst):
    rewrite_shard(shard_of(dst, M + ".weight_scale"), lambda e: e[M + ".weight_scale"].__setitem__(0, "U8"))
    return f"{shard_of(dst, M + '.weight_scale').name}: {M}.weight_scale has dtype U8, expected F8_E4M3"


def _wrong_shape(dst):
    def edit(e):
        e[M + ".weight_scale"][1] = [e[M + ".weight_scale"][1][0] // 2, e[M + ".weight_scale"][1][1] * 2]
    rewrite_shard(shard_of(dst, M + ".weight_scale"), edit)
    return f"{M}.weight_scale has shape [80, 8], expected [160, 4]"


def _nan_passthrough(dst):
    name = "model.layers.1.self_attn.o_proj.weight"
    patch(dst, name, 123, np.array([np.nan], ml_dtypes.bfloat16).tobytes())
    return f"{shard_of(dst, name).name}: {name} holds 1 NaN/Inf value(s)"


def _inf_norm(dst):
    name = "model.layers.2.input_layernorm.weight"
    patch(dst, name, 3, np.array([-np.inf], ml_dtypes.bfloat16).tobytes())
    return f"{name} holds 1 NaN/Inf value(s)"


def _nan_scale(dst):
    patch(dst, M + ".weight_scale", 7, b"\x7f")
    return f"{shard_of(dst, M + '.weight_scale').name}: {M}.weight_scale holds 1 NaN E4M3 scale(s) (byte 0x7F/0xFF)"


def _wrong_shard(dst):
    name = "model.layers.1.self_attn.k_proj.weight"
    right = shard_of(dst, name).name
    other = next(p.name for p in sorted(dst.glob("*.safetensors")) if p.name != right)
    edit_index(dst, lambda ix: ix["weight_map"].__setitem__(name, other))
    return f"{right}: {name} is in this shard but {INDEX_NAME} maps it to {other}"


def _total_size(dst):
    edit_index(dst, lambda ix: ix["metadata"].__setitem__("total_size", ix["metadata"]["total_size"] + 1))
    return f"{INDEX_NAME}: metadata.total_size is"


def _stray_shard(dst):
    shutil.copy(sorted(dst.glob("*.safetensors"))[0], dst / "model-extra.safetensors")
    return "model-extra.safetensors: is not named by"


def _unindexed_tensor(dst):
    edit_index(dst, lambda ix: ix["weight_map"].pop("model.norm.weight"))
    return f"model.norm.weight is not in {INDEX_NAME}"


def _leftover_weight(dst):
    def edit(e):
        e[M + ".weight"] = ["BF16", [160, 64], bytes(160 * 64 * 2)]
    rewrite_shard(shard_of(dst, M + ".weight_scale"), edit)
    fix_index(dst)
    return f"{M}.weight is an unquantized weight left beside the quantized one"


def _packed_but_ignored(dst):
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"]["ignore"].append(M)
    (dst / "config.json").write_text(json.dumps(cfg))
    return f"{M}.weight_packed exists but {M} resolves to no quantization_config group"


@pytest.mark.parametrize("corrupt", [_missing_scale, _wrong_dtype, _wrong_shape, _nan_passthrough, _inf_norm,
                                     _nan_scale, _wrong_shard, _total_size, _stray_shard, _unindexed_tensor,
                                     _leftover_weight, _packed_but_ignored],
                         ids=lambda f: f.__name__.strip("_"))
def test_corruption_is_caught(outputs, tmp_path, corrupt):
    dst = tmp_path / "out"
    shutil.copytree(outputs["nvfp4"], dst)
    assert verify(dst).ok
    expected = corrupt(dst)
    report = verify(dst, scan_block=64)  # tiny blocks: the scan streams
    assert not report.ok
    assert any(expected in e for e in report.errors), report.errors
    assert len(report.errors) <= 2, report.errors  # one clear line per broken thing


def test_cli_exit_code_and_error_line(outputs, tmp_path):
    dst = tmp_path / "out"
    shutil.copytree(outputs["nvfp4"], dst)
    expected = _wrong_dtype(dst)
    p = run_qstream("verify", dst)
    assert p.returncode == 1
    assert "Traceback" not in p.stderr
    assert f"error: {expected}" in p.stderr.splitlines()
    assert "verify: FAILED, 1 error(s)" in p.stdout
    p = run_qstream("verify", dst, "--json")
    assert p.returncode == 1 and json.loads(p.stdout)["errors"] == [expected]


def test_mxfp4_exponent_255_is_caught(outputs, tmp_path):
    dst = tmp_path / "out"
    shutil.copytree(outputs["mxfp4"], dst)
    patch(dst, M + ".weight_scale", 5, b"\xff")
    report = verify(dst)
    assert report.errors == [f"{shard_of(dst, M + '.weight_scale').name}: {M}.weight_scale holds 1 exponent(s) 255, "
                             "which decode to NaN/Inf scales"]


# --------------------------------------------------------------------------- other sources


def _quantized_modules(dst: Path) -> set[str]:
    out = load_dir(dst)
    return {k.rsplit(".", 1)[0] for k, v in out.items()
            if k.endswith(".weight_packed") or (k.endswith(".weight") and v.dtype == torch.float8_e4m3fn)}


def test_fp8_source(tmp_path):
    src = write_mistral3_fp8(tmp_path / "src")
    dst = _convert(src, tmp_path / "out", "nvfp4")
    report = verify(dst, src)
    assert report.ok, report.errors
    assert report.modules == {"nvfp4-pack-quantized": 6, "float-quantized": 8}
    got = {m.module: m for m in report.metrics}
    assert set(got) == _quantized_modules(dst)
    for m in got.values():
        if m.scheme == "fp8":  # attention FP8 bytes kept, scales renamed: decodes to the source exactly
            assert m.role == "attention" and m.err_sq == 0 and m.rel_error == 0 and "weight_scale_inv (tensor)" in m.source
        else:  # MLP requantized from the exact float32 values of fp8 x scale
            assert m.role == "mlp" and 0.08 < m.rel_error < 0.11
    j = report.to_json()
    assert set(j["metrics"]["roles"]) == {"attention", "mlp"} and j["metrics"]["roles"]["attention"]["snr_db"] is None


def test_fused_experts_source(tmp_path):
    cfg = qwen3_moe_config()
    tensors = qwen3_moe_tensors(cfg, fused=True)
    src = write_checkpoint(tmp_path / "src", cfg, tensors, n_shards=2)
    dst = _convert(src, tmp_path / "out", "mxfp4")
    report = verify(dst, src)
    assert report.ok, report.errors
    got = {m.module: m for m in report.metrics}
    assert set(got) == _quantized_modules(dst) and len(got) == 2 * 4 * 3
    assert all(0.09 < m.rel_error < 0.13 for m in got.values())
    # expert 1's up_proj is the second half of gate_up_proj[1]: check it directly
    mod = "model.layers.1.mlp.experts.1.up_proj"
    w = tensors["model.layers.1.mlp.experts.gate_up_proj"][1, 64:].astype(np.float32)
    out = load_dir(dst)
    assert got[mod].rel_error == pytest.approx(rel_error(w, decoded(out, mod, "mxfp4")), rel=1e-6)
    assert got[mod].source == "model.layers.1.mlp.experts.gate_up_proj[expert 1, rows 64::1 x64]"
