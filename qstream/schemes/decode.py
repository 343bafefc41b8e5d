"""Fast decoders of the FP4 formats `qstream verify` reads back (table lookups, bit for bit
the specs in :mod:`qstream.schemes.reference`): compressed-tensors NVFP4 and MXFP4, and
ModelOpt NVFP4 with its own formula."""

from __future__ import annotations

import numpy as np

from ..safetensors_io import DTYPES


def _lut_tables():
    from . import reference

    codes = np.arange(256, dtype=np.uint8)
    pair = np.stack([reference.fp4_decode(codes & 0xF), reference.fp4_decode(codes >> 4)], -1)
    e4m3 = codes.view(DTYPES["F8_E4M3"]).astype(np.float32)
    with np.errstate(over="ignore"):
        e8m0 = reference.round_to_dtype(np.exp2(codes.astype(np.float32) - np.float32(127)), reference.BF16)
    # both values of a byte as one uint64: a 1-D lookup is ~5x faster than a [256, 2] one
    return np.ascontiguousarray(pair, dtype=np.float32).view(np.uint64).reshape(256), e4m3, e8m0


_FP4_PAIRS, _E4M3_VALUES, _E8M0_BF16 = _lut_tables()
_BF16 = DTYPES["BF16"]


def decode_nvfp4(packed: np.ndarray, scale_bits: np.ndarray, global_scale) -> np.ndarray:
    """:func:`qstream.schemes.reference.dequantize_nvfp4` (CT's decode, bf16 values as
    float32), bit for bit, with table lookups instead of unpacking code by code."""
    rows, half = packed.shape
    x = _FP4_PAIRS[packed].view(np.float32).reshape(rows, half * 2 // 16, 16)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        x *= (_E4M3_VALUES[scale_bits.view(np.uint8)] / np.float32(global_scale)).astype(np.float32)[..., None]
    return x.reshape(rows, half * 2).astype(_BF16).astype(np.float32)


def decode_modelopt_nvfp4(weight: np.ndarray, scale_bits: np.ndarray, weight_scale_2) -> np.ndarray:
    """ModelOpt's decode (NVFP4QTensor.dequantize): ``fp4 * float32(float32(s) * weight_scale_2)``
    in float32, then bfloat16 (as float32 values); the low nibble is the even column."""
    rows, half = weight.shape
    x = _FP4_PAIRS[weight].view(np.float32).reshape(rows, half * 2 // 16, 16)
    with np.errstate(invalid="ignore", over="ignore"):
        x *= (_E4M3_VALUES[scale_bits.view(np.uint8)] * np.float32(weight_scale_2)).astype(np.float32)[..., None]
    return x.reshape(rows, half * 2).astype(_BF16).astype(np.float32)


def decode_mxfp4(packed: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """:func:`qstream.schemes.reference.dequantize_mxfp4`, bit for bit, with table lookups."""
    rows, half = packed.shape
    x = _FP4_PAIRS[packed].view(np.float32).reshape(rows, half * 2 // 32, 32)
    with np.errstate(over="ignore", invalid="ignore"):
        x *= _E8M0_BF16[scale.view(np.uint8)][..., None]
    return x.reshape(rows, half * 2).astype(_BF16).astype(np.float32)
