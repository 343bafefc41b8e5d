"""FP8 E4M3: decoding FP8 sources, what an FP8 attention output is (:class:`Fp8Output`), and
the FP8_DYNAMIC per-channel weight encoding (``--attn fp8``, :data:`FP8_DYNAMIC`).

Decoding (sources): ``w = float32(fp8) * float32(scale)`` per tensor, per output
channel or per ``block`` (DeepSeek-V3 / Qwen3-FP8: 128x128, partial edge
blocks), the exact float32 product.

Encoding (``--attn fp8``, compressed-tensors preset FP8_DYNAMIC, weights
strategy ``channel``): in the weight's own dtype, as torch computes it
(quantization/utils/helpers.py calculate_qparams; forward_helpers._quantize):
``scale = dtype(row_amax / 448)`` (a zero scale becomes the dtype's eps), then
``q = e4m3(clamp(dtype(x / scale), -448, 448))``, both casts round-to-nearest-even.
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np

E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
FP8_LUT = np.arange(256, dtype=np.uint16).astype(np.uint8).view(E4M3).astype(np.float32)


def decode_fp8(codes: np.ndarray) -> np.ndarray:
    """float32 values of FP8 E4M3 bytes (any shape)."""
    return FP8_LUT[np.asarray(codes).view(np.uint8)]


def apply_scale(x: np.ndarray, scale: np.ndarray, layout: str, r0: int, block: tuple[int, int] | None) -> np.ndarray:
    """x (float32 rows r0.. of the weight) times its scale, in place where possible."""
    s = np.asarray(scale, dtype=np.float32)
    if layout == "tensor":
        x *= s.reshape(-1)[0]
    elif layout == "channel":
        x *= s.reshape(-1)[r0:r0 + x.shape[0], None]
    else:
        b0, b1 = block or (128, 128)
        rows, cols = x.shape
        first = r0 // b0
        last = (r0 + rows - 1) // b0 + 1
        sb = np.repeat(s[first:last], b0, axis=0)[r0 - first * b0: r0 - first * b0 + rows]
        x *= np.repeat(sb, b1, axis=1)[:, :cols]
    return x


def quantize_fp8_channel(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """FP8_DYNAMIC weight encoding of a 2-D bf16/fp16/fp32 array: (E4M3 bytes, scale [rows, 1])."""
    dt = w.dtype
    amax = np.max(np.abs(w.astype(np.float32)), axis=1, keepdims=True)
    scale = (amax / np.float32(448.0)).astype(dt)
    eps = np.finfo(dt).eps if dt != np.dtype(ml_dtypes.bfloat16) else ml_dtypes.finfo(ml_dtypes.bfloat16).eps
    scale = np.where(scale.astype(np.float32) == 0, np.asarray(eps, dtype=dt), scale)
    q = (w.astype(np.float32) / scale.astype(np.float32)).astype(dt).astype(np.float32)
    q = np.clip(q, -448.0, 448.0).astype(E4M3)
    return q.view(np.uint8), scale


def _as_f32_dtype(dtype: str) -> str:
    return dtype if dtype in ("BF16", "F16", "F32") else "F32"


@dataclass(frozen=True)
class Fp8Output:
    """An FP8 output encoding for attention Linears, chosen by ``--attn NAME``.

    The planner and the executor know nothing else about it: :meth:`outputs` gives the
    tensors written for one module, :meth:`encode` turns float rows ``r0..`` (a multiple
    of ``row_align``) into one array per output, and output ``i`` takes one of its rows per
    ``rows_per_out_row[i]`` weight rows. ``key`` names its compressed-tensors config group
    (:meth:`group`); ``keeps`` says whether an FP8 source module already in this encoding
    passes through unchanged (its bytes kept) rather than being decoded and re-encoded.
    """

    name: str  # --attn value
    key: str  # Op.module_scheme: the config group it belongs to
    label: str  # the action shown by `qstream inspect`
    row_align: int
    rows_per_out_row: tuple[int, ...]
    description: str  # for `--help`

    def outputs(self, module: str, shape: tuple[int, int], dtype: str) -> list[tuple[str, str, tuple[int, ...]]]:
        raise NotImplementedError

    def encode(self, x: np.ndarray) -> list[np.ndarray]:
        raise NotImplementedError

    def group(self) -> dict:
        raise NotImplementedError

    def keeps(self, layout: str, block: tuple[int, int] | None) -> bool:
        raise NotImplementedError


def fp8_dynamic_args() -> dict:
    """compressed-tensors FP8_DYNAMIC: per-channel static weights, dynamic per-token activations."""
    a = {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None, "strategy": "token", "dynamic": True}
    w = {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None, "strategy": "channel", "dynamic": False}
    return {"weights": w, "input_activations": a, "format": "float-quantized"}


@dataclass(frozen=True)
class _Fp8Channel(Fp8Output):
    def outputs(self, module, shape, dtype):
        return [(module + ".weight", "F8_E4M3", shape), (module + ".weight_scale", _as_f32_dtype(dtype), (shape[0], 1))]

    def encode(self, x):
        return list(quantize_fp8_channel(x))

    def group(self):
        return fp8_dynamic_args()

    def keeps(self, layout, block):
        return True  # an FP8 source keeps its attention as it is (any layout)


FP8_DYNAMIC = _Fp8Channel("fp8", "fp8:channel", "fp8 dynamic", 1, (1, 1),
                          "FP8 E4M3 weights with per-channel scales and dynamic per-token activations (FP8_DYNAMIC) "
                          "from a BF16/FP16/FP32 source")
