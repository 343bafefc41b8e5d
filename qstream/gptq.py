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
qstream's (:func:`qstream.schemes.reference.quantize_nvfp4` / ``quantize_mxfp4`` on the
group's current float32 values, with the plan's ``--scale-search``: ``none`` is
compressed-tensors' min-max rounding, ``mse`` the lowest squared error among the
neighbouring scale codes), and every column is quantized exactly as compressed-tensors'
quantizer does with that scale (NVFP4: ``q = float32(x / float32(s / gs))``; MXFP4:
``q = x * 2**(127 - e)``; FP4 round-half-even, sign iff q < 0), its error taken against the
value compressed-tensors' decoder gives for the code (bf16). The codes and scale bytes
returned are therefore exactly what the output stores and what its loaders decode.

All arithmetic is float32 on one device in a fixed order, so the result does not depend
on qstream's ``--threads`` (torch's own thread count is fixed by the caller).
"""

from __future__ import annotations

import numpy as np
import torch

from .schemes import reference

BLOCK = 128
DAMP = 0.01
_THRESH = ((0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False), (3.5, True), (5.0, False))


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


def fp4_codes(q: torch.Tensor) -> torch.Tensor:
    """FP4 E2M1 codes (uint8) of scaled float32 values, as :func:`reference.fp4_encode`."""
    a = q.clamp(-6.0, 6.0).abs()
    idx = torch.zeros(q.shape, dtype=torch.uint8, device=q.device)
    for t, inclusive in _THRESH:
        idx += (a >= t) if inclusive else (a > t)
    return idx | ((q < 0).to(torch.uint8) << 3)


def _fp4_values(device: torch.device) -> torch.Tensor:
    v = torch.from_numpy(reference.FP4_VALUES).to(device)
    return torch.cat([v, -v])


class _Grid:
    """One scheme's per-group scale choice and per-column quantize / decode."""

    def __init__(self, scheme: str, gs: np.float32 | None, search: str, device: torch.device) -> None:
        self.scheme, self.gs, self.search, self.device = scheme, gs, search, device
        self.group = reference.NVFP4_GROUP if scheme == "nvfp4" else reference.MXFP4_GROUP
        self.values = _fp4_values(device)

    def scale(self, wg: torch.Tensor) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
        """(scale bytes [rows], float32 divisor [rows], float32 decode factor [rows]) of a group."""
        g = wg.detach().cpu().numpy().astype(np.float32)
        if self.scheme == "nvfp4":
            _, code = reference.quantize_nvfp4(g, self.gs, search=self.search)
            code = code[:, 0]
            sv = torch.from_numpy(code.view(reference.E4M3).astype(np.float32)).to(self.device)
            sc = sv / torch.tensor(float(self.gs), dtype=torch.float32, device=self.device)
            return code, sc, sc
        _, byte = reference.quantize_mxfp4(g, search=self.search)
        byte = byte[:, 0]
        e = torch.from_numpy(byte.astype(np.int32) - 127).to(self.device)
        one = torch.ones(len(byte), dtype=torch.float32, device=self.device)
        dec = torch.ldexp(one, e).to(torch.bfloat16).float()  # bf16(2 ** bf16(e - 127))
        return byte, torch.ldexp(one, -e), dec  # multiplier 2 ** (127 - e): exact

    def quantize(self, w: torch.Tensor, div: torch.Tensor, dec: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes, decoded bf16 values as float32) of one column; ``div`` divides (NVFP4's
        float32(s / gs)) or multiplies (MXFP4's 2 ** (127 - e))."""
        codes = fp4_codes(w / div if self.scheme == "nvfp4" else w * div)
        return codes, (self.values[codes.long()] * dec).to(torch.bfloat16).float()


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, scheme: str, gs: np.float32 | None,
                  search: str = "mse", block: int = BLOCK, damp: float = DAMP):
    """GPTQ of a [rows, cols] weight against the Hessian [cols, cols] of its inputs.

    Returns ``(packed uint8 [rows, cols/2], scale uint8 [rows, cols/group], decoded float32
    [rows, cols])``: the FP4 codes packed as compressed-tensors packs them, the scale bytes
    (E4M3 for NVFP4, biased E8M0 for MXFP4) and the values the decoder gives. On the CPU it
    runs on one torch thread (thousands of small ops: threads only add overhead, and the
    result is then the same whatever the machine's thread settings)."""
    if hessian.device.type != "cpu":
        return _gptq(weight, hessian, scheme, gs, search, block, damp)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _gptq(weight, hessian, scheme, gs, search, block, damp)
    finally:
        torch.set_num_threads(n)


def _gptq(weight, hessian, scheme, gs, search, block, damp):
    device = hessian.device
    W = weight.to(device=device, dtype=torch.float32).clone()
    rows, cols = W.shape
    grid = _Grid(scheme, gs, search, device)
    if cols % grid.group or block % grid.group:
        raise ValueError(f"{cols} columns / block {block} are not whole {scheme} groups of {grid.group}")
    H = hessian.to(torch.float32).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += damp * torch.mean(torch.diag(H)) * torch.eye(cols, dtype=torch.float32, device=device)
    L, info = torch.linalg.cholesky_ex(H)
    if int(info) != 0:  # not positive definite in float32: dampen more, as llm-compressor suggests
        H += 0.1 * torch.mean(torch.diag(H)) * torch.eye(cols, dtype=torch.float32, device=device)
        L = torch.linalg.cholesky(H)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    codes = torch.empty((rows, cols), dtype=torch.uint8, device=device)
    Q = torch.empty_like(W)
    scales = np.empty((rows, cols // grid.group), dtype=np.uint8)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        div = dec = None
        for i in range(i2 - i1):
            col = i1 + i
            if col % grid.group == 0:
                byte, div, dec = grid.scale(W1[:, i:i + grid.group])
                scales[:, col // grid.group] = byte
            w = W1[:, i]
            c, q = grid.quantize(w, div, dec)
            codes[:, col] = c
            Q[:, col] = q
            err = (w - q) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    packed = reference.pack_fp4(codes.cpu().numpy())
    return packed, scales, Q.cpu()
