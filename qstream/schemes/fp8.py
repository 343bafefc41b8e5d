"""FP8 E4M3: decoding FP8 sources and the FP8_DYNAMIC per-channel weight encoding.

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
