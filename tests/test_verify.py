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
from synth import (mixtral_config, mixtral_tensors, qwen3_moe_config, qwen3_moe_tensors, write_checkpoint,
                   write_mistral3_fp8)
from test_convert import load_dir
from qstream.convert import convert
from qstream.plan.plan import Options, make_plan
from qstream.safetensors_io import build_header, read_header
from qstream.schemes import reference
from qstream.sources.source import INDEX_NAME, open_checkpoint
from qstream.schemes.decode import decode_modelopt_nvfp4, decode_mxfp4, decode_nvfp4
from qstream.verify.verify import verify

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
    # Gaussian weights: NVFP4 ~0.095 (round-to-nearest) / ~0.083 (default --scale-search mse),
    # MXFP4 ~0.112 relative error
    lo, hi = {"nvfp4": (0.075, 0.105), "mxfp4": (0.10, 0.125)}[scheme]
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


def test_fp8_source_measures_do_not_depend_on_threads(tmp_path):
    """Each verify pool thread decodes the source with its own Executor (reader and FP8 scale
    cache): 1 and 4 threads report the same numbers for every module."""
    src = write_mistral3_fp8(tmp_path / "src")
    dst = _convert(src, tmp_path / "out", "mxfp4")
    one, four = verify(dst, src, threads=1), verify(dst, src, threads=4)
    assert one.ok and four.ok, one.errors + four.errors
    a = {m.module: (m.err_sq, m.sum_sq, m.max_abs) for m in one.metrics}
    assert len(a) == 14 and a == {m.module: (m.err_sq, m.sum_sq, m.max_abs) for m in four.metrics}


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


# --------------------------------------------------------------------------- ModelOpt output


@pytest.fixture(scope="module")
def modelopt_outputs(tiny_ckpt, tmp_path_factory):
    """Per model: (source, compressed-tensors output, --format modelopt output in several shards)."""
    root = tmp_path_factory.mktemp("verify-modelopt")
    cfg = mixtral_config()
    mixtral = write_checkpoint(root / "mixtral", cfg, mixtral_tensors(cfg), n_shards=2)
    out = {}
    for name, src in (("llama", tiny_ckpt), ("mixtral", mixtral)):
        ct = _convert(src, root / f"{name}-ct", "nvfp4")
        mo = _convert(src, root / f"{name}-mo", "nvfp4", format="modelopt", max_shard_size=60_000)
        out[name] = (src, ct, mo)
    return out


@pytest.mark.parametrize("name", ["llama", "mixtral"])
def test_modelopt_output_passes_with_the_errors_of_compressed_tensors(modelopt_outputs, name):
    src, ct, mo = modelopt_outputs[name]
    assert len(list(mo.glob("*.safetensors"))) > 1
    n = 9 if name == "llama" else 24
    structural = verify(mo)
    assert structural.ok and structural.errors == [] and structural.warnings == []
    assert structural.modules == {"W4A16_NVFP4": n} and structural.metrics is None
    report = verify(mo, src)
    assert report.ok and report.warnings == [], report.errors
    ref = verify(ct, src)
    assert ref.ok and ref.modules == {"nvfp4-pack-quantized": n}
    assert report.ignored_modules == ref.ignored_modules == (13 if name == "llama" else 11)
    got, want = {m.module: m for m in report.metrics}, {m.module: m for m in ref.metrics}
    assert set(got) == set(want) and len(got) == n
    for module, m in got.items():
        r = want[module]
        assert (m.scheme, m.role, m.shape, m.source) == (r.scheme, r.role, r.shape, r.source)
        assert m.rel_error == pytest.approx(r.rel_error, rel=1e-6), module
        assert m.snr_db == pytest.approx(r.snr_db, rel=1e-6) and m.max_abs == pytest.approx(r.max_abs, rel=1e-6)
    j, jr = report.to_json()["metrics"], ref.to_json()["metrics"]
    assert j["schemes"]["nvfp4"]["rel_error"] == pytest.approx(jr["schemes"]["nvfp4"]["rel_error"], rel=1e-6)
    assert 0.075 < j["total"]["rel_error"] < 0.105  # ~0.083 with the default --scale-search mse, ~0.095 without


@pytest.mark.parametrize("name", ["llama", "mixtral"])
def test_modelopt_checkpoint_as_source(modelopt_outputs, tmp_path, name):
    """--source a ModelOpt NVFP4 checkpoint: each module is matched to its packed source weight
    (not to the op that reads weight_scale_2) and decoded with ModelOpt's formula; its
    compressed-tensors repack, and the checkpoint itself, decode to it exactly."""
    src, ct, mo = modelopt_outputs[name]
    n = 9 if name == "llama" else 24
    rt = _convert(mo, tmp_path / "rt", "nvfp4")
    for dst in (rt, mo):
        report = verify(dst, mo)
        assert report.ok, report.errors
        assert len(report.metrics) == n
        for m in report.metrics:
            assert m.scheme == "nvfp4" and m.numel == m.shape[0] * m.shape[1], m.module
            assert m.source == f"{m.module}.weight x {m.module}.weight_scale (modelopt nvfp4)", m.source
            assert m.max_abs == 0.0 and m.rel_error == 0.0, (dst.name, m.module, m.max_abs)


def test_modelopt_decoder_is_modelopts_formula():
    """decode_modelopt_nvfp4 == ModelOpt NVFP4QTensor.dequantize to bfloat16 (test_modelopt's mirror,
    held to nvidia-modelopt there): fp4 * float32(float32(s) * weight_scale_2)."""
    from test_modelopt import modelopt_decode

    rng = np.random.default_rng(5)
    packed = rng.integers(0, 256, (32, 64), dtype=np.uint8)
    e4m3 = rng.integers(0, 256, (32, 8), dtype=np.uint8)
    e4m3[(e4m3 & 0x7F) == 0x7F] = 0x38  # no NaN scales here
    for s2 in (1.0, 0.37 / 2688, 1e-3 / 3):
        s2 = np.float32(s2)
        a = decode_modelopt_nvfp4(packed, e4m3, s2)
        b = modelopt_decode(torch.from_numpy(packed), torch.from_numpy(e4m3).view(torch.float8_e4m3fn),
                            torch.tensor(s2)).float().numpy()
        assert np.array_equal(a, b)  # values (ModelOpt decodes code 0x8 to +0.0)


def _mo_copy(modelopt_outputs, tmp_path, name="llama") -> Path:
    dst = tmp_path / "out"
    shutil.copytree(modelopt_outputs[name][2], dst)
    return dst


def _edit_configs(dst: Path, fn_excludes=None, hf_only=None) -> None:
    """Edit the exclude list in both config.json and hf_quant_config.json (or hf_quant_config.json only)."""
    cfg = json.loads((dst / "config.json").read_text())
    hf = json.loads((dst / "hf_quant_config.json").read_text())
    if fn_excludes:
        fn_excludes(cfg["quantization_config"]["ignore"])
        fn_excludes(hf["quantization"]["exclude_modules"])
    if hf_only:
        hf_only(hf["quantization"])
    (dst / "config.json").write_text(json.dumps(cfg))
    (dst / "hf_quant_config.json").write_text(json.dumps(hf))


def _mo_missing_scale_2(dst):
    rewrite_shard(shard_of(dst, M + ".weight_scale_2"), lambda e: e.pop(M + ".weight_scale_2"))
    fix_index(dst)
    return f"{M}.weight_scale_2 is missing ({M} resolves to ModelOpt W4A16_NVFP4: no exclude_modules entry matches it)"


def _mo_scale_2_dtype(dst):
    rewrite_shard(shard_of(dst, M + ".weight_scale_2"), lambda e: e[M + ".weight_scale_2"].__setitem__(0, "I32"))
    return f"{shard_of(dst, M + '.weight_scale_2').name}: {M}.weight_scale_2 has dtype I32, expected F32"


def _mo_scale_dtype(dst):
    rewrite_shard(shard_of(dst, M + ".weight_scale"), lambda e: e[M + ".weight_scale"].__setitem__(0, "U8"))
    return f"{M}.weight_scale has dtype U8, expected F8_E4M3"


def _mo_scale_2_shape(dst):
    rewrite_shard(shard_of(dst, M + ".weight_scale_2"),
                  lambda e: e[M + ".weight_scale_2"].__setitem__(1, [2]) or e[M + ".weight_scale_2"].__setitem__(2, bytes(8)))
    fix_index(dst)
    return f"{M}.weight_scale_2 has shape [2], expected a scalar ([] or [1])"


def _mo_scale_2_negative(dst):
    patch(dst, M + ".weight_scale_2", 0, np.array([-0.25], np.float32).tobytes())
    return f"{M}.weight_scale_2 is -0.25; weight_scale_2 (a multiplier) must be positive"


def _mo_scale_2_nan(dst):
    patch(dst, M + ".weight_scale_2", 0, np.array([np.nan], np.float32).tobytes())
    return f"{M}.weight_scale_2 holds 1 NaN/Inf value(s)"


def _mo_nan_block_scale(dst):
    patch(dst, M + ".weight_scale", 3, b"\xff")
    return f"{M}.weight_scale holds 1 NaN E4M3 scale(s) (byte 0x7F/0xFF)"


def _mo_nan_passthrough(dst):
    name = "model.layers.2.self_attn.v_proj.weight"
    patch(dst, name, 9, np.array([np.inf], ml_dtypes.bfloat16).tobytes())
    return f"{shard_of(dst, name).name}: {name} holds 1 NaN/Inf value(s)"


def _mo_quantized_but_excluded(dst):
    _edit_configs(dst, lambda ex: ex.append(M))
    return (f"{M}.weight_scale_2 exists but exclude_modules entry '{M}' excludes {M} in vLLM and TensorRT-LLM, "
            "which would load it unquantized")


def _mo_unquantized_not_excluded(dst):
    _edit_configs(dst, lambda ex: ex.remove("lm_head"))
    return ("lm_head.weight is BF16, unquantized, but no exclude_modules entry excludes lm_head in vLLM or "
            "TensorRT-LLM, which would load it as W4A16_NVFP4")


def _mo_stray_ct_tensor(dst):
    def edit(e):
        e[M + ".weight_global_scale"] = ["F32", [1], np.array([448.0], np.float32).tobytes()]
    rewrite_shard(shard_of(dst, M + ".weight_scale_2"), edit)
    fix_index(dst)
    return f"{M}.weight_global_scale is a compressed-tensors tensor in a ModelOpt W4A16_NVFP4 checkpoint"


def _mo_ct_module(dst):
    def edit(e):
        for a, b in (("weight", "weight_packed"), ("weight_scale_2", "weight_global_scale")):
            if M + "." + a in e:
                e[M + "." + b] = e.pop(M + "." + a)
    for f in {shard_of(dst, M + ".weight"), shard_of(dst, M + ".weight_scale_2")}:
        rewrite_shard(f, edit)
    fix_index(dst)
    return f"{M} holds compressed-tensors tensors ("


def _mo_algo_mismatch(dst):
    _edit_configs(dst, hf_only=lambda q: q.__setitem__("quant_algo", "NVFP4"))
    return ("hf_quant_config.json: quantization.quant_algo is 'NVFP4' but config.json's quantization_config.quant_algo "
            "is 'W4A16_NVFP4'")


def _mo_excludes_mismatch(dst):
    _edit_configs(dst, hf_only=lambda q: q["exclude_modules"].remove("lm_head"))
    return ("hf_quant_config.json: quantization.exclude_modules differs from config.json's quantization_config.ignore "
            "(only here: []; only in config.json: ['lm_head'])")


def _mo_group_size(dst):
    _edit_configs(dst, hf_only=lambda q: q.__setitem__("group_size", 32))
    return "hf_quant_config.json: quantization.group_size is 32; NVFP4 blocks are 16 weights"


def _mo_no_hf_quant_config(dst):
    (dst / "hf_quant_config.json").unlink()
    return "hf_quant_config.json: missing, but config.json says ModelOpt"


@pytest.mark.parametrize("corrupt", [_mo_missing_scale_2, _mo_scale_2_dtype, _mo_scale_dtype, _mo_scale_2_shape,
                                     _mo_scale_2_negative, _mo_scale_2_nan, _mo_nan_block_scale, _mo_nan_passthrough,
                                     _mo_quantized_but_excluded, _mo_unquantized_not_excluded, _mo_stray_ct_tensor,
                                     _mo_ct_module, _mo_algo_mismatch, _mo_excludes_mismatch, _mo_group_size,
                                     _mo_no_hf_quant_config],
                         ids=lambda f: f.__name__.strip("_"))
def test_modelopt_corruption_is_caught(modelopt_outputs, tmp_path, corrupt):
    dst = _mo_copy(modelopt_outputs, tmp_path)
    expected = corrupt(dst)
    report = verify(dst, scan_block=64)
    assert len(report.errors) == 1 and expected in report.errors[0], report.errors  # one clear line


def test_modelopt_exclusion_is_matched_as_the_runtimes_do(modelopt_outputs, tmp_path):
    """An entry naming the router of a dense MLP by mistake (``mlp.gate``) is a substring of
    ``mlp.gate_proj`` and of the fused ``mlp.gate_up_proj``: vLLM would load both unquantized
    (TensorRT-LLM's fnmatch would not); a 0-d or [1] weight_scale_2 both load."""
    src = modelopt_outputs["llama"][0]
    dst = _mo_copy(modelopt_outputs, tmp_path)
    name = "model.layers.0.mlp.gate_proj.weight_scale_2"
    rewrite_shard(shard_of(dst, name), lambda e: e[name].__setitem__(1, [1]))
    report = verify(dst, src)
    assert report.ok and len(report.metrics) == 9, report.errors
    _edit_configs(dst, lambda ex: ex.append("model.layers.0.mlp.gate"))
    p = run_qstream("verify", dst)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    lines = [x for x in p.stderr.splitlines() if x.startswith("error: ")]
    assert len(lines) == 2, p.stderr
    assert lines[0].endswith(": model.layers.0.mlp.gate_proj.weight_scale_2 exists but exclude_modules entry "
                             "'model.layers.0.mlp.gate' excludes model.layers.0.mlp.gate_proj in vLLM, which would "
                             "load it unquantized")
    assert lines[1].endswith(": model.layers.0.mlp.up_proj.weight_scale_2 exists but exclude_modules entry "
                             "'model.layers.0.mlp.gate' excludes model.layers.0.mlp.up_proj (as layer "
                             "model.layers.0.mlp.gate_up_proj) in vLLM, which would load it unquantized")
    assert "verify: FAILED, 2 error(s)" in p.stdout
