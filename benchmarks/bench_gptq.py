#!/usr/bin/env python3
"""qstream `convert --calibrate` (GPTQ, one decoder layer at a time) vs llm-compressor's
`oneshot` + `GPTQModifier`, on SmolLM2-135M, MLP linears only, side by side in one run.

Both tools calibrate on the SAME token windows (the first N x L SmolLM2 tokens of
tests/data/pride_and_prejudice.txt, no special tokens) and are scored on a text neither saw
(tests/data/alice_in_wonderland.txt): full-vocabulary KL(BF16 || quantized) per position, in
nats, every output decoded as compressed-tensors decodes it (qstream's layer-by-layer eval
engine, the BF16 source run once next to all the outputs). Wall time and peak RSS are those of
each conversion process (GNU time's %M: see bench_convert.run_timed).

    python benchmarks/bench_llmcompressor.py --setup /tmp/lcvenv   # once: llmcompressor 0.14.0.1
    python benchmarks/bench_gptq.py --lc-venv /tmp/lcvenv --out benchmarks/RESULTS-gptq.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "examples"))
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
CALIB = REPO / "tests" / "data" / "pride_and_prejudice.txt"
EVAL = REPO / "tests" / "data" / "alice_in_wonderland.txt"
LC_SCHEME = {"nvfp4": "NVFP4A16", "mxfp4": "MXFP4A16"}

LC_SCRIPT = r"""
import sys, torch
from datasets import Dataset
from transformers import AutoModelForCausalLM
from llmcompressor import oneshot
from llmcompressor.modifiers.gptq import GPTQModifier
src, dst, scheme, ids_path = sys.argv[1:5]
ids = torch.load(ids_path)
ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
recipe = GPTQModifier(targets="Linear", scheme=scheme, ignore=["lm_head", "re:.*self_attn.*"])
oneshot(model=model, dataset=ds, recipe=recipe, max_seq_length=ids.shape[1], num_calibration_samples=ids.shape[0])
model.save_pretrained(dst, save_compressed=True)
"""


def run_timed(cmd: list[str], env: dict | None = None) -> tuple[float, int, int]:
    """(wall seconds, peak RSS bytes, peak anonymous RSS bytes) of a child process; -1 as the
    RSS if it failed.

    The RSS is GNU time's %M (bench_convert.run_timed): this process imports torch, and
    wait4's ru_maxrss would carry its size into every child's figure. The anonymous peak is
    sampled (bench_convert._peak_anon).
    """
    from bench_convert import run_timed as timed

    anon: list = []
    try:
        secs, rss, _ = timed(cmd, env=env, stderr=subprocess.PIPE, anon=anon)
    except SystemExit as e:
        print(f"{' '.join(cmd[:4])} ... {e}", flush=True)
        return 0.0, -1, -1
    return secs, rss, anon[0]


def deepen(src: Path, dst: Path, times: int = 2) -> Path:
    """SmolLM2 with its decoder layers repeated ``times`` times (layer i + k*30 = layer i): the
    same widths and tokenizer, ``times`` x the depth, for the flat-memory check."""
    import torch  # noqa: F401
    from safetensors.torch import load_file, save_file

    if (dst / "config.json").exists():
        return dst
    dst.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((src / "config.json").read_text())
    n = cfg["num_hidden_layers"]
    tensors = {}
    for f in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    out = {}
    for name, t in tensors.items():
        if name.startswith("model.layers."):
            i, rest = name.removeprefix("model.layers.").split(".", 1)
            for k in range(times):
                out[f"model.layers.{int(i) + k * n}.{rest}"] = t.clone()
        else:
            out[name] = t
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg["num_hidden_layers"] = n * times
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in src.iterdir():
        if f.suffix != ".safetensors" and f.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copy(f, dst / f.name)
    return dst


def multi_eval(src: Path, outs: dict[str, Path], ids, ctx: int) -> dict[str, float]:
    """KL mean of each output against src: the source run once, all sides one layer at a time."""
    import torch

    from qstream.evaluate import score, windows
    from qstream.layerwise import Skeleton, WeightStore, read_config, run_layer

    dev = torch.device("cpu")
    wins = windows(ids, ctx)
    stores = [WeightStore(src)] + [WeightStore(p) for p in outs.values()]
    sk = Skeleton.build(read_config(src), set(stores[0].tensors))
    with torch.inference_mode():
        hs = [[sk.embed(w, st, dev) for w in wins] for st in stores]
        calls = [sk.layer_inputs(h) for h in hs[0]]
        for L in range(sk.num_layers):
            for s, st in enumerate(stores):
                layer = sk.layer(L, st, dev)
                hs[s] = [run_layer(layer, h, calls[k][L]) for k, h in enumerate(hs[s])]
                del layer
        heads = []
        for s, st in enumerate(stores):
            norm = sk.materialize(sk.decoder.norm, f"{sk.prefix}.norm", st, dev)
            hs[s] = [norm(h) for h in hs[s]]
            name = sk.head if sk.head in st or not sk.tied else sk.tied
            heads.append(st.tensor(name, sk.dtype, dev))
        res = {}
        for s, label in enumerate(outs, 1):
            r = score(wins, hs[0], hs[s], heads[0], heads[s])
            res[label] = {"kl": r.kld_mean, "ppl": r.ppl_output, "ppl_src": r.ppl_source, "top1": r.top1_agree,
                          "tokens": r.tokens}
    for st in stores:
        st.close()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lc-venv", type=Path, default=Path("/tmp/lcvenv"))
    ap.add_argument("--qs-venv", type=Path,
                    help="run qstream's conversions with this venv's python (made by --setup-qs: `pip install "
                         ".[calibrate]`, what a user installs; this checkout's code via PYTHONPATH), not this "
                         "process's own, whose extra packages (scipy, which transformers then imports) add to the RSS")
    ap.add_argument("--setup-qs", type=Path, metavar="DIR", help="create that venv here and exit")
    ap.add_argument("--work", type=Path, default=Path("/tmp/qbench-gptq"))
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("QSTREAM_TEST_CACHE", REPO / ".cache")))
    ap.add_argument("--samples", type=int, default=26)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--schemes", nargs="+", default=["nvfp4", "mxfp4"])
    ap.add_argument("--extra", nargs="*", default=[], help="extra qstream runs: SCHEME:SEARCH (GPTQ with that search)")
    ap.add_argument("--torch-threads", type=int, default=None,
                    help="OMP_NUM_THREADS for both tools' processes (default: torch's own choice)")
    ap.add_argument("--deep", action="store_true",
                    help="also convert a 2x-deep SmolLM2 (layers repeated) with both tools: peak RSS and wall only")
    ap.add_argument("--depth-only", type=Path, metavar="OUT",
                    help="only qstream --calibrate (first of --schemes) on SmolLM2 and on its 2x-deep copy, side by "
                         "side: peak RSS and wall, written to OUT")
    ap.add_argument("--depth-reps", type=int, default=2, help="alternating runs of each depth (--depth-only)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.setup_qs:
        subprocess.run([sys.executable, "-m", "venv", str(args.setup_qs)], check=True)
        subprocess.run([str(args.setup_qs / "bin" / "python"), "-m", "pip", "install", "-q", f"{REPO}[calibrate]"],
                       check=True)
        return
    import smollm2
    import torch

    from qstream.calibrate import calibration_ids
    from qstream.evaluate import read_text, tokenize

    src = smollm2.cached_checkpoint(args.cache)
    args.work.mkdir(parents=True, exist_ok=True)
    ids = calibration_ids(src, CALIB, args.samples, args.seqlen)
    ids_path = args.work / "calib_ids.pt"
    torch.save(ids, ids_path)
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    if args.torch_threads:
        env["OMP_NUM_THREADS"] = str(args.torch_threads)
    qs = [str(args.qs_venv / "bin" / "python") if args.qs_venv else sys.executable, "-m", "qstream", "convert", str(src)]
    calib = ["--calibrate", str(CALIB), "--calib-samples", str(args.samples), "--calib-seqlen", str(args.seqlen)]
    runs = []  # (label, tool, scheme, how, cmd)
    for scheme in args.schemes:
        runs.append((f"q-{scheme}-free", "qstream", scheme, "data-free, --scale-search mse", qs + [None, "--mlp", scheme]))
        runs.append((f"lc-{scheme}-gptq", "llm-compressor", scheme, "oneshot + GPTQModifier",
                     [str(args.lc_venv / "bin" / "python"), "-c", LC_SCRIPT, str(src), None, LC_SCHEME[scheme],
                      str(ids_path)]))
        runs.append((f"q-{scheme}-gptq", "qstream", scheme, "--calibrate (GPTQ), --scale-search mse",
                     qs + [None, "--mlp", scheme] + calib))
    for extra in args.extra:
        scheme, search = extra.split(":")
        runs.append((f"q-{scheme}-gptq-{search}", "qstream", scheme, f"--calibrate (GPTQ), --scale-search {search}",
                     qs + [None, "--mlp", scheme, "--scale-search", search] + calib))
    if args.depth_only:
        return depth_only(args, src, qs, calib, env)
    eval_ids = tokenize(src, read_text(EVAL), args.eval_tokens)
    rows = []
    for scheme in dict.fromkeys(r[2] for r in runs):  # one scheme at a time: results written after each
        outs, new = {}, []
        for label, tool, sch, how, cmd in runs:
            if sch != scheme:
                continue
            dst = args.work / label
            shutil.rmtree(dst, ignore_errors=True)
            cmd = [str(dst) if c is None else c for c in cmd] + (["-q"] if tool == "qstream" else [])
            secs, rss, anon = run_timed(cmd, env)
            print(f"[{label}] {secs:.1f} s, peak RSS {rss / 2**20:.0f} MiB, anonymous {anon / 2**20:.0f} MiB",
                  flush=True)
            if rss < 0:
                continue
            new.append({"label": label, "tool": tool, "scheme": scheme, "how": how, "seconds": secs, "rss": rss,
                        "anon": anon})
            outs[label] = dst
        t0 = time.perf_counter()
        kl = multi_eval(src, outs, eval_ids, args.ctx)
        print(f"eval: {time.perf_counter() - t0:.0f} s", flush=True)
        for r in new:
            r.update(kl[r["label"]])
            print(json.dumps(r), flush=True)
        rows += new
        if args.out:
            write_results(args, rows)
    if args.deep:  # flat memory: the same widths at twice the depth, peak RSS and wall of each tool
        deep = deepen(src, args.work / "smollm2-60l")
        args.deep_rows = []
        for label, tool, scheme, how, cmd in runs:
            if "gptq" not in label or scheme != args.schemes[0]:
                continue
            dst = args.work / (label + "-60l")
            shutil.rmtree(dst, ignore_errors=True)
            cmd = [str(deep) if c == str(src) else str(dst) if c is None else c for c in cmd] + \
                (["-q"] if tool == "qstream" else [])
            secs, rss, anon = run_timed(cmd, env)
            print(f"[{label} 60 layers] {secs:.1f} s, peak RSS {rss / 2**20:.0f} MiB, anonymous "
                  f"{anon / 2**20:.0f} MiB", flush=True)
            args.deep_rows.append((tool, scheme, how, secs, rss, anon))
            shutil.rmtree(dst, ignore_errors=True)
        if args.out:
            write_results(args, rows)


def depth_only(args, src: Path, qs: list, calib: list, env: dict) -> None:
    """Flat memory: qstream --calibrate on SmolLM2 (30 layers) and on its 2x-deep copy, alternating."""
    deep = deepen(src, args.work / "smollm2-60l")
    scheme = args.schemes[0]
    res = {30: [], 60: []}
    for rep in range(args.depth_reps):
        for n, s in ((30, src), (60, deep)):
            dst = args.work / f"depth-{n}"
            shutil.rmtree(dst, ignore_errors=True)
            secs, rss, _ = run_timed([qs[0], *qs[1:-1], str(s), str(dst), "--mlp", scheme] + calib + ["-q"], env)
            print(f"[{n} layers, run {rep + 1}] {secs:.1f} s, peak RSS {rss / 2**20:.0f} MiB", flush=True)
            res[n].append((secs, rss))
            shutil.rmtree(dst, ignore_errors=True)
    size = {n: sum(f.stat().st_size for f in p.glob("*.safetensors")) for n, p in ((30, src), (60, deep))}
    lines = ["# GPTQ at twice the depth: qstream `convert --calibrate`, peak RSS flat", "",
             f"Recorded by `benchmarks/bench_gptq.py --depth-only` on {os.cpu_count()} CPU cores, "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, OMP_NUM_THREADS={args.torch_threads}. "
             f"`qstream convert SRC DST --mlp {scheme} --calibrate tests/data/pride_and_prejudice.txt "
             f"--calib-samples {args.samples} --calib-seqlen {args.seqlen}` on SmolLM2-135M (30 decoder layers, "
             f"{size[30] / 1e6:.0f} MB BF16) and on a copy with every layer repeated (60 layers, {size[60] / 1e6:.0f} "
             "MB: same widths, tokenizer and calibration tokens), alternating 30, 60 (x --depth-reps). Peak RSS is GNU "
             "time's %M of the conversion process.", "",
             "| layers | source MB | peak RSS (each run) | wall (each run) |", "|---:|---:|---:|---:|"]
    for n in (30, 60):
        lines.append(f"| {n} | {size[n] / 1e6:.0f} | {', '.join(f'{r / 2**20:.0f} MiB' for _, r in res[n])} | "
                     f"{', '.join(f'{t:.0f} s' for t, _ in res[n])} |")
    r30, r60 = (max(r for _, r in res[n]) for n in (30, 60))
    t30, t60 = (min(t for t, _ in res[n]) for n in (30, 60))
    lines += ["", f"60 / 30 layers: peak RSS {r60 / r30:.2f}x (the model is 2.0x), wall {t60 / t30:.2f}x."]
    args.depth_only.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def write_results(args, rows: list[dict]) -> None:
    cpu = platform.processor() or platform.machine()
    lines = ["# GPTQ: qstream `convert --calibrate` vs llm-compressor `oneshot` + `GPTQModifier`", "",
             f"Recorded by `benchmarks/bench_gptq.py` on {os.cpu_count()} CPU cores ({cpu}), CPU only, "
             "one run, every row side by side"
             + (f", both tools with OMP_NUM_THREADS={args.torch_threads}" if args.torch_threads else "") + ".", "",
             "SmolLM2-135M-Instruct (BF16, `tests/smollm2.py`), MLP linears only (attention, embeddings and "
             f"lm_head kept BF16). Calibration: the same {args.samples} x {args.seqlen} SmolLM2 tokens of "
             "tests/data/pride_and_prejudice.txt for both tools. Scored on the first "
             f"{rows[0]['tokens'] + rows[0]['tokens'] // (args.ctx - 1)} tokens of tests/data/alice_in_wonderland.txt "
             f"(a text neither saw) in {args.ctx}-token windows, {rows[0]['tokens']} predicted positions: "
             "KL(BF16 || quantized) over the full vocabulary in nats, every output decoded as "
             f"compressed-tensors decodes it. BF16 perplexity {rows[0]['ppl_src']:.3f}. Peak RSS and wall "
             "time: the conversion process (peak RSS: GNU time's %M; anonymous: the peak of its RssAnon, "
             "sampled every 20 ms, which leaves out the file-backed pages of its libraries). qstream ran with "
             + (f"a venv's python holding only `pip install .[calibrate]` ({args.qs_venv})" if args.qs_venv
                else "this process's python") + f", llm-compressor with {args.lc_venv}'s.", "",
             "| scheme | tool | method | KL mean | perplexity | top-1 agree | peak RSS | peak anonymous | wall |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['scheme']} | {r['tool']} | {r['how']} | {r['kl']:.4f} | {r['ppl']:.3f} | {r['top1']:.3f} "
                     f"| {r['rss'] / 2**20:.0f} MiB | {r['anon'] / 2**20:.0f} MiB | {r['seconds']:.0f} s |")
    for scheme in dict.fromkeys(r["scheme"] for r in rows):
        lc = next((r for r in rows if r["scheme"] == scheme and r["tool"] == "llm-compressor"), None)
        for r in rows:
            if lc is None or r["scheme"] != scheme or r["tool"] != "qstream" or "GPTQ" not in r["how"]:
                continue
            lines.append(f"\n{scheme}, {r['how']} against llm-compressor: KL {r['kl'] / lc['kl']:.3f}x "
                         f"({(1 - r['kl'] / lc['kl']) * 100:.1f} % lower), peak RSS {r['rss'] / lc['rss']:.2f}x, "
                         f"peak anonymous {r['anon'] / lc['anon']:.2f}x, wall {r['seconds'] / lc['seconds']:.2f}x.")
    deep = getattr(args, "deep_rows", None)
    if deep:
        lines += ["", "The same conversion of a 2x-deep SmolLM2 (60 decoder layers: each layer repeated, same widths "
                  "and tokenizer), same calibration tokens; peak RSS and wall of each tool, and the ratio to the "
                  "30-layer run above:", "",
                  "| scheme | tool | method | peak RSS, 60 layers | x 30 layers | wall, 60 layers | x 30 layers |",
                  "|---|---|---|---:|---:|---:|---:|"]
        for tool, scheme, how, secs, rss, anon in deep:
            b = next((r for r in rows if r["tool"] == tool and r["scheme"] == scheme and "GPTQ" in r["how"]), None)
            lines.append(f"| {scheme} | {tool} | {how} | {rss / 2**20:.0f} MiB (anonymous {anon / 2**20:.0f}) | "
                         f"{rss / b['rss']:.2f}x | {secs:.0f} s | {secs / b['seconds']:.2f}x |" if b else
                         f"| {scheme} | {tool} | {how} | {rss / 2**20:.0f} MiB (anonymous {anon / 2**20:.0f}) | | "
                         f"{secs:.0f} s | |")
    args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
