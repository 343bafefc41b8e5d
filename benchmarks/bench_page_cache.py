#!/usr/bin/env python3
"""Page-cache growth while converting, with and without qstream dropping the pages it is done with.

On a unified-memory machine (GB10) the page cache competes with the GPU for the same
memory. qstream calls posix_fadvise(DONTNEED) on source byte ranges once their output
shard is written, on source files after their last use, and on each output shard once
it is hashed. QSTREAM_KEEP_PAGE_CACHE=1 turns that off, for this comparison.

Before each run the source files are evicted from the cache (fadvise DONTNEED), so
both runs start cold; "Cached" from /proc/meminfo is sampled every 0.1 s.

    python benchmarks/bench_page_cache.py --src /tmp/qbench/synth-4g --out benchmarks/RESULTS-page-cache.md
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_convert import machine, report  # noqa: E402


def cached_bytes() -> int:
    for line in open("/proc/meminfo"):
        if line.startswith("Cached:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no Cached in /proc/meminfo")


def evict(path: Path) -> None:
    for f in path.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def run(src: Path, dst: Path, scheme: str, keep: bool) -> tuple[int, int, float]:
    shutil.rmtree(dst, ignore_errors=True)
    evict(src)
    os.sync()
    base = cached_bytes()
    env = dict(os.environ)
    if keep:
        env["QSTREAM_KEEP_PAGE_CACHE"] = "1"
    else:
        env.pop("QSTREAM_KEEP_PAGE_CACHE", None)
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-m", "qstream", "convert", str(src), str(dst), "--mlp", scheme, "-q"], env=env)
    peak = base
    while p.poll() is None:
        peak = max(peak, cached_bytes())
        time.sleep(0.1)
    dt = time.perf_counter() - t0
    if p.returncode:
        raise SystemExit("conversion failed")
    after = cached_bytes()
    shutil.rmtree(dst, ignore_errors=True)
    return peak - base, after - base, dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", type=Path, required=True)
    ap.add_argument("--scheme", default="nvfp4")
    ap.add_argument("--work", type=Path, default=Path("/tmp/qbench"))
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    size = sum(f.stat().st_size for f in args.src.iterdir() if f.is_file())
    rows = []
    for keep in (True, False):
        peak, after, dt = run(args.src, args.work / "pc-out", args.scheme, keep)
        label = "kept (QSTREAM_KEEP_PAGE_CACHE=1)" if keep else "dropped (default)"
        rows.append((label, peak, after, dt))
        print(f"{label}: page cache +{peak / 1e9:.2f} GB at peak, +{after / 1e9:.2f} GB after, {dt:.1f} s", flush=True)
    lines = [f"Machine: {machine()}", f"Source: {args.src.name}, {size / 1e9:.2f} GB, --mlp {args.scheme}", "",
             "| pages | page-cache growth at peak | growth after the run | time (s) |", "|---|---:|---:|---:|"]
    for label, peak, after, dt in rows:
        lines.append(f"| {label} | {peak / 1e9:.2f} GB | {after / 1e9:.2f} GB | {dt:.1f} |")
    report(lines, args.out)


if __name__ == "__main__":
    main()
