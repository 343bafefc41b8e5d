#!/usr/bin/env python3
"""Where a quantized value's CPU time goes, stage by stage, on one core.

One block of an FP8 per-tensor MLP weight with Mistral Medium 3.5's width (12288 columns,
16 MiB of codes, values normal with std 1 before the FP8 cast) goes through the stages
``qstream convert`` runs on it: the FP8 decode (numpy's gather + multiply, the reference,
and the fused kernel convert uses), the absmax of the codes (NVFP4 global-scale pass of a
per-tensor source), the finite check (absmax of the decoded rows), the FP4 quantization
(``--scale-search none`` and the default ``mse``) and the error measurement for the card
(also of the same values as a BF16 source).
Best of ``--repeat``, nanoseconds per value, NUMBA_NUM_THREADS=1 (one core's rate); the
sum per scheme is the CPU cost of one MLP value, the figure benchmarks/RESULTS-gb10.md
projects from.

    NUMBA_NUM_THREADS=1 python benchmarks/bench_stages.py --out benchmarks/RESULTS-stages.md
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import ml_dtypes
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
from bench_convert import machine, report  # noqa: E402


def best(f, repeat: int) -> float:
    t = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        f()
        t = min(t, time.perf_counter() - t0)
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1365)  # 16 MiB of FP8 codes at 12288 columns
    ap.add_argument("--cols", type=int, default=12288)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    from qstream.schemes import SCHEMES, decode, fp8, measure, reference
    from qstream.schemes import kernels as k

    k.warmup()
    rng = np.random.default_rng(0)
    codes = rng.standard_normal((args.rows, args.cols)).astype(np.float32).astype(ml_dtypes.float8_e4m3fn)
    codes = codes.view(np.uint8)
    scale = np.array([0.02 / 448 * 4], dtype=np.float32)
    n = codes.size
    ns = lambda f: best(f, args.repeat) / n * 1e9  # noqa: E731
    x = k.fp8_dequant(codes, scale, "tensor", 0, None)
    rows = [("FP8 decode, numpy gather + multiply (the reference; convert before)",
             ns(lambda: fp8.apply_scale(fp8.decode_fp8(codes), scale, "tensor", 0, None)), ""),
            ("FP8 decode, fused kernel (convert now)", ns(lambda: k.fp8_dequant(codes, scale, "tensor", 0, None)), ""),
            ("absmax from the FP8 codes (NVFP4 global-scale pass, per-tensor source)",
             ns(lambda: k.fp8_absmax(codes, scale)), ""),
            ("finite check: absmax of the decoded rows", ns(lambda: k.absmax(x)), "")]
    for name in ("nvfp4", "mxfp4"):
        sch = SCHEMES[name]
        gs = reference.nvfp4_global_scale(k.fp8_absmax(codes, scale), np.float32) if sch.has_global_scale else None
        for search in ("none", "mse"):
            rows.append((f"{name} quantize, --scale-search {search}", ns(lambda: sch.quantize(k, x, gs, search)), name))
        p, s = sch.quantize(k, x, gs, "mse")
        measure.fp4_error(x, p, s, gs, decode._E8M0_BF16)
        rows.append((f"{name} error measurement (card, verify)",
                     ns(lambda: measure.fp4_error(x, p, s, gs, decode._E8M0_BF16)), name))
        xb = x.astype(ml_dtypes.bfloat16)  # a BF16 source (the measure reads its bits directly)
        pb, sb = sch.quantize(k, xb, gs, "mse")
        measure.fp4_error(xb, pb, sb, gs, decode._E8M0_BF16)
        rows.append((f"{name} error measurement, BF16 source",
                     ns(lambda: measure.fp4_error(xb, pb, sb, gs, decode._E8M0_BF16)), name + "-bf16"))
    lines = [f"Machine: {machine()}", f"Run: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
             f"NUMBA_NUM_THREADS={os.environ.get('NUMBA_NUM_THREADS', '(all)')}, load average at start "
             f"{os.getloadavg()[0]:.1f}", "",
             f"One block of {args.rows} x {args.cols} FP8 per-tensor codes ({n / 2**20:.0f} Mi values), best of "
             f"{args.repeat}:", "", "| stage | ns per value |", "|---|---:|"]
    lines += [f"| {label} | {t:.2f} |" for label, t, _ in rows]
    dec, fin = rows[1][1], rows[3][1]
    for name in ("nvfp4", "mxfp4"):
        q = {lab: t for lab, t, sc in rows if sc == name}
        mse = next(t for lab, t in q.items() if "mse" in lab)
        meas = next(t for lab, t in q.items() if "measurement" in lab)
        glob = rows[2][1] if name == "nvfp4" else 0.0
        total = dec + fin + glob + mse + meas
        lines.append(f"\nDefault {name} (mse) from an FP8 per-tensor source, per MLP value: decode {dec:.2f} + finite "
                     f"check {fin:.2f}" + (f" + global-scale pass {glob:.2f}" if glob else "") +
                     f" + quantize {mse:.2f} + measurement {meas:.2f} = **{total:.2f} ns** "
                     f"({1e3 / total:.0f} M values, {2e3 / total:.0f} MB of BF16-equivalent, per core-second)")
    report(lines, args.out)


if __name__ == "__main__":
    main()
