"""Fused numba kernels for MXFP4 / NVFP4 quantization: the entry points (what
:func:`qstream.convert._kernels` hands the executor, the same interface as the reference).
The kernels themselves are per format, :mod:`kernels_nvfp4` and :mod:`kernels_mxfp4`, on the
shared bit tricks of :mod:`kernels_common`.

Same semantics, byte for byte, as :mod:`qstream.schemes.reference` (the spec; read its
docstring for the conventions). One pass per row: group amax -> scale -> FP4 rounding
-> packed codes, written straight into the output row; bf16 and f32 groups go through
whole-group LLVM vector steps (:mod:`kernels_vec`), fp16 groups through scalar code.
Scratch is a few group-sized arrays per thread (no full-size intermediates).

* Inputs are 2-D numpy arrays of ``ml_dtypes.bfloat16``, ``np.float16`` or
  ``np.float32``. The kernels see the raw bits, and the integer type of that view
  tells each specialization its dtype at compile time: uint16 = bf16, int16 = fp16,
  uint32 = fp32 (numba has no bf16 type; its fp16 support is not needed). bf16 ->
  f32 is a shift, fp16 -> f32 is decoded on the bits, and rounding a float32 result
  to bf16 / fp16 (what torch does after each op on such tensors) is done on the
  bits, round half to even, subnormals and overflow included.
* float32 -> float8_e4m3fn (round half to even, subnormals kept, saturating at
  +-448 like torch's cast; NaN -> 0x7F | sign) is done on the bits too
  (:func:`e4m3_encode`; equal to torch's cast for all 2**32 inputs, and to
  ml_dtypes' cast wherever ml_dtypes does not overflow to NaN, i.e. |x| <= 464).
  The quantization path clamps to 448 first, as compressed-tensors does.
* Every kernel is ``nogil``: run the serial kernels from several Python threads on
  different row blocks (this is the intended way to parallelise a stream). The
  ``parallel=True`` variants split rows across numba's thread pool; with numba's
  ``workqueue`` layer (used only when neither ``omp`` nor ``tbb`` is available) they
  must not be called from several Python threads at once. A parallel launch costs
  tens of microseconds (milliseconds on a loaded box): use it for big matrices.

``search`` selects the scale search of the reference (read its "scale search" section):
"none" is compressed-tensors' rounding, byte for byte; "4over6" (NVFP4) and "mse" pick
each block's scale among a few candidates by the squared error of the decoded block,
in one fused pass per row (decode a block once, evaluate its candidates together, emit),
byte for byte like the reference (NVFP4: with per-global-scale threshold tables instead
of a division per candidate, see ``_nv_tables``).

Public API (mirrors the reference):
    absmax(w) -> float
    quantize_nvfp4(w, global_scale, search="none", *, parallel=False) -> (packed, scale_bits)
    quantize_mxfp4(w, search="none", *, parallel=False) -> (packed, scale)
    quantize_nvfp4_into(w, global_scale, packed_out, scale_out, search="none", *, parallel=False)
    quantize_mxfp4_into(w, packed_out, scale_out, search="none", *, parallel=False)
    SEARCH_MODES: {"nvfp4": ("none", "4over6", "mse"), "mxfp4": ("none", "mse")}
    e4m3_encode(x_float32_array) -> uint8 array
    warmup(search=True, parallel=True) -> seconds (compiles, or loads from numba's
        cache, every specialization; the search and parallel=True kernels are separate
        entry points, compiled on first use otherwise)
"""

from __future__ import annotations

import time

import numpy as np

from . import reference as _reference
from .kernels_common import _E4M3_VALUES, _KINDS, F16, F32, BF16, _absmax_bits, _e4m3_array, _fp8_dequant
from .kernels_mxfp4 import quantize_mxfp4, quantize_mxfp4_into
from .kernels_nvfp4 import quantize_nvfp4, quantize_nvfp4_into

__all__ = [
    "absmax",
    "quantize_nvfp4",
    "quantize_mxfp4",
    "quantize_nvfp4_into",
    "quantize_mxfp4_into",
    "e4m3_encode",
    "fp8_dequant",
    "fp8_absmax",
    "warmup",
    "SEARCH_MODES",
]

SEARCH_MODES = _reference.SEARCH_MODES


def absmax(w: np.ndarray) -> float:
    """max |w| as a python float (NaN if w holds a NaN), over any shape."""
    w = np.asarray(w)
    if w.dtype not in _KINDS:
        raise TypeError(f"unsupported dtype {w.dtype}; expected bfloat16, float16, float32")
    if w.size == 0:
        return 0.0
    utype = np.uint32 if w.dtype == F32 else np.uint16
    flat = np.ascontiguousarray(w).reshape(-1).view(utype)
    mask = utype(0x7FFFFFFF if w.dtype == F32 else 0x7FFF)
    m = _absmax_bits(flat, mask)
    return float(np.array([m], dtype=utype).view(w.dtype)[0].astype(np.float32))


_FP8_LAYOUTS = {"tensor": 0, "channel": 1, "block": 2}


def fp8_dequant(codes: np.ndarray, scale: np.ndarray, layout: str, r0: int,
                block: tuple[int, int] | None) -> np.ndarray:
    """float32 rows r0.. of an FP8 E4M3 weight times its scale: the values of
    ``schemes.fp8.apply_scale(schemes.fp8.decode_fp8(codes), ...)`` (the same float32
    products), in one pass over the codes instead of a gather and a multiply."""
    c = np.ascontiguousarray(codes).view(np.uint8)
    if c.ndim != 2:
        c = c.reshape(1, -1) if c.ndim < 2 else c.reshape(-1, c.shape[-1])
    s = np.asarray(scale, dtype=np.float32)
    lay = _FP8_LAYOUTS[layout]
    s2 = s.reshape(-1, 1) if lay == 1 else s.reshape(1, 1) if lay == 0 else s.reshape(s.shape[0], -1)
    b0, b1 = block or (128, 128)
    out = np.empty(c.shape, dtype=np.float32)
    _fp8_dequant(c, _E4M3_VALUES, np.ascontiguousarray(s2), lay, r0, b0, b1, out)
    return out.reshape(np.shape(codes))


def fp8_absmax(codes: np.ndarray, scale) -> float:
    """max |fp8 x scale| of FP8 E4M3 codes under one per-tensor scale, from the codes alone:
    E4M3 magnitudes grow with their low 7 bits (0x7F is NaN), and a float32 multiply by a
    constant keeps that order, so this is exactly ``absmax(fp8_dequant(codes, scale,
    "tensor", ...))`` without decoding (NaN if a code is NaN)."""
    c = np.ascontiguousarray(codes).reshape(-1).view(np.uint8)
    if c.size == 0:
        return 0.0
    m = int(_absmax_bits(c, np.uint8(0x7F)))
    return float(abs(_E4M3_VALUES[m] * np.float32(np.asarray(scale, dtype=np.float32).reshape(-1)[0])))


def e4m3_encode(x) -> np.ndarray:
    """float32 -> float8_e4m3fn bits with the kernels' encoder (torch's cast)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty(x.shape, dtype=np.uint8)
    _e4m3_array(x.reshape(-1), out.reshape(-1))
    return out


def warmup(search: bool = True, parallel: bool = True) -> float:
    """Compile (or load from the cache) every specialization; returns seconds.

    ``search=False`` leaves out the scale-search kernels, ``parallel=False`` the
    ``parallel=True`` variants (each is compiled on first use otherwise)."""
    t0 = time.perf_counter()
    for dt in (BF16, F16, F32):  # uint16 / int16 / uint32 bit views
        w = np.zeros((2, 32), dtype=dt)
        for par in (False, True) if parallel else (False,):
            for mode in ("none", "mse") if search else ("none",):  # one kernel per search
                quantize_nvfp4(w, np.float32(1.0), mode, parallel=par)
                quantize_mxfp4(w, mode, parallel=par)
        absmax(w)
    e4m3_encode(np.zeros(1, dtype=np.float32))
    for lay in _FP8_LAYOUTS:
        fp8_absmax(np.zeros(2, dtype=np.uint8), np.ones(1, np.float32))
        fp8_dequant(np.zeros((2, 2), dtype=np.uint8), np.ones((1, 1) if lay != "channel" else (2, 1), np.float32),
                    lay, 0, (128, 128))
    return time.perf_counter() - t0
