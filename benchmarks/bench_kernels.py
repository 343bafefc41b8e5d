#!/usr/bin/env python3
"""FP4 kernel throughput (MB/s of BF16 input) and first-call compile time.

    python benchmarks/bench_kernels.py --out benchmarks/RESULTS-kernels.md

For MXFP4 and NVFP4, with each ``--scale-search`` mode, on a Llama-sized BF16 matrix
(default 14336 x 4096, Llama-3-8B's gate/up_proj, 117 MB, N(0, 0.02) weights): the
serial kernel (``quantize_*_into``) run over row blocks of 16 MiB of BF16 (what the
converter does), from 1 Python thread and from ``--threads`` Python threads (default:
all cores). Reported per run: wall-clock rate, and the rate per CPU-second (bytes /
process CPU time), which is what one core delivers and is not inflated or deflated by
other load on a shared machine. Best of ``--repeat`` runs.

``--compare DIR``: every row is measured twice, side by side in the same run, with the
kernels of this checkout and with those of another one (``DIR`` holds its ``qstream``
package, e.g. ``git archive BASE qstream | tar -x -C DIR``), each in a fresh process
that imports only its own copy; the table gets a "before" (DIR) and an "after" (this
checkout) rate per CPU-second, and their ratio.

Compile time: a fresh process with an empty numba cache (``NUMBA_CACHE_DIR``) compiles
the kernels (``kernels.warmup``), first the round-to-nearest ones, then the scale-search
ones (serial), then the ``parallel=True`` variants; a second fresh process loads them all
from that cache.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import ml_dtypes
import numpy as np

REPO = Path(os.environ.get("QSTREAM_BENCH_REPO") or Path(__file__).resolve().parent.parent)
sys.path.insert(0, str(REPO))

BLOCK_BYTES = 16 << 20  # qstream.convert.BLOCK_BYTES

COMPILE_SNIPPET = """
import time, json, sys
t0 = time.perf_counter()
from qstream.schemes import kernels as K
t1 = time.perf_counter()
rtn = K.warmup(search=False, parallel=False)
search = K.warmup(parallel=False)
par = K.warmup()
print(json.dumps({"import": t1 - t0, "rtn": rtn, "search": search, "parallel": par}))
"""


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    import numba

    return (f"{model}, {os.cpu_count()} cores, Python {platform.python_version()}, numpy {np.__version__}, "
            f"numba {numba.__version__}; load average {load:.1f} at start")


def compile_times() -> tuple[dict, dict]:
    with tempfile.TemporaryDirectory() as d:
        env = dict(os.environ, NUMBA_CACHE_DIR=d, PYTHONPATH=str(REPO))
        import json

        cold = json.loads(subprocess.run([sys.executable, "-c", COMPILE_SNIPPET], env=env, check=True,
                                         capture_output=True, text=True).stdout.strip().splitlines()[-1])
        warm = json.loads(subprocess.run([sys.executable, "-c", COMPILE_SNIPPET], env=env, check=True,
                                         capture_output=True, text=True).stdout.strip().splitlines()[-1])
    return cold, warm


def run(K, w, gs, scheme, search, threads) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) to quantize all of w in row blocks."""
    rows, cols = w.shape
    step = max(1, BLOCK_BYTES // (cols * w.dtype.itemsize))
    blocks = [(r, min(rows, r + step)) for r in range(0, rows, step)]
    packed = np.empty((rows, cols // 2), np.uint8)
    group = 16 if scheme == "nvfp4" else 32
    scale = np.empty((rows, cols // group), np.uint8)

    def item(b):
        r0, r1 = b
        if scheme == "nvfp4":
            K.quantize_nvfp4_into(w[r0:r1], gs, packed[r0:r1], scale[r0:r1], search)
        else:
            K.quantize_mxfp4_into(w[r0:r1], packed[r0:r1], scale[r0:r1], search)

    t0, c0 = time.perf_counter(), time.process_time()
    if threads == 1:
        for b in blocks:
            item(b)
    else:
        with ThreadPoolExecutor(threads) as ex:
            list(ex.map(item, blocks))
    return time.perf_counter() - t0, time.process_time() - c0


def matrix(rows: int, cols: int):
    return (np.random.default_rng(0).standard_normal((rows, cols), dtype=np.float32) * np.float32(0.02)).astype(
        ml_dtypes.bfloat16)


def measure_row(K, R, w, gs, scheme, search, threads, repeat) -> list[float]:
    """[1-thread wall MB/s, per CPU-s, N-thread wall, per CPU-s], best of ``repeat``."""
    mb = w.nbytes / 1e6
    cells = []
    for t in (1, threads):
        best_wall, best_cpu = float("inf"), float("inf")
        for _ in range(repeat):
            wall, cpu = run(K, w, gs, scheme, search, t)
            best_wall, best_cpu = min(best_wall, wall), min(best_cpu, cpu)
        cells += [mb / best_wall, mb / best_cpu]
    return cells


def row_in(repo: Path, args, scheme: str, search: str) -> list[float]:
    """measure_row in a fresh process importing the qstream package under ``repo``."""
    import json

    env = dict(os.environ, QSTREAM_BENCH_REPO=str(repo), PYTHONPATH=str(repo))
    out = subprocess.run([sys.executable, __file__, "--row", scheme, search, "--shape", *map(str, args.shape),
                          "--threads", str(args.threads), "--repeat", str(args.repeat)], env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", type=int, nargs=2, default=[14336, 4096])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-compile", action="store_true", help="skip the compile-time measurement")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--compare", type=Path, help="another checkout's root (holding qstream/): before/after per row")
    ap.add_argument("--row", nargs=2, metavar=("SCHEME", "SEARCH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.row:  # one row, as JSON (the --compare subprocesses)
        import json

        from qstream.schemes import kernels as K
        from qstream.schemes import reference as R

        K.warmup(parallel=False)
        w = matrix(*args.shape)
        gs = R.nvfp4_global_scale(K.absmax(w), w.dtype)
        print(json.dumps(measure_row(K, R, w, gs, *args.row, args.threads, args.repeat)))
        return

    lines = ["# FP4 kernel throughput", "", f"`benchmarks/bench_kernels.py`, {time.strftime('%Y-%m-%d')}. "
             f"Machine: {machine()}.", ""]
    if not args.no_compile:
        cold, warm = compile_times()
        lines += ["## First-call compile time", "",
                  "| kernels | cold (empty numba cache) | cached |", "|---|---:|---:|",
                  f"| import qstream.schemes.kernels | {cold['import']:.1f} s | {warm['import']:.1f} s |",
                  f"| round-to-nearest, serial, 3 dtypes | {cold['rtn']:.1f} s | {warm['rtn']:.2f} s |",
                  f"| + scale search, serial, 3 dtypes | {cold['search']:.1f} s | {warm['search']:.2f} s |",
                  f"| + all `parallel=True` variants | {cold['parallel']:.1f} s | {warm['parallel']:.2f} s |",
                  "", "A conversion compiles only what it uses, once per machine: the serial kernels of its "
                  "source dtype and scale-search mode (the round-to-nearest rows above cover all three "
                  "dtypes).", ""]
        print("\n".join(lines), flush=True)

    from qstream.schemes import kernels as K
    from qstream.schemes import reference as R

    rows, cols = args.shape
    mb = rows * cols * 2 / 1e6
    if args.compare:
        lines += ["## Throughput, before / after", "",
                  f"BF16 [{rows}, {cols}] ({mb:.0f} MB), row blocks of 16 MiB, best of {args.repeat}, MB/s of BF16 "
                  f"input per CPU-second (bytes / process CPU time: one core's rate). Before: `{args.compare}`; after: "
                  f"`{REPO}`. Each row measures before, then after, in fresh processes, one right after the other.", "",
                  f"| scheme | --scale-search | before: 1 thread | after: 1 thread | after / before | "
                  f"before: {args.threads} threads | after: {args.threads} threads |", "|---|---|---:|---:|---:|---:|---:|"]
        for scheme in ("mxfp4", "nvfp4"):
            for search in R.SEARCH_MODES[scheme]:
                old = row_in(args.compare, args, scheme, search)
                new = row_in(REPO, args, scheme, search)
                row = (f"| {scheme} | {search} | {old[1]:,.0f} | {new[1]:,.0f} | {new[1] / old[1]:.2f}x | "
                       f"{old[3]:,.0f} | {new[3]:,.0f} |")
                print(row, flush=True)
                lines.append(row)
        lines.append("")
        if args.out:
            args.out.write_text("\n".join(lines) + "\n")
        return

    K.warmup(parallel=False)
    w = matrix(rows, cols)
    gs = R.nvfp4_global_scale(K.absmax(w), w.dtype)
    lines += ["## Throughput", "",
              f"BF16 [{rows}, {cols}] ({mb:.0f} MB), row blocks of 16 MiB, best of {args.repeat}. "
              "MB/s of BF16 input; \"per CPU-s\" is bytes / process CPU time (one core's rate).", "",
              f"| scheme | --scale-search | 1 thread: wall | 1 thread: per CPU-s | {args.threads} threads: wall | "
              f"{args.threads} threads: per CPU-s |", "|---|---|---:|---:|---:|---:|"]
    for scheme in ("mxfp4", "nvfp4"):
        for search in R.SEARCH_MODES[scheme]:
            cells = [f"{x:,.0f}" for x in measure_row(K, R, w, gs, scheme, search, args.threads, args.repeat)]
            row = f"| {scheme} | {search} | " + " | ".join(cells) + " |"
            print(row, flush=True)
            lines.append(row)
    lines.append("")
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
