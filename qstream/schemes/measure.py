"""The error of an FP4 block as written, for the model card: the block decoded the way
compressed-tensors decodes it (FP4 value x block scale [/ global scale], rounded to
bfloat16; :mod:`qstream.schemes.decode`, bit for bit) against the source values, summed in
one fused pass (no decoded copy of the block is made)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
try:
    from numba import njit

    from .kernels_common import _bits_f32, _round_bf16
    from .kernels_vec import _err_sums16, _err_sums32
    _VEC = True
except ModuleNotFoundError:  # numba not installed: convert runs the numpy reference (convert._kernels), this too
    _VEC = False

    def njit(*args, **kwargs):
        return lambda f: f

    def _bits_f32(u):
        return np.uint32(u).view(np.float32)

    def _round_bf16(x):
        return np.float32(x).astype(ml_dtypes.bfloat16).astype(np.float32)

_BF16 = np.dtype(ml_dtypes.bfloat16)


@njit(nogil=True, cache=True)
def _fp4_error(src, shift, packed, mult, group, lut):  # pragma: no cover - compiled
    """The scalar form of :func:`_fp4_error_vec`, what runs when numba is not installed (as plain
    Python). ``src``: the source rows as raw bits (bfloat16 as uint16 with ``shift`` 16, float32
    as uint32 with ``shift`` 0)."""
    rows, half = packed.shape
    cols = half * 2
    dec = np.empty(cols, np.float32)
    a = 0.0
    b = 0.0
    for r in range(rows):
        for g in range(cols // group):
            m = mult[r, g]
            for j in range(g * group // 2, (g + 1) * group // 2):
                byte = packed[r, j]
                dec[2 * j] = lut[byte & 15] * m
                dec[2 * j + 1] = lut[byte >> 4] * m
        ra, rb = _row_sums(src[r], shift, dec)
        a += ra
        b += rb
    return a, b


@njit(nogil=True, cache=True)
def _fp4_error_vec(src, packed, mult, group):  # pragma: no cover - compiled
    """The same sums with kernels_vec's group steps (decode, bf16 rounding and both squares
    of a group in registers), accumulated in 16 float64 lanes each, then summed in order."""
    acc = np.zeros(32, np.float64)
    rows = packed.shape[0]
    ng = packed.shape[1] * 2 // group
    for r in range(rows):
        s = src[r]
        p = packed[r]
        if group == 16:
            for g in range(ng):
                _err_sums16(s, g * 16, p, g * 8, mult[r, g], acc)
        else:
            for g in range(ng):
                _err_sums32(s, g * 32, p, g * 16, mult[r, g], acc)
    a = 0.0
    b = 0.0
    for k in range(16):
        a += acc[k]
        b += acc[16 + k]
    return a, b


@njit(nogil=True, cache=True, fastmath={"reassoc"})
def _row_sums(src, shift, dec):  # pragma: no cover - compiled
    """One row's (sum x^2, sum (x - decoded)^2) in float64, the decoded value rounded to
    nearest even bfloat16 first (as .astype(bfloat16) does). ``reassoc`` lets LLVM split the
    two sums into vector lanes: the squares are exact in float64 and non-negative, so the
    order moves the sums by a few ulps at most, far below the card's four digits (a third
    less CPU for the measurement than the in-order sums, which were 60% of a round-to-nearest
    conversion's kernel time)."""
    ra = 0.0
    rb = 0.0
    for c in range(dec.shape[0]):
        x = _bits_f32(np.uint32(src[c]) << np.uint32(shift))
        e = np.float64(x - _round_bf16(dec[c]))
        ra += np.float64(x) * np.float64(x)
        rb += e * e
    return ra, rb


_LUT = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], dtype=np.float32)
_E4M3 = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)


def fp4_error(x: np.ndarray, packed: np.ndarray, scale: np.ndarray, global_scale=None,
              e8m0: np.ndarray | None = None) -> tuple[float, float]:
    """(sum x^2, sum (x - decoded)^2) of one block: NVFP4 with ``global_scale``, else MXFP4
    (``e8m0``: the float32 value of each E8M0 scale byte, as compressed-tensors decodes it)."""
    if global_scale is not None:
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            mult = (_E4M3[scale.view(np.uint8)] / np.float32(global_scale)).astype(np.float32)
        group = 16
    else:
        mult = e8m0[scale.view(np.uint8)]
        group = 32
    if x.dtype == _BF16:
        src, shift = np.ascontiguousarray(x).view(np.uint16), 16
    else:
        src, shift = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32), 0
    packed, mult = np.ascontiguousarray(packed), np.ascontiguousarray(mult)
    if _VEC:
        return _fp4_error_vec(src, packed, mult, group)
    return _fp4_error(src, shift, packed, mult, group, _LUT)
