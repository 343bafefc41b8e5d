"""The operations a plan is made of: one :class:`Op` per source tensor, writing
:class:`OutTensor` outputs into :class:`OutShard` files. A leaf module: the plan, the
writer and the layouts that rename or add operations (:mod:`qstream.layouts.modelopt`) all
build on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..safetensors_io import TensorInfo, dtype_size
from ..schemes import ATTN_SCHEMES


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
    at ``start`` with stride ``step`` (2 for gpt-oss's interleaved gate/up).
    """

    expert: int
    transpose: bool
    start: int
    step: int
    count: int
    in_dim: int


@dataclass
class Op:
    # "copy" | "cast" (small tensor to F32) | "quantize" (FP4) | "fp8" | "dequantize" (FP8 -> BF16)
    # | "repack" (gpt-oss MXFP4 rows -> compressed-tensors MXFP4) | "slice" (per-expert bias)
    kind: str
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
            if self.layout == "mxfp4":
                return self.view.count * (self.view.in_dim // 2 + self.view.in_dim // 32)
            return self.view.count * self.view.in_dim * dtype_size(self.source.dtype)
        return self.source.nbytes + (self.src_scale.nbytes if self.src_scale is not None else 0)

    @property
    def shape(self) -> tuple[int, ...]:
        """The logical shape this op reads: a view's [count, in_dim], else the source's."""
        if self.view is not None:
            return (self.view.count, self.view.in_dim)
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
        return self.quantized and (self.kind != "copy" or self.layout == "modelopt")

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
            return self.scheme + src + (" per expert" if self.view else "")
        if self.kind == "fp8":
            return ATTN_SCHEMES[self.scheme].label + (" (from fp8)" if self.src_scale is not None else "")
        if self.kind == "dequantize":
            return "fp8 -> bf16"
        if self.module_scheme is not None:
            return "fp8 kept"
        if self.kind == "cast":
            return "scale -> f32"
        return "passthrough" if self.source.name == self.outputs[0].name else "renamed"


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
