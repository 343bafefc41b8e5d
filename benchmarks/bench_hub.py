#!/usr/bin/env python3
"""Hub to Hub: does a conversion overlap its download, its compute and its upload?

A local Hub-compatible server (``tests/hub_server.py``, plain LFS, no Xet) with a link
limited to ``--mbps`` MB/s each way (shared by all connections, one downlink and one
uplink) holds a synthetic checkpoint. Measured in one run, one after the other, each
client a fresh process with an empty Hugging Face cache:

1. download only: ``huggingface_hub.snapshot_download`` of the source repo;
2. upload only: ``HfApi.upload_folder`` of the converted output (made locally first);
3. qstream: ``qstream convert ORG/SRC DST --mlp SCHEME --push-to-hub ORG/OUT``.

Perfect overlap makes (3) as long as the longer of (1) and (2); the target is within
1.15x of it.

    python benchmarks/bench_hub.py --size-gb 4 --mbps 200 --out benchmarks/RESULTS-hub.md
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from bench_convert import machine, report, run_timed  # noqa: E402

TOKEN = "hf_qstream_test_token"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gb", type=float, default=4.0)
    ap.add_argument("--mbps", type=float, default=200.0)
    ap.add_argument("--scheme", default="mxfp4")
    ap.add_argument("--scale-search", default="mse")
    ap.add_argument("--max-shard-size", default="1GB", help="output shards (a shard is uploaded once written: "
                    "smaller shards overlap more)")
    ap.add_argument("--src-shard-gb", type=float, default=2.0, help="source shards of the synthetic checkpoint")
    ap.add_argument("--work", type=Path, default=Path("/tmp/qhub"))
    ap.add_argument("--port", type=int, default=8127)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    work = args.work.resolve()
    src = work / f"synth-{args.size_gb:g}g" if args.src_shard_gb == 2.0 else work / f"synth-{args.size_gb:g}g-{args.src_shard_gb:g}"
    if not (src / "config.json").exists():
        subprocess.run([sys.executable, str(HERE / "make_synthetic.py"), str(src), "--size-gb", str(args.size_gb),
                        "--shard-gb", str(args.src_shard_gb)], check=True)
    conv = ["--mlp", args.scheme, "--scale-search", args.scale_search, "--max-shard-size", args.max_shard_size, "-q"]
    ref = work / f"ref-out-{src.name}-{args.scheme}-{args.scale_search}-{args.max_shard_size}"
    if not (ref / "config.json").exists():
        shutil.rmtree(ref, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "qstream", "convert", str(src), str(ref), *conv], check=True, cwd="/",
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    src_bytes = sum(f.stat().st_size for f in src.iterdir() if f.is_file())
    out_bytes = sum(f.stat().st_size for f in ref.iterdir() if f.is_file())

    root = work / "hub"
    shutil.rmtree(root, ignore_errors=True)
    server = subprocess.Popen([sys.executable, str(REPO / "tests" / "hub_server.py"), "--root", str(root), "--port",
                               str(args.port), "--no-xet", "--mbps", str(args.mbps), "--seed", "org/src", str(src)],
                              stdout=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()  # printed once the source repo is seeded
        if "HF_ENDPOINT" not in line:
            raise SystemExit(f"hub server did not start: {line!r}")
        url = f"http://127.0.0.1:{args.port}"

        def env(home: str) -> dict:
            h = work / home
            shutil.rmtree(h, ignore_errors=True)
            return {**os.environ, "HF_ENDPOINT": url, "HF_TOKEN": TOKEN, "HF_HOME": str(h), "HF_HUB_CACHE": str(h / "hub"),
                    "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_OFFLINE": "0",
                    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
                    "PYTHONPATH": str(REPO)}

        def server_cpu() -> float:
            f = open(f"/proc/{server.pid}/stat").read().rsplit(")", 1)[1].split()
            return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime

        def timed(cmd: list[str], e: dict) -> tuple[float, int, float, float]:
            """wall, peak RSS, the client's CPU seconds, the server's CPU seconds meanwhile"""
            os.environ.update({k: v for k, v in e.items() if k.startswith(("HF_", "PYTHONPATH"))})
            c0 = server_cpu()
            t, rss, cpu = run_timed(cmd)
            return t, rss, cpu, server_cpu() - c0

        down_dir = work / "down"
        shutil.rmtree(down_dir, ignore_errors=True)
        t_down, _, cd, sd = timed([sys.executable, "-c", "import sys; from huggingface_hub import snapshot_download; "
                           "snapshot_download('org/src', local_dir=sys.argv[1])", str(down_dir)], env("home-down"))
        shutil.rmtree(down_dir, ignore_errors=True)
        t_up, _, cu, su = timed([sys.executable, "-c", "import sys; from huggingface_hub import HfApi; a = HfApi(); "
                         "a.create_repo('org/up', exist_ok=True); a.upload_folder(repo_id='org/up', folder_path=sys.argv[1])",
                         str(ref)], env("home-up"))
        dst = work / "q-out"
        shutil.rmtree(dst, ignore_errors=True)
        local = work / "local-out"
        shutil.rmtree(local, ignore_errors=True)
        t_loc, _, cl = run_timed([sys.executable, "-m", "qstream", "convert", str(src), str(local), *conv])
        shutil.rmtree(local, ignore_errors=True)
        t_q, rss_q, cq, sq = timed([sys.executable, "-m", "qstream", "convert", "org/src", str(dst), *conv, "--push-to-hub", "org/q"],
                           env("home-q"))
        shutil.rmtree(dst, ignore_errors=True)
    finally:
        server.terminate()
        server.wait()
    shutil.rmtree(root, ignore_errors=True)

    floor = max(t_down, t_up)
    ncpu = os.cpu_count() or 1
    cpu_floor = (cd + sd + cu + su + cl) / ncpu  # every CPU second the three jobs need, on all cores
    lines = [f"# Hub to Hub at {args.mbps:g} MB/s each way", "",
             f"Machine: {machine()}. `python benchmarks/bench_hub.py --size-gb {args.size_gb:g} --mbps {args.mbps:g}`, "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.", "",
             f"Local Hub-compatible server (tests/hub_server.py, plain LFS), link limited to {args.mbps:g} MB/s down and "
             f"{args.mbps:g} MB/s up. Source: synthetic Llama BF16, {src_bytes / 1e9:.2f} GB; output "
             f"(`--mlp {args.scheme} --scale-search {args.scale_search} --max-shard-size {args.max_shard_size}`) "
             f"{out_bytes / 1e9:.2f} GB. Each client a fresh "
             "process with an empty cache.", "",
             "| run | wall (s) | client CPU (s) | server CPU (s) | effective rate |", "|---|---:|---:|---:|---:|",
             f"| download only (`snapshot_download`) | {t_down:.1f} | {cd:.1f} | {sd:.1f} | {src_bytes / t_down / 1e6:.0f} MB/s |",
             f"| upload only (`upload_folder` of the output) | {t_up:.1f} | {cu:.1f} | {su:.1f} | {out_bytes / t_up / 1e6:.0f} MB/s |",
             f"| qstream convert, local folder to local folder | {t_loc:.1f} | {cl:.1f} | | |",
             f"| qstream convert Hub -> Hub (`--push-to-hub`) | {t_q:.1f} | {cq:.1f} | {sq:.1f} | peak RSS {rss_q / 2**30:.2f} GiB |", "",
             f"qstream / max(download, upload) = **{t_q / floor:.2f}x** (target 1.15x); download + upload would be "
             f"{(t_down + t_up) / floor:.2f}x.", "",
             f"CPU bound: download, upload and a local conversion together take {cd + sd + cu + su + cl:.1f} CPU-s "
             f"(clients and server), {cpu_floor:.1f} s on this machine's {ncpu} cores if every core were busy all "
             f"the time; qstream / max(link bound, CPU bound) = **{t_q / max(floor, cpu_floor):.2f}x**."]
    report(lines, args.out)


if __name__ == "__main__":
    main()
