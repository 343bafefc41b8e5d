"""`qstream verify --source`: match every quantized module to its source weight (the plan
qstream would make for that source: FP8 decoded with its scales, fused 3-D experts cut into
per-expert views, a ModelOpt source decoded as ModelOpt does), decode both row block by row
block and measure the error. Methods of :class:`qstream.verify.verify.Verifier` (a mixin)."""

from __future__ import annotations

import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..errors import QStreamError
from ..safetensors_io import ShardReader, TensorInfo
from ..schemes.decode import decode_modelopt_nvfp4, decode_mxfp4, decode_nvfp4
from .report import TensorMetrics, _sort_key
from .rules import Module


class SourceMeasure:
    """The source comparison of :class:`qstream.verify.verify.Verifier`."""

    def measure(self, src_root: str, pool: ThreadPoolExecutor) -> None:
        from ..convert import Executor
        from ..plan.ops import Copy, Quantize
        from ..plan.plan import Options, Plan, make_plan
        from ..sources.fp8 import find_fp8_weights
        from ..safetensors_io import FLOAT_SOURCE_DTYPES
        from ..sources.source import open_checkpoint

        self.report.source = str(src_root)
        src = open_checkpoint(src_root)
        quantized = [m for m in self.modules.values() if m.group is not None and m.group.kind is not None]
        counts: dict[str, int] = {}
        for m in quantized:
            if m.group.kind in ("nvfp4", "mxfp4"):
                counts[m.group.kind] = counts.get(m.group.kind, 0) + 1
        mlp = max(counts, key=lambda k: counts[k]) if counts else "none"
        try:
            plan = make_plan(src, Options(mlp=mlp, allow_unloadable=True))  # measures what exists
        except QStreamError as e:
            self.warn(f"{src_root}: cannot plan a conversion of the source ({e}); matching by name only")
            plan = Plan(src, Options(mlp=mlp), "", [], [], {}, None, [])
        try:
            fp8map = find_fp8_weights(src.tensors, src.config)
        except QStreamError as e:
            self.report.errors.append(f"{src_root}: {e}")
            fp8map = {}
        # a ModelOpt NVFP4 source: each module's plan ops copy X.weight and X.weight_scale and read
        # X.weight_scale_2; the module is measured against the packed X.weight, decoded (below)
        modelopt_src = {op.module: op for op in plan.ops if op.layout == "modelopt" and op.source.name.endswith(".weight")}
        by_module = {op.module: op for op in plan.ops if op.kind in ("quantize", "repack") and op.layout != "modelopt"}
        roles = {op.module: op.role for op in plan.ops}

        def source_op(module: str):
            op = modelopt_src.get(module) or by_module.get(module)
            if op is not None:
                return op
            info = src.tensors.get(module + ".weight")
            if info is None or len(info.shape) != 2:
                return None
            role = roles.get(module) or self.classifier.role(info.name)
            f = fp8map.get(info.name)
            if f is not None:
                return Quantize(role, info, [], src_scale=f.scale, layout=f.layout, block=f.block)
            if info.dtype in FLOAT_SOURCE_DTYPES:
                return Copy(role, info, [])
            return None

        jobs = []
        for m in quantized:
            if not m.ok:
                continue  # its structural error is already reported
            op = source_op(m.name)
            if op is None:
                self.error(m.file, f"{m.name}: no source weight for it in {src_root} "
                                   f"(looked for {m.name}.weight, FP8 with scales, and fused 3-D experts)")
                continue
            shape = self._dst_shape(m)
            if tuple(_source_shape(op)) != shape:
                self.error(m.file, f"{m.name} has shape {list(shape)} but its source {op.source.name} reads as "
                                   f"{list(_source_shape(op))}")
                continue
            jobs.append((m, op))

        with tempfile.TemporaryDirectory(prefix="qstream-verify-") as tmp:
            # one Executor (its reader and FP8 scale cache) per pool thread, each used by that thread only
            local, executors, lock = threading.local(), [], threading.Lock()

            def measure_one(job):
                ex = getattr(local, "ex", None)
                if ex is None:
                    ex = local.ex = Executor(plan, Path(tmp), threads=1)
                    with lock:
                        executors.append(ex)
                try:
                    return self._measure_one(ex, *job)
                finally:
                    ex.forget(job[1])

            try:
                results = list(pool.map(measure_one, jobs))
            finally:
                for ex in executors:
                    ex.reader.close()
        self.report.metrics = sorted(results, key=_sort_key)

    def _dst_shape(self, m: Module) -> tuple[int, int]:
        packed = "weight" if m.group is not None and m.group.layout == "modelopt" else "weight_packed"
        if packed in m.parts:
            o, c = m.parts[packed].shape
            return (o, 2 * c)
        return tuple(m.parts["weight"].shape)  # type: ignore[return-value]

    def _measure_one(self, ex, m: Module, op) -> TensorMetrics:
        from ..schemes import fp8

        g = m.group
        rows, cols = self._dst_shape(m)
        desc = op.source.name
        if op.view is not None:
            v = op.view
            desc += f"[expert {v.expert}, rows {v.start}::{v.step} x{v.count}{', transposed' if v.transpose else ''}]"
        elif op.layout == "modelopt":
            desc += f" x {op.module}.weight_scale (modelopt nvfp4)"
        elif op.src_scale is not None:
            desc += f" x {op.src_scale.name} ({op.layout})"
        met = TensorMetrics(m.name, op.role, g.kind, (rows, cols), desc)
        gs = scale = None
        modelopt = g.layout == "modelopt"
        if g.kind == "nvfp4":
            gs = np.float32(self.reader.read(m.parts["weight_scale_2" if modelopt else "weight_global_scale"])
                            .reshape(-1)[0])
        elif g.kind == "fp8":
            scale = self.reader.read(m.parts["weight_scale"]).astype(np.float32)
        if op.view is not None and op.view.transpose:
            step = rows  # the executor reads a transposed expert slab whole anyway
        else:
            step = max(1, self.decode_block // (4 * max(1, cols)))
            if g.kind == "fp8" and g.weights.get("strategy") == "block":
                b0 = (g.weights.get("block_structure") or (128, 128))[0]
                step = max(b0, step // b0 * b0)
        read_source = (_modelopt_source_rows(ex.reader, ex.plan.source.tensors, op.module) if op.layout == "modelopt"
                       else lambda r0, r1: ex.read_float(op, r0, r1))
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            w = np.asarray(read_source(r0, r1), dtype=np.float32)
            if modelopt:
                w_hat = decode_modelopt_nvfp4(self.reader.read_rows(m.parts["weight"], r0, r1),
                                              self.reader.read_rows(m.parts["weight_scale"], r0, r1), gs)
            elif g.kind == "nvfp4":
                w_hat = decode_nvfp4(self.reader.read_rows(m.parts["weight_packed"], r0, r1),
                                     self.reader.read_rows(m.parts["weight_scale"], r0, r1), gs)
            elif g.kind == "mxfp4":
                w_hat = decode_mxfp4(self.reader.read_rows(m.parts["weight_packed"], r0, r1),
                                     self.reader.read_rows(m.parts["weight_scale"], r0, r1))
            else:
                x = fp8.decode_fp8(self.reader.read_rows(m.parts["weight"], r0, r1))
                strategy = g.weights.get("strategy")
                if strategy == "group":
                    gsz = g.weights.get("group_size") or 128
                    x *= np.repeat(scale[r0:r1], gsz, axis=1)[:, :cols]
                    w_hat = x
                else:
                    block = tuple(g.weights.get("block_structure") or (128, 128)) if strategy == "block" else None
                    w_hat = fp8.apply_scale(x, scale, strategy, r0, block)
            met.add(w, w_hat)
        return met


def _source_shape(op) -> tuple[int, ...]:
    """The logical [out, in] shape of a module's source weight (a packed ModelOpt weight holds in/2 bytes)."""
    if op.layout == "modelopt":
        o, c = op.source.shape
        return (o, 2 * c)
    return tuple(op.shape)


def _modelopt_source_rows(reader: ShardReader, tensors: dict[str, TensorInfo], module: str):
    """Rows of a ModelOpt NVFP4 source module, decoded as ModelOpt decodes them."""
    weight, scale = tensors[module + ".weight"], tensors[module + ".weight_scale"]
    scale_2 = np.float32(reader.read(tensors[module + ".weight_scale_2"]).reshape(-1)[0])
    return lambda r0, r1: decode_modelopt_nvfp4(reader.read_rows(weight, r0, r1), reader.read_rows(scale, r0, r1),
                                                scale_2)
