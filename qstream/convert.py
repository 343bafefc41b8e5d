"""Execute a plan: stream every tensor from the source into its planned place.

Memory stays flat: a tensor is read in row blocks of at most ``block_bytes``,
transformed, and written at its planned offset; nothing larger than a block
(plus a tensor's small scale arrays) is ever held.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import QStreamError
from .plan import Op, Plan
from .safetensors_io import DTYPES, ShardReader, TensorInfo
from .schemes import SCHEMES
from .writer import STAGING_DIR, ShardWriter, copy_side_file, output_config, write_atomic, write_json

BLOCK_BYTES = 64 << 20


def _kernels():
    """The fused numba kernels; QSTREAM_KERNELS=reference selects the numpy spec instead."""
    try:
        if os.environ.get("QSTREAM_KERNELS") == "reference":
            raise ImportError
        from .schemes import kernels  # fused numba kernels
        return kernels
    except ImportError:
        from types import SimpleNamespace

        from .schemes import reference
        return SimpleNamespace(absmax=reference.tensor_absmax, quantize_nvfp4=reference.quantize_nvfp4,
                               quantize_mxfp4=reference.quantize_mxfp4)


@dataclass
class Progress:
    """Callbacks the CLI hooks into (rich bar on a terminal, plain lines otherwise)."""

    on_start: Callable[[Plan], None] = lambda plan: None
    on_tensor: Callable[[Op, int], None] = lambda op, nbytes: None
    on_shard: Callable[[Path], None] = lambda path: None


class Hooks:
    """Where the source and output meet the outside world (the Hub, a low-disk policy).

    ``fetch`` is called before the first read of a source file, ``release`` once
    every tensor that needs it (fused partners included) has been written,
    ``shard_done`` when an output shard is complete and renamed, and ``finished``
    after the small files (index, config, card, side files) are written.
    """

    def fetch(self, path: Path) -> None: ...

    def release(self, path: Path) -> None: ...

    def shard_done(self, path: Path) -> None: ...

    def finished(self, dst: Path) -> None: ...


@dataclass
class Result:
    seconds: float
    bytes_in: int
    bytes_out: int
    quantized: int
    passed: int
    shards: list[Path] = field(default_factory=list)


def _rows_per_block(info: TensorInfo, block_bytes: int) -> int:
    row_bytes = math.prod(info.shape[1:]) * DTYPES[info.dtype].itemsize if len(info.shape) > 1 else 1
    return max(1, block_bytes // max(1, row_bytes))


class Executor:
    def __init__(self, plan: Plan, dst: Path, block_bytes: int = BLOCK_BYTES, hooks: Hooks | None = None) -> None:
        self.plan = plan
        self.dst = dst
        self.block_bytes = block_bytes
        self.hooks = hooks or Hooks()
        self.reader = ShardReader(on_open=self.hooks.fetch)
        self.k = _kernels()
        self._global_scales: dict[str, np.float32] = {}
        self._by_name = {op.source.name: op for op in plan.ops}

    # ---------------------------------------------------------------- statistics
    def _blocks(self, info: TensorInfo):
        rows = info.shape[0]
        step = _rows_per_block(info, self.block_bytes)
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            yield r0, r1, self.reader.read_rows(info, r0, r1)

    def _check_finite(self, info: TensorInfo, w: np.ndarray, amax: float) -> None:
        if not math.isfinite(amax):
            bad = int((~np.isfinite(w.astype(np.float32))).sum())
            raise QStreamError(
                f"tensor {info.name!r} ({info.path.name}) contains {bad} NaN/Inf values; "
                "it cannot be quantized: fix the source weights or exclude it with --ignore."
            )

    def tensor_absmax(self, info: TensorInfo) -> float:
        amax = 0.0
        for _, _, w in self._blocks(info):
            a = float(self.k.absmax(w))
            self._check_finite(info, w, a)
            amax = max(amax, a)
        return amax

    def global_scale(self, op: Op) -> np.float32:
        key = op.scale_group
        assert key is not None
        gs = self._global_scales.get(key)
        if gs is None:
            from .schemes import reference
            names = self.plan.scale_groups[key]
            amax = max(self.tensor_absmax(self._by_name[n].source) for n in names)
            gs = reference.nvfp4_global_scale(amax, DTYPES[op.source.dtype].type)
            self._global_scales[key] = gs
        return gs

    # ---------------------------------------------------------------- ops
    def run_op(self, op: Op, w: ShardWriter) -> None:
        if op.kind == "copy":
            out = op.outputs[0]
            fd = self.reader.fd(op.source.path)
            w.copy_from(fd, op.source.begin, op.source.nbytes, out.offset)
            return
        scheme = SCHEMES[op.scheme]
        info = op.source
        _, cols = info.shape
        packed_t, scale_t = op.outputs[0], op.outputs[1]
        scale_row_bytes = (cols // scheme.group_size) * (1 if scheme.scale_dtype in ("U8", "F8_E4M3") else 4)
        if scheme.has_global_scale:
            gs = self.global_scale(op)
        for r0, r1, block in self._blocks(info):
            a = float(self.k.absmax(block))
            self._check_finite(info, block, a)
            if scheme.name == "nvfp4":
                packed, scale = self.k.quantize_nvfp4(block, gs)
            else:
                packed, scale = self.k.quantize_mxfp4(block)
            w.pwrite(packed_t.offset + r0 * (cols // 2), np.ascontiguousarray(packed))
            w.pwrite(scale_t.offset + r0 * scale_row_bytes, np.ascontiguousarray(scale))
        if scheme.has_global_scale:
            w.pwrite(op.outputs[2].offset, np.asarray([gs], dtype=np.float32))

    # ---------------------------------------------------------------- whole run
    def run(self, progress: Progress | None = None) -> Result:
        progress = progress or Progress()
        plan = self.plan
        t0 = time.perf_counter()
        progress.on_start(plan)
        ops_by_shard: list[list[Op]] = [[] for _ in plan.shards]
        for op in plan.ops:
            ops_by_shard[op.outputs[0].shard].append(op)
        releases = self._release_points()
        written = []
        try:
            for shard, ops in zip(plan.shards, ops_by_shard):
                sw = ShardWriter(self.dst, shard)
                try:
                    for op in ops:
                        self.run_op(op, sw)
                        progress.on_tensor(op, op.source.nbytes)
                        for src_path in releases.get(id(op), ()):
                            self.reader.drop(src_path)
                            self.hooks.release(src_path)
                    path = sw.finish()
                finally:
                    sw.abort()
                written.append(path)
                progress.on_shard(path)
                self.hooks.shard_done(path)
            self.write_small_files()
            self.hooks.finished(self.dst)
        finally:
            self.reader.close()
        return Result(
            seconds=time.perf_counter() - t0,
            bytes_in=plan.bytes_in,
            bytes_out=plan.bytes_out,
            quantized=sum(op.kind == "quantize" for op in plan.ops),
            passed=sum(op.kind != "quantize" for op in plan.ops),
            shards=written,
        )

    def _release_points(self) -> dict[int, list[Path]]:
        """For each op, the source files whose last reader it is (fused partners count:
        a scale group's global scale is computed at its first op, reading every member)."""
        last: dict[Path, Op] = {}
        seen_groups: set[str] = set()
        for op in self.plan.ops:
            last[op.source.path] = op
            if op.scale_group and op.scale_group not in seen_groups:
                seen_groups.add(op.scale_group)
                for name in self.plan.scale_groups[op.scale_group]:
                    p = self._by_name[name].source.path
                    last[p] = op  # read now; its own later ops move this on
        out: dict[int, list[Path]] = {}
        for path, op in last.items():
            out.setdefault(id(op), []).append(path)
        return out

    def write_small_files(self) -> None:
        from .card import model_card

        plan, dst = self.plan, self.dst
        for rel in plan.source.side_files:
            copy_side_file(plan.source.root, rel, dst)
        write_json(dst / "model.safetensors.index.json", plan.index())
        write_json(dst / "config.json", output_config(plan.source.config, plan.quantization_config))
        write_atomic(dst / "README.md", model_card(plan))
        try:
            (dst / STAGING_DIR).rmdir()
        except OSError:
            pass


def convert(plan: Plan, dst: Path, progress: Progress | None = None) -> Result:
    return Executor(plan, dst).run(progress)
