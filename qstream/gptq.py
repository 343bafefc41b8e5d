"""GPTQ for the FP4 formats, on qstream's own FP4 grid and scales (torch; the calibrate extra).

The algorithm is llm-compressor's (``llmcompressor/modifiers/gptq/gptq_quantize.py``, after
Frantar et al., "GPTQ", 2022), without act-order:

* H = 2/n * sum over the n calibration tokens of x x^T (accumulated by :class:`Hessian`);
* dead inputs (H_ii == 0) get H_ii = 1 and their weight column zeroed;
* dampening: H += 0.01 * mean(diag H) * I; then the upper Cholesky factor of H^-1;
* columns in blocks of 128, each quantized in turn and its error
  ``(w - q) / Hinv_ii`` spread over the columns not yet quantized (inside the block at once,
  after the block by one matrix product);
* a group's scale is chosen when its first column is reached, from the CURRENT (error-
  updated) weights of its columns (the GPTQ paper's non-static groups; llm-compressor 0.14
  instead takes its observer's scales of the ORIGINAL weights before the loop, see its
  ``quantize_weight(weights, hessians, scale, ...)``).

What differs from llm-compressor is the scale choice and the grid code: a group's scale is
chosen on the group's current float32 values with the plan's ``--scale-search``: ``none`` is
compressed-tensors' min-max rounding (the FP4 kernels' ``quantize_nvfp4`` / ``quantize_mxfp4``,
byte for byte the reference's); ``mse`` tries each candidate of the data-free search
(:func:`qstream.schemes.reference._nvfp4_search`, ``_mx_candidate``) through GPTQ's own pass
over the group's columns (:func:`_group_loss`: each column quantized, its error spread over the
group's later columns) and keeps the one with the least GPTQ loss sum ((w - q) / Hinv_ii)^2,
the candidate the loss GPTQ minimises prefers rather than the one with the least plain squared
error of the values before the pass (SmolLM2 KL 0.0603 -> 0.0515 NVFP4, 0.1143 -> 0.1074
MXFP4: benchmarks/RESULTS-gptq.md). Every column is quantized exactly as compressed-tensors'
quantizer does with that scale (NVFP4: ``q = float32(x / float32(s / gs))``; MXFP4:
``q = x * 2**(127 - e)``; FP4 round-half-even, sign iff q < 0), its error taken against the
value compressed-tensors' decoder gives for the code (bf16). The codes and scale bytes
returned are therefore exactly what the output stores and what its loaders decode.

Where it runs: the Hessian, its Cholesky factors and the update after each block are torch
on the Hessian's device; the column loop inside a block is a numba kernel on the CPU
(:func:`_columns`: rows are independent there, and one kernel call per group replaces the
dozen small torch ops per column that made this loop 80 % of a calibrated run; same
float32 operations in the same order, so the same bytes). All arithmetic is float32 in a
fixed order, so the result does not depend on qstream's ``--threads`` (torch's own thread
count is fixed by the caller).
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit

from .schemes import kernels, reference
from .schemes.kernels_common import BF16, _fp4, _round_bf16

BLOCK = 128
DAMP = 0.01


class Hessian:
    """sum x x^T (float32) and the token count of one Linear's inputs, plus max |x|."""

    def __init__(self, cols: int, device: torch.device) -> None:
        self.h = torch.zeros((cols, cols), dtype=torch.float32, device=device)
        self.n = 0
        self.absmax = 0.0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.h.addmm_(x.T, x)
        self.n += x.shape[0]
        self.absmax = max(self.absmax, float(x.abs().max())) if x.numel() else self.absmax

    def matrix(self) -> torch.Tensor:
        return self.h * (2.0 / max(1, self.n))

    def take(self) -> torch.Tensor:
        """:meth:`matrix` computed in place, handing the accumulator over (no copy: the
        Hessian of a 28672-column down_proj is 3.3 GB); the Hessian is spent after it."""
        h, self.h = self.h, None
        return h.mul_(2.0 / max(1, self.n))


class _Grid:
    """One scheme's per-group scale choice (numpy, on the FP4 kernels: byte for byte the
    reference's choice) and the per-row factors the column loop quantizes with."""

    def __init__(self, scheme: str, gs: np.float32 | None, search: str) -> None:
        self.scheme, self.gs, self.search = scheme, gs, search
        self.group = reference.NVFP4_GROUP if scheme == "nvfp4" else reference.MXFP4_GROUP

    def scale(self, wg: np.ndarray, hinv: np.ndarray | None = None,
              values: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(scale bytes [rows], float32 factor [rows], float32 decode factor [rows]) of a group
        of current float32 columns: NVFP4 divides by float32(s / gs) and decodes with it;
        MXFP4 multiplies by 2 ** (127 - e) (exact) and decodes with bf16(2 ** (e - 127)).

        With ``mse`` and ``hinv`` (the group's block of the upper Cholesky factor of H^-1,
        ``values`` the FP4 grid): :meth:`_gptq_search`. Otherwise the FP4 kernels' choice."""
        g = np.ascontiguousarray(wg, dtype=np.float32)
        if self.search == "mse" and hinv is not None:
            return self._gptq_search(g, np.ascontiguousarray(hinv, dtype=np.float32), values)
        if self.scheme == "nvfp4":
            _, code = kernels.quantize_nvfp4(g, self.gs, search=self.search)
        else:
            _, code = kernels.quantize_mxfp4(g, search=self.search)
        code = code[:, 0].copy()
        return (code, *self._factors(code))

    def _factors(self, code: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(quantize factor, decode factor) per row of scale bytes ``code`` (uint8)."""
        if self.scheme == "nvfp4":
            sc = (code.view(reference.E4M3).astype(np.float32) / np.float32(self.gs)).astype(np.float32)
            return sc, sc
        e = code.astype(np.int32) - 127
        one = np.ones(len(code), dtype=np.float32)
        dec = reference.round_to_dtype(np.ldexp(one, e).astype(np.float32), BF16)  # bf16(2 ** (e - 127))
        return np.ldexp(one, -e).astype(np.float32), dec

    def _gptq_search(self, g: np.ndarray, hinv: np.ndarray, values: np.ndarray):
        """``mse`` inside GPTQ: the data-free search's candidates (reference._nvfp4_search:
        compressed-tensors' code c6, then c6 + 1 .. c6 + 6 and the 4-over-6 code c4 within
        0x01 .. 0x7E; MXFP4: the RTN exponent b0, then b0 - 1 and b0 + 1 within 0 .. 254), each
        run through the group's own GPTQ pass (:func:`_group_loss`); a candidate replaces the
        best so far only with a strictly lower GPTQ loss, so RTN's scale wins a tie."""
        nv = self.scheme == "nvfp4"
        if nv:
            _, best = kernels.quantize_nvfp4(g, self.gs, search="none")
            amax = np.abs(g).max(axis=1)
            f32 = np.dtype(np.float32)
            c6 = reference._nvfp4_code(amax, f32, self.gs, 6).astype(np.int64)
            c4 = reference._nvfp4_nonzero(reference._nvfp4_code(amax, f32, self.gs, 4)).astype(np.int64)
            candidates, lo, hi = [c6 + k for k in range(1, 7)] + [c4], 0x01, 0x7E
        else:
            _, best = kernels.quantize_mxfp4(g, search="none")
            b0 = best[:, 0].astype(np.int64)
            candidates, lo, hi = [b0 - 1, b0 + 1], 0, 254
        best = best[:, 0].copy()
        low = _group_loss(g, hinv, *self._factors(best), values, nv)
        for c in candidates:
            valid = (c >= lo) & (c <= hi)
            c = np.clip(c, lo, hi).astype(np.uint8)
            loss = _group_loss(g, hinv, *self._factors(c), values, nv)
            better = valid & (loss < low)
            best, low = np.where(better, c, best).astype(np.uint8), np.where(better, loss, low)
        return (best, *self._factors(best))


@njit(nogil=True, cache=True)
def _group_loss(G, Hinv, fac, dec, values, divide):
    """Per row, the GPTQ loss sum ((w - q) / Hinv_ii)^2 of one FP4 group of columns ``G``
    [rows, n] quantized in turn with the row's factor ``fac`` (codes of w / fac with
    ``divide``, NVFP4, else of w * fac; decoded as bf16(value * dec)), each column's error
    spread over the group's later columns: the trial of one scale candidate (float32, the
    quantization of :func:`_columns`).

    Column by column over all rows at once (the group transposed, so that the error
    feedback ``w_j -= e * Hinv[i, j]`` runs over contiguous rows, in vector registers): each
    row's float operations are the row-by-row loop's, in the same order."""
    rows, n = G.shape
    out = np.zeros(rows, dtype=np.float32)
    W = np.empty((n, rows), dtype=np.float32)
    for r in range(rows):
        for j in range(n):
            W[j, r] = G[r, j]
    e = np.empty(rows, dtype=np.float32)
    for i in range(n):
        hii = Hinv[i, i]
        for r in range(rows):
            w = W[i, r]
            q = _round_bf16(values[_fp4(w / fac[r] if divide else w * fac[r])] * dec[r])
            d = (w - q) / hii
            e[r] = d
            out[r] += d * d
        for j in range(i + 1, n):
            h = Hinv[i, j]
            for r in range(rows):
                W[j, r] -= e[r] * h
    return out


@njit(nogil=True, cache=True)
def _columns(W1, i0, n, Hinv1, fac, divide, dec, values, codes, Q, Err1):
    """GPTQ of columns i0 .. i0+n of a block, in place, row by row (rows are independent:
    a row's errors update only that row). Each column is quantized (NVFP4: codes of
    float32(w / fac); MXFP4: of w * fac), decoded as compressed-tensors decodes it
    (bf16(value * dec)), and its error ``(w - q) / Hinv1[i, i]`` is spread over the block's
    later columns: ``W1[r, j] -= err * Hinv1[i, j]``, one float32 product and one
    subtraction, as torch's outer-product update computes it."""
    rows, bw = W1.shape
    for r in range(rows):
        f, d = fac[r], dec[r]
        for i in range(i0, i0 + n):
            w = W1[r, i]
            c = _fp4(w / f if divide else w * f)
            q = _round_bf16(values[c] * d)
            codes[r, i] = c
            Q[r, i] = q
            e = (w - q) / Hinv1[i, i]
            Err1[r, i] = e
            for j in range(i, bw):
                W1[r, j] -= e * Hinv1[i, j]


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, scheme: str, gs: np.float32 | None,
                  search: str = "mse", block: int = BLOCK, damp: float = DAMP, overwrite_hessian: bool = False):
    """GPTQ of a [rows, cols] weight against the Hessian [cols, cols] of its inputs.

    Returns ``(packed uint8 [rows, cols/2], scale uint8 [rows, cols/group], decoded float32
    [rows, cols])``: the FP4 codes packed as compressed-tensors packs them, the scale bytes
    (E4M3 for NVFP4, biased E8M0 for MXFP4) and the values the decoder gives. On the CPU its
    torch part (Cholesky factors, the update after each block) runs on one torch thread, so
    the result is the same whatever the machine's thread settings; the column loop is the
    serial numba kernel :func:`_columns`.

    ``overwrite_hessian``: the caller hands ``hessian`` over (:meth:`Hessian.take`) and it is
    used as the damped matrix in place, freed as soon as its factor exists: at most two
    [cols, cols] matrices are held at once (the calibration pass's peak). Otherwise GPTQ
    works on a copy and ``hessian`` is left as it was."""
    held = [hessian if overwrite_hessian else hessian.clone()]  # the only reference from here on,
    del hessian  # so that _inverse_factor can let it go
    if held[0].device.type != "cpu":
        return _gptq(weight, held, scheme, gs, search, block, damp)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _gptq(weight, held, scheme, gs, search, block, damp)
    finally:
        torch.set_num_threads(n)


def _inverse_factor(held: list, damp: float) -> torch.Tensor:
    """The upper Cholesky factor of (H + damping)^-1, H (``held``'s one item, its only
    reference) damped in place and released once factored. The damping is added to the
    diagonal alone: the same floats as H + d * I."""
    H = held.pop()
    H.diagonal().add_(damp * torch.mean(torch.diag(H)))
    L, info = torch.linalg.cholesky_ex(H)
    if int(info) != 0:  # not positive definite in float32: dampen more, as llm-compressor suggests
        del L
        H.diagonal().add_(0.1 * torch.mean(torch.diag(H)))
        L = torch.linalg.cholesky(H)
    del H
    inv = torch.cholesky_inverse(L)
    del L
    return torch.linalg.cholesky(inv, upper=True)


def _gptq(weight, held, scheme, gs, search, block, damp):
    device = held[0].device
    W = weight.to(device=device, dtype=torch.float32).clone()
    rows, cols = W.shape
    grid = _Grid(scheme, gs, search)
    if cols % grid.group or block % grid.group:
        raise ValueError(f"{cols} columns / block {block} are not whole {scheme} groups of {grid.group}")
    held[0] = H = held[0].to(torch.float32)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    del H
    Hinv = _inverse_factor(held, damp)
    Hinv_np = Hinv.cpu().numpy()
    codes = np.empty((rows, cols), dtype=np.uint8)
    Q = np.empty((rows, cols), dtype=np.float32)
    scales = np.empty((rows, cols // grid.group), dtype=np.uint8)
    values = np.concatenate([reference.FP4_VALUES, -reference.FP4_VALUES]).astype(np.float32)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1 = W[:, i1:i2].cpu().numpy().copy()
        Err1 = np.zeros_like(W1)
        Hinv1 = np.ascontiguousarray(Hinv_np[i1:i2, i1:i2])
        for i in range(0, i2 - i1, grid.group):
            byte, fac, dec = grid.scale(W1[:, i:i + grid.group], Hinv1[i:i + grid.group, i:i + grid.group], values)
            scales[:, (i1 + i) // grid.group] = byte
            _columns(W1, i, grid.group, Hinv1, fac, grid.scheme == "nvfp4", dec, values,
                     codes[:, i1:i2], Q[:, i1:i2], Err1)
        W[:, i2:] -= torch.from_numpy(Err1).to(device) @ Hinv[i1:i2, i2:]
    return reference.pack_fp4(codes), scales, torch.from_numpy(Q)
