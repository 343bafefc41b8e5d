#!/usr/bin/env python3
"""`qstream eval` against loading both models whole in transformers: the figures and the
peak RSS of each, on SmolLM2-135M-Instruct, and the peak RSS of `qstream eval` on a
SmolLM2-shaped synthetic model with 30 and with 60 layers (it should not grow).

Each measurement runs in its own child process; its peak RSS is the child's
``ru_maxrss`` (os.wait4). "whole" loads the BF16 source with ``from_pretrained`` and the
output with compressed-tensors ``dequantize=True`` (examples/smollm2.py), runs each
window through both whole models and scores the final hidden states with the same code
(:func:`qstream.evaluate.score`, float32 logits a block of positions at a time), so the
two differ only in how the models are held. "import floor": a child that imports torch,
transformers and qstream.evaluate and does nothing else.

    python benchmarks/bench_eval.py --out benchmarks/RESULTS-eval.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "examples"))

TEXT = REPO / "tests" / "data" / "pride_and_prejudice.txt"
VARIANTS = [("nvfp4", "mse"), ("nvfp4", "none"), ("mxfp4", "mse"), ("mxfp4", "none")]


# --------------------------------------------------------------------------- children

def child(mode: str, dst: str, src: str, tokens: int, ctx: int) -> None:
    import torch

    from qstream.evaluate import evaluate, score, windows
    from qstream.layerwise import return_freed_memory

    return_freed_memory()  # as qstream eval does: both engines give freed memory back alike

    if mode == "floor":
        print(json.dumps({}))
        return
    if (Path(src) / "tokenizer.json").exists():
        import smollm2

        ids = smollm2.eval_tokens(smollm2.load_tokenizer(src), tokens)
    else:  # synthetic: fixed random ids
        ids = torch.randint(0, 49152, (tokens,), generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    if mode == "layerwise":
        r = evaluate(dst, src, ids, ctx=ctx, device="cpu")
    else:
        import smollm2
        from transformers import AutoModelForCausalLM

        with torch.inference_mode():
            models = [AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).eval(),
                      smollm2.load_causal_lm(dst)]
            wins = windows(ids, ctx)
            hs = [[m.model(input_ids=w.unsqueeze(0), use_cache=False).last_hidden_state for w in wins]
                  for m in models]
            r = score(wins, hs[0], hs[1], *(m.get_output_embeddings().weight for m in models))
    out = r.to_json()
    out["seconds"] = time.perf_counter() - t0
    print(json.dumps(out))


def measure_rss(mode: str, dst: Path, src: Path, tokens: int, ctx: int) -> dict:
    """Run one child; its JSON result with its peak RSS (wait4's ru_maxrss)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: exec the measurement with stdout on the pipe
        os.close(r)
        os.dup2(w, 1)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.environ["PYTHONPATH"] = str(REPO)
        os.execv(sys.executable, [sys.executable, __file__, "--child", mode, str(dst), str(src), str(tokens), str(ctx)])
    os.close(w)
    with os.fdopen(r) as f:
        out = f.read()
    _, status, ru = os.wait4(pid, 0)
    if status:
        raise RuntimeError(f"{mode} {dst} {src}: child failed (status {status}); run it with --child to see why")
    res = json.loads(out.strip().splitlines()[-1])
    res["peak_rss"] = ru.ru_maxrss * 1024
    return res


# --------------------------------------------------------------------------- parent

def convert_once(src: Path, dst: Path, mlp: str, search: str) -> Path:
    from qstream.convert import convert
    from qstream.plan.plan import Options, make_plan
    from qstream.sources.source import open_checkpoint

    if not (dst / "config.json").exists():
        convert(make_plan(open_checkpoint(src), Options(mlp=mlp, scale_search=search)), dst, threads=2)
    return dst


def synthetic(root: Path, layers: int) -> Path:
    from synth import llama_config, llama_tensors, write_checkpoint

    if not (root / "config.json").exists():
        cfg = llama_config(hidden=576, inter=1536, layers=layers, heads=9, kv_heads=3, vocab=49152, tie=True)
        write_checkpoint(root, cfg, llama_tensors(cfg), n_shards=2)
    return root


def mb(n: float) -> str:
    return f"{n / 1e6:.0f} MB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", nargs=5, metavar=("MODE", "DST", "SRC", "TOKENS", "CTX"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/qbench-eval"))
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--variants", nargs="+", default=[f"{m}:{s}" for m, s in VARIANTS])
    ap.add_argument("--deep-tokens", type=int, default=2048)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.child:
        mode, dst, src, tokens, ctx = args.child
        child(mode, dst, src, int(tokens), int(ctx))
        return
    import smollm2

    args.work.mkdir(parents=True, exist_ok=True)
    src = smollm2.cached_checkpoint(Path(os.environ.get("QSTREAM_TEST_CACHE", REPO / ".cache")))
    floor = measure_rss("floor", src, src, 2, 2)["peak_rss"]
    lines = ["# qstream eval: layer by layer against both models whole", "",
             f"Measured by `benchmarks/bench_eval.py` on {platform.node()} ({platform.machine()}, "
             f"{os.cpu_count()} cores, CPU), {date.today()}.", "",
             f"## SmolLM2-135M-Instruct (BF16 source, MLP quantized)", "",
             f"First {args.tokens} tokens of Pride and Prejudice (tests/data), {args.ctx}-token windows; "
             "KL(source || output) over the full vocabulary, in nats. `layerwise` is `qstream eval`, `whole` both "
             "models loaded whole in transformers, scored by the same code. Peak RSS of the process; "
             f"importing torch + transformers + qstream alone: {mb(floor)}.", "",
             "| scheme | --scale-search | engine | KL mean | KL median | KL p99 | ppl source | ppl output | top-1 | "
             "peak RSS | RSS above import | time |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    diffs = []
    for v in args.variants:
        mlp, search = v.split(":")
        dst = convert_once(src, args.work / f"smollm2-{mlp}-{search}", mlp, search)
        res = {e: measure_rss(e, dst, src, args.tokens, args.ctx) for e in ("layerwise", "whole")}
        for e, r in res.items():
            lines.append(f"| {mlp} | {search} | {e} | {r['kld_mean']:.5f} | {r['kld_median']:.5f} | "
                         f"{r['kld_p99']:.4f} | {r['ppl_source']:.4f} | {r['ppl_output']:.4f} | "
                         f"{r['top1_agree']:.4f} | {mb(r['peak_rss'])} | {mb(r['peak_rss'] - floor)} | "
                         f"{r['seconds']:.0f} s |")
        a, b = res["layerwise"], res["whole"]
        diffs.append((f"{mlp} {search}", {k: a[k] / b[k] - 1 for k in ("kld_mean", "kld_median", "kld_p99",
                                                                      "ppl_source", "ppl_output")},
                      a["peak_rss"] / b["peak_rss"], (a["peak_rss"] - floor) / (b["peak_rss"] - floor)))
        print("\n".join(lines[-2:]), flush=True)
    lines += ["", "Relative difference layerwise / whole - 1, and peak RSS layerwise / whole:", "",
              "| variant | KL mean | KL median | KL p99 | ppl source | ppl output | RSS ratio | RSS ratio above import |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, d, ratio, ratio2 in diffs:
        lines.append(f"| {name} | " + " | ".join(f"{d[k]:+.2e}" for k in ("kld_mean", "kld_median", "kld_p99",
                                                                          "ppl_source", "ppl_output"))
                     + f" | {ratio:.2f} | {ratio2:.2f} |")
    lines += ["", "## Depth: SmolLM2-shaped synthetic model (random BF16 weights, NVFP4 output)", "",
              f"{args.deep_tokens} random token ids, {args.ctx}-token windows, `qstream eval` (layerwise).", "",
              "| layers | source size | peak RSS | RSS above import | time |", "|---:|---:|---:|---:|---:|"]
    for layers in (30, 60):
        s = synthetic(args.work / f"synth-{layers}", layers)
        d = convert_once(s, args.work / f"synth-{layers}-nvfp4", "nvfp4", "mse")
        size = sum(p.stat().st_size for p in s.glob("*.safetensors"))
        r = measure_rss("layerwise", d, s, args.deep_tokens, args.ctx)
        lines.append(f"| {layers} | {mb(size)} | {mb(r['peak_rss'])} | {mb(r['peak_rss'] - floor)} | "
                     f"{r['seconds']:.0f} s |")
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
