"""FP8 block output for attention (``--attn fp8-block``): compressed-tensors' ``FP8_BLOCK`` preset.

Weights: FP8 E4M3 at the original shape, one scale per 128x128 block
(``weight_scale`` [ceil(out/128), ceil(in/128)], in the weight's dtype; float32 from an FP8
source). Activations: dynamic, per group of 128 (nothing stored). Format ``float-quantized``.

The encoding is compressed-tensors 0.20's, as llm-compressor's ``model_free_ptq`` runs it
(observers/helpers.py ``_flatten_weight``: the weight is zero-padded to whole blocks, so a
partial edge block's scale comes from its real values; quantization/utils/helpers.py
``calculate_qparams``; compressors/naive_quantized ``compress`` -> forward_helpers
``_process_block``), in the weight's own dtype: ``scale = dtype(block_amax / 448)`` (a zero
scale becomes the dtype's eps), then ``q = e4m3(clamp(dtype(x / scale), -448, 448))``, both
casts round-to-nearest-even. An FP8 source already in 128x128 blocks passes through (its bytes
are this format); any other FP8 source is decoded to its exact float32 values and re-blocked.
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np

from .fp8 import E4M3, Fp8Output

BLOCK = (128, 128)


def quantize_fp8_block(w: np.ndarray, block: tuple[int, int] = BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """FP8_BLOCK encoding of a 2-D bf16/fp16/fp32 array whose first row starts a block row:
    (E4M3 bytes [rows, cols], scale [ceil(rows/b0), ceil(cols/b1)] in w's dtype)."""
    dt = w.dtype
    rows, cols = w.shape
    b0, b1 = block
    nr, nc = -(-rows // b0), -(-cols // b1)
    x = w.astype(np.float32)
    padded = np.zeros((nr * b0, nc * b1), np.float32)
    padded[:rows, :cols] = np.abs(x)
    amax = padded.reshape(nr, b0, nc, b1).max(axis=(1, 3))
    scale = (amax / np.float32(448.0)).astype(dt)
    eps = ml_dtypes.finfo(ml_dtypes.bfloat16).eps if dt == np.dtype(ml_dtypes.bfloat16) else np.finfo(dt).eps
    scale = np.where(scale.astype(np.float32) == 0, np.asarray(eps, dtype=dt), scale)
    full = np.repeat(np.repeat(scale.astype(np.float32), b0, axis=0), b1, axis=1)[:rows, :cols]
    q = (x / full).astype(dt).astype(np.float32)
    q = np.clip(q, -448.0, 448.0).astype(E4M3)
    return q.view(np.uint8), scale


@dataclass(frozen=True)
class _Fp8Block(Fp8Output):
    def outputs(self, module, shape, dtype):
        out, inp = shape
        sdt = dtype if dtype in ("BF16", "F16", "F32") else "F32"
        return [(module + ".weight", "F8_E4M3", shape),
                (module + ".weight_scale", sdt, (-(-out // BLOCK[0]), -(-inp // BLOCK[1])))]

    def encode(self, x):
        return list(quantize_fp8_block(x))

    def group(self):
        # compressed_tensors/quantization/quant_scheme.py FP8_BLOCK (fields in the order qstream writes FP8 groups)
        w = {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None, "strategy": "block",
             "dynamic": False, "block_structure": list(BLOCK)}
        a = {"num_bits": 8, "type": "float", "symmetric": True, "group_size": BLOCK[1], "strategy": "group",
             "dynamic": True}
        return {"weights": w, "input_activations": a, "format": "float-quantized"}

    def keeps(self, layout, block):
        return layout == "block" and tuple(block or ()) == BLOCK


FP8_BLOCK = _Fp8Block("fp8-block", f"fp8:block:{BLOCK[0]}x{BLOCK[1]}", "fp8 block", BLOCK[0], (1, BLOCK[0]),
                      "FP8 E4M3 weights with one scale per 128x128 block and dynamic per-group-128 activations "
                      "(FP8_BLOCK) from a BF16/FP16/FP32 source, or re-blocked from an FP8 one")
