#!/usr/bin/env python3
"""qstream vs llm-compressor's model_free_ptq on the same checkpoint, side by side.

llm-compressor needs torch and its own pinned transformers / compressed-tensors, so it
runs from its own virtual environment (made once by --setup):

    python benchmarks/bench_llmcompressor.py --setup /tmp/lcvenv
    python benchmarks/bench_llmcompressor.py --lc-venv /tmp/lcvenv --src /tmp/qbench/synth-4g \
        --out benchmarks/RESULTS-llmcompressor.md

Both quantize the MLP linears only (llm-compressor: every Linear but attention and
lm_head), with the same scheme, on all cores; wall time and peak RSS of each process.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_convert import machine, report, run_timed, warm  # noqa: E402

LC_SCHEME = {"nvfp4": "NVFP4A16", "mxfp4": "MXFP4A16"}
LC_SNIPPET = (
    "import sys; from llmcompressor import model_free_ptq; "
    "model_free_ptq(sys.argv[1], sys.argv[2], scheme=sys.argv[3], "
    "ignore=['lm_head', 're:.*self_attn.*', 're:.*embed_tokens.*'], max_workers=int(sys.argv[4]), device='cpu')"
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setup", type=Path, help="create a venv with llmcompressor 0.14.0.1 here and exit")
    ap.add_argument("--lc-venv", type=Path, default=Path("/tmp/lcvenv"))
    ap.add_argument("--src", type=Path, action="append", default=[])
    ap.add_argument("--schemes", nargs="+", default=["mxfp4", "nvfp4"])
    ap.add_argument("--work", type=Path, default=Path("/tmp/qbench"))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--scale-search", default="mse", help="qstream's --scale-search (none = the same rounding as llm-compressor)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.setup:
        subprocess.run([sys.executable, "-m", "venv", str(args.setup)], check=True)
        pip = [str(args.setup / "bin" / "python"), "-m", "pip", "install", "-q"]
        subprocess.run(pip + ["--upgrade", "pip"], check=True)
        subprocess.run(pip + ["torch==2.13.0", "llmcompressor==0.14.0.1"], check=True)
        return
    lc_py = str(args.lc_venv / "bin" / "python")
    rows = []
    for src in args.src:
        size = sum(f.stat().st_size for f in src.iterdir() if f.is_file())
        for scheme in args.schemes:
            dst_lc, dst_q = args.work / "lc-out", args.work / "q-out"
            for d in (dst_lc, dst_q):
                shutil.rmtree(d, ignore_errors=True)
            warm(src)
            t_lc, rss_lc, _ = run_timed([lc_py, "-c", LC_SNIPPET, str(src), str(dst_lc), LC_SCHEME[scheme], str(args.workers)])
            warm(src)
            t_q, rss_q, _ = run_timed([sys.executable, "-m", "qstream", "convert", str(src), str(dst_q), "--mlp", scheme, "-q",
                                    "--scale-search", args.scale_search])
            rows.append((src.name, f"{scheme} (qstream --scale-search {args.scale_search})", size, t_lc, rss_lc, t_q, rss_q))
            print(f"{src.name} {scheme}: llm-compressor {t_lc:.1f} s ({rss_lc / 2**30:.2f} GiB), "
                  f"qstream {t_q:.1f} s ({rss_q / 2**30:.2f} GiB): {t_lc / t_q:.1f}x faster", flush=True)
            for d in (dst_lc, dst_q):
                shutil.rmtree(d, ignore_errors=True)
    lines = [f"Machine: {machine()}", f"Run: {time.strftime('%Y-%m-%d %H:%M')}", "",
             "| source | scheme | size | llm-compressor (s) | its peak RSS | qstream (s) | qstream peak RSS | speed-up |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, scheme, size, t_lc, rss_lc, t_q, rss_q in rows:
        lines.append(f"| {name} | {scheme} | {size / 1e9:.2f} GB | {t_lc:.1f} | {rss_lc / 2**30:.2f} GiB | {t_q:.1f} | "
                     f"{rss_q / 2**30:.2f} GiB | {t_lc / t_q:.1f}x |")
    report(lines, args.out)


if __name__ == "__main__":
    main()
