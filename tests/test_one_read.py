"""NVFP4 reads each source tensor once: the blocks read for the (shared) global scale are
kept and quantized from memory, up to ``hold_bytes``; the output bytes do not depend on it."""

from __future__ import annotations

from pathlib import Path

import pytest

from qstream.convert import Executor
from qstream.plan.plan import Options, make_plan
from qstream.sources.source import open_checkpoint


def convert_counting(src: Path, dst: Path, hold_bytes: int, block_bytes: int) -> dict[str, int]:
    """Convert with --mlp nvfp4; bytes read from each source tensor."""
    plan = make_plan(open_checkpoint(src), Options(mlp="nvfp4", scale_search="none"))
    ex = Executor(plan, dst, threads=2, hold_bytes=hold_bytes, block_bytes=block_bytes)
    spans = {(op.source.path, op.source.begin): op.source for op in plan.ops}
    read: dict[str, int] = {}
    inner = ex.reader.read_bytes

    def read_bytes(path, begin, nbytes, out=None):
        for (p, b), info in spans.items():
            if p == path and b <= begin < b + info.nbytes:
                read[info.name] = read.get(info.name, 0) + nbytes
        return inner(path, begin, nbytes, out)

    ex.reader.read_bytes = read_bytes
    ex.run()
    return read


@pytest.fixture(params=["bf16", "fp8-tensor", "fp8-block"])
def source(request, tiny_ckpt, tmp_path_factory):
    """BF16 (held as floats), FP8 per-tensor and 128x128-block FP8 (held as their codes)."""
    from synth import write_mistral3_fp8, write_qwen3_block_fp8

    if request.param == "bf16":
        return tiny_ckpt
    root = tmp_path_factory.mktemp(request.param) / "src"
    return write_mistral3_fp8(root) if request.param == "fp8-tensor" else write_qwen3_block_fp8(root)


@pytest.mark.parametrize("block_bytes", [16 << 20, 4096])  # one block per tensor, many blocks
def test_nvfp4_source_read_once_same_bytes(source, tmp_path, block_bytes):
    tiny_ckpt = source
    plan = make_plan(open_checkpoint(tiny_ckpt), Options(mlp="nvfp4", scale_search="none"))
    quantized = {op.source.name: op.source.nbytes for op in plan.ops if op.kind == "quantize"}
    assert any(len(m) > 1 for m in plan.scale_groups.values())  # fused partners (gate/up) are there

    once = convert_counting(tiny_ckpt, tmp_path / "once", 512 << 20, block_bytes)
    assert {n: once[n] for n in quantized} == quantized

    twice = convert_counting(tiny_ckpt, tmp_path / "twice", 0, block_bytes)  # nothing held: read again
    assert {n: twice[n] for n in quantized} == {n: 2 * b for n, b in quantized.items()}

    # a limit below the group's size: the blocks past it are read again
    part = convert_counting(tiny_ckpt, tmp_path / "part", 3 * block_bytes, block_bytes)
    assert all(quantized[n] <= part[n] <= 2 * quantized[n] for n in quantized)

    def files(d: Path) -> list[Path]:
        return sorted(p.relative_to(d) for p in d.rglob("*") if p.is_file() and ".qstream" not in p.parts)

    assert files(tmp_path / "once") and files(tmp_path / "once") == files(tmp_path / "twice") == files(tmp_path / "part")
    for f in files(tmp_path / "once"):
        data = (tmp_path / "once" / f).read_bytes()
        assert data == (tmp_path / "twice" / f).read_bytes() == (tmp_path / "part" / f).read_bytes(), f
