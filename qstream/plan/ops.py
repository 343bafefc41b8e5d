"""The operations a plan is made of: one :class:`Op` per source tensor, writing
:class:`OutTensor` outputs into :class:`OutShard` files. One small class per kind (as
huggingface_hub's ``CommitOperation*``): :class:`Copy`, :class:`Cast`, :class:`Slice`,
:class:`Repack`, :class:`Dequantize`, :class:`Fp8Encode`, :class:`Quantize` (and the ModelOpt
source's ``GlobalScaleRepack`` in :mod:`qstream.sources.modelopt`); each produces its own work
items (:meth:`Op.items`), callables that read rows through the executor and ``pwrite`` its
outputs at their planned offsets. The executor knows no kind and no format.

A leaf of the package (the plan, the writer, the layouts and sources that make or rename
operations all build on it): work items reach the executor only through the ``ex`` argument
(:class:`qstream.convert.Executor`: its reader, row blocks, float reads, kernels, measures).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Iterator

import numpy as np

from ..errors import QStreamError
from ..safetensors_io import DTYPES, TensorInfo, dtype_size
from ..schemes import ATTN_SCHEMES, SCHEMES, act_scales

COPY_CHUNK = 64 << 20  # bytes per copy work item

Items = Iterator[Callable[[], None]]


@dataclass
class OutTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    shard: int = -1
    offset: int = -1  # within the shard's data section

    @property
    def nbytes(self) -> int:
        n = dtype_size(self.dtype)
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class View:
    """A 2-D Linear weight [count, in_dim] cut out of a fused 3-D expert tensor.

    The source holds expert ``expert`` as a [out_total, in_dim] slab (or [in_dim,
    out_total] when ``transpose``); the view takes ``count`` output rows starting
    at ``start`` with stride ``step`` (2 for gpt-oss's interleaved gate/up). With
    ``experts`` > 1 the view is ``experts`` such slabs stacked, from expert ``expert`` on
    (OpenAI's stacked MXFP4 layout for gpt-oss): [experts * count, in_dim] rows, a row
    block never crossing an expert.
    """

    expert: int
    transpose: bool
    start: int
    step: int
    count: int
    in_dim: int
    experts: int = 1


@dataclass
class Op:
    # the kind, one per subclass: "copy" | "cast" (small tensor to F32) | "quantize" (FP4) | "fp8"
    # | "dequantize" (FP8 -> BF16) | "repack" (gpt-oss MXFP4 rows -> compressed-tensors MXFP4;
    # ModelOpt weight_scale_2) | "slice" (per-expert bias)
    kind: ClassVar[str] = ""
    role: str
    source: TensorInfo
    outputs: list[OutTensor]
    scheme: str | None = None  # FP4 scheme of a "quantize" op; FP8 encoding (schemes.ATTN_SCHEMES) of an "fp8" op
    scale_group: str | None = None  # NVFP4: tensors sharing one global scale
    note: str = ""
    # FP8 source of a "quantize"/"dequantize" op: w = fp8 * scale, per tensor, channel or block
    src_scale: TensorInfo | None = None
    layout: str | None = None
    block: tuple[int, int] | None = None
    # how the module is described in quantization_config (None: unquantized)
    module_scheme: str | None = None
    # fused 3-D experts: which expert / rows this op takes, and the module it writes
    view: View | None = None
    out_module: str | None = None

    @property
    def module(self) -> str:
        return self.out_module or self.source.name.removesuffix(".weight")

    @property
    def bytes_in(self) -> int:
        """Source bytes this op accounts for (a view: its share of the fused tensor)."""
        if self.view is not None:
            rows = self.view.count * self.view.experts
            if self.layout == "mxfp4":
                return rows * (self.view.in_dim // 2 + self.view.in_dim // 32)
            return rows * self.view.in_dim * dtype_size(self.source.dtype)
        return self.source.nbytes + (self.src_scale.nbytes if self.src_scale is not None else 0)

    @property
    def shape(self) -> tuple[int, ...]:
        """The logical shape this op reads: a view's [count, in_dim], else the source's."""
        if self.view is not None:
            return (self.view.count * self.view.experts, self.view.in_dim)
        return self.source.shape

    @property
    def bytes_out(self) -> int:
        return sum(o.nbytes for o in self.outputs)

    @property
    def quantized(self) -> bool:
        """The one rule for "quantized" (tables, card, summary, commit message): the op writes a
        weight that quantization_config describes (FP4 quantized or repacked, FP8 made or kept)."""
        return self.module_scheme is not None

    @property
    def converted(self) -> bool:
        """Quantized by this run (FP4 from floats or FP8, FP8 from floats, an FP4 repack), as
        opposed to an FP8 weight kept as the source has it."""
        return self.quantized and (self.kind != "copy" or self.layout in ("modelopt", "openai"))

    @property
    def action(self) -> str:
        """A short label for tables: what happens to this tensor."""
        if self.layout == "modelopt":
            return "nvfp4 repack (modelopt)"
        if self.kind == "repack":
            return "mxfp4 repack"
        if self.kind == "slice":
            return "split per expert"
        if self.kind == "quantize":
            src = {"mxfp4": " (from mxfp4)", None: ""}.get(self.layout, " (from fp8)")
            if self.view is not None and self.view.experts > 1:
                return self.scheme + src + " (openai layout)"
            return self.scheme + src + (" per expert" if self.view else "")
        if self.kind == "fp8":
            return ATTN_SCHEMES[self.scheme].label + (" (from fp8)" if self.src_scale is not None else "")
        if self.kind == "dequantize":
            return "fp8 -> bf16"
        if self.module_scheme == "mxfp4":  # gpt-oss MXFP4 blocks kept in OpenAI's layout
            return "mxfp4 kept (openai layout)"
        if self.module_scheme is not None:
            return "fp8 kept"
        if self.kind == "cast":
            return "scale -> f32"
        return "passthrough" if self.source.name == self.outputs[0].name else "renamed"

    def items(self, ex, w) -> Items:
        """Callables that together write every output of this op into the shard writer ``w``."""
        raise NotImplementedError(type(self).__name__)


@dataclass
class Copy(Op):
    """The source bytes as they are (a passthrough, a rename, an FP8 weight kept, ModelOpt's packed
    bytes and block scales)."""

    kind: ClassVar[str] = "copy"

    def items(self, ex, w) -> Items:
        info, out = self.source, self.outputs[0]
        for off in range(0, info.nbytes, COPY_CHUNK):
            n = min(COPY_CHUNK, info.nbytes - off)
            yield lambda off=off, n=n: w.copy_from(ex.reader.fd(info.path), info.begin + off, n, out.offset + off)


@dataclass
class Cast(Op):
    """A small tensor (an FP8 scale) converted to the output's dtype."""

    kind: ClassVar[str] = "cast"

    def items(self, ex, w) -> Items:
        info, out = self.source, self.outputs[0]
        yield lambda: w.pwrite(out.offset, ex.reader.read(info).astype(DTYPES[out.dtype]).reshape(out.shape))


@dataclass
class Slice(Op):
    """One expert's share of a fused bias."""

    kind: ClassVar[str] = "slice"

    def items(self, ex, w) -> Items:
        out, v = self.outputs[0], self.view
        row = ex.reader.read_rows(self.source, v.expert, v.expert + 1)[0]
        yield lambda: w.pwrite(out.offset, np.ascontiguousarray(row[v.start: v.start + v.step * v.count: v.step]))


@dataclass
class Repack(Op):
    """gpt-oss MXFP4 blocks -> compressed-tensors MXFP4: the same bits, one expert's rows."""

    kind: ClassVar[str] = "repack"

    def items(self, ex, w) -> Items:
        packed_t, scale_t = self.outputs
        cols = self.shape[1]
        for r0, r1 in ex._blocks(self):
            def repack(r0=r0, r1=r1):
                packed, scales = ex.read_mxfp4_rows(self, r0, r1)
                w.pwrite(packed_t.offset + r0 * packed.shape[1], packed)
                w.pwrite(scale_t.offset + r0 * scales.shape[1], scales)
            yield repack


@dataclass
class Dequantize(Op):
    """An FP8 source weight decoded to BF16."""

    kind: ClassVar[str] = "dequantize"

    def items(self, ex, w) -> Items:
        out = self.outputs[0]
        row = self.source.shape[1] * DTYPES[out.dtype].itemsize
        for r0, r1 in ex._blocks(self):
            yield lambda r0=r0, r1=r1: w.pwrite(out.offset + r0 * row, ex.read_float(self, r0, r1).astype(DTYPES[out.dtype]))


@dataclass
class Fp8Encode(Op):
    """An FP8 output encoding (``scheme``: its key in schemes.ATTN_SCHEMES): rows in, one array
    per output."""

    kind: ClassVar[str] = "fp8"

    def items(self, ex, w) -> Items:
        enc = ATTN_SCHEMES[self.scheme]

        def encode(r0: int, r1: int) -> None:
            x = ex.read_float(self, r0, r1)
            if not math.isfinite(float(ex.k.absmax(x))):
                raise ex._nonfinite(self)
            arrays = enc.encode(x)
            ex._measure(self, r0, x, enc.decode(arrays))
            for t, arr, per in zip(self.outputs, arrays, enc.rows_per_out_row):
                w.pwrite(t.offset + r0 // per * (t.nbytes // t.shape[0]), arr)

        for r0, r1 in ex._blocks(self):
            yield lambda r0=r0, r1=r1: encode(r0, r1)


@dataclass
class Quantize(Op):
    """An FP4 scheme (``scheme``: its key in schemes.SCHEMES) from float rows: packed codes and
    block scales, and the global scale of a scheme that has one (written as its reciprocal when
    the layout says so: ModelOpt's ``weight_scale_2``)."""

    kind: ClassVar[str] = "quantize"
    reciprocal_global_scale: bool = False
    input_amax: float | None = None  # NVFP4 W4A4: calibrated input absmax -> the layout's input scale (outputs[3])

    def items(self, ex, w) -> Items:
        scheme = SCHEMES[self.scheme]
        _, cols = self.shape
        packed_t, scale_t = self.outputs[0], self.outputs[1]
        groups = cols // scheme.group_size
        gs = ex.global_scale(self) if scheme.has_global_scale else None
        if gs is not None:
            g = np.float32(1) / gs if self.reciprocal_global_scale else gs
            w.pwrite(self.outputs[2].offset, np.asarray([g], dtype=np.float32))
        if len(self.outputs) > 3 and self.input_amax is None:  # never a zero scale that looks written
            raise QStreamError(f"{self.module}: its NVFP4 input scale has no calibrated input absmax; "
                               "activations.set_input_amax must run after the calibration pass.")
        if self.input_amax is not None:  # ModelOpt: input_scale, a multiplier; compressed-tensors: input_global_scale
            a = act_scales.input_scale(self.input_amax) if self.reciprocal_global_scale else \
                act_scales.input_global_scale(self.input_amax)
            w.pwrite(self.outputs[3].offset, np.asarray([a], dtype=np.float32))
        k = ex.k
        search = ex.plan.options.scale_search  # "none": compressed-tensors' rounding
        cal = ex.calibrated.get(self, gs) if ex.calibrated is not None else None  # --calibrate: GPTQ's codes

        def block(r0: int, r1: int) -> None:
            x = ex.take_rows(self, r0, r1) if gs is not None else ex.read_float(self, r0, r1)
            if not math.isfinite(float(k.absmax(x))):
                raise ex._nonfinite(self)
            if cal is not None:  # the calibration pass's GPTQ codes and scales
                packed, scale = np.ascontiguousarray(cal[0][r0:r1]), np.ascontiguousarray(cal[1][r0:r1])
            else:
                packed, scale = scheme.quantize(k, x, gs, search)
            ex._measure_fp4(self, r0, x, packed, scale, gs)
            w.pwrite(packed_t.offset + r0 * (cols // 2), packed)
            w.pwrite(scale_t.offset + r0 * groups, scale)

        for r0, r1 in ex._blocks(self):
            yield lambda r0=r0, r1=r1: block(r0, r1)


@dataclass
class OutShard:
    filename: str
    tensors: list[OutTensor] = field(default_factory=list)
    header: bytes = b""

    @property
    def data_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def file_bytes(self) -> int:
        return len(self.header) + self.data_bytes
