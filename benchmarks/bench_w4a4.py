#!/usr/bin/env python3
"""W4A4 outputs of SmolLM2-135M against its BF16 source: KL and perplexity, side by side.

    PYTHONPATH=. python benchmarks/bench_w4a4.py --out benchmarks/RESULTS-w4a4.md

For MXFP4 and NVFP4 (MLP linears only, qstream's default --scale-search mse): the
weight-only output and the W4A4 one (``--activations``; NVFP4 calibrated with
``--calibrate`` on the first CALIB_SAMPLES x CALIB_SEQLEN tokens of
tests/data/pride_and_prejudice.txt), each scored on a later, disjoint stretch of the same
text (tokens EVAL_START onwards, 1024-token windows) against the BF16 source.

How the outputs are run (tests/w4a4_reference.py): transformers + compressed-tensors decode
the weights (``CompressedTensorsConfig(dequantize=True)``); for W4A4 each FP4 Linear's input is
quantized and dequantized by compressed-tensors' own ``forward_quantize`` with the checkpoint's
``input_activations`` (and ``input_global_scale``), since transformers cannot run W4A4 FP4 on a
CPU (see that module). The ModelOpt W4A4 output holds the same weights and the same amax (its
``input_scale`` is amax / 2688 where CT's ``input_global_scale`` is 2688 / amax), so it is not
scored separately; tests/test_vllm.py checks that vLLM scores it as the CT output.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "examples"), str(REPO / "tests"), str(REPO / "benchmarks")]

CALIB_SAMPLES, CALIB_SEQLEN = 16, 256
EVAL_START, EVAL_TOKENS = 8192, 4096


def main() -> None:
    import torch

    import smollm2
    from bench_convert import machine, report
    from w4a4_reference import load_w4a4_reference

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/qbench-w4a4"))
    ap.add_argument("--cache", type=Path, default=REPO / ".cache")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    src = smollm2.cached_checkpoint(args.cache)
    text = REPO / "tests" / "data" / "pride_and_prejudice.txt"
    calib = ["--calibrate", str(text), "--calib-samples", str(CALIB_SAMPLES), "--calib-seqlen", str(CALIB_SEQLEN)]
    variants = {
        "mxfp4 (W4A16)": ["--mlp", "mxfp4"],
        "mxfp4 W4A4 (`--activations mxfp4`)": ["--mlp", "mxfp4", "--activations", "mxfp4"],
        "nvfp4 (W4A16)": ["--mlp", "nvfp4"],
        "nvfp4 W4A4 (`--activations nvfp4 --calibrate`)": ["--mlp", "nvfp4", "--activations", "nvfp4", *calib],
    }
    tok = smollm2.load_tokenizer(src)
    tokens = smollm2.eval_tokens(tok, EVAL_START + EVAL_TOKENS)[EVAL_START:]
    ref = smollm2.load_causal_lm(src)
    rows = []
    for k, (label, flags) in enumerate(variants.items()):
        dst = args.work / f"v{k}"
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "qstream", "convert", str(src), str(dst), *flags, "-q", "--overwrite"],
                       check=True, cwd=REPO)
        secs = time.perf_counter() - t0
        model = load_w4a4_reference(dst) if "--activations" in flags else smollm2.load_causal_lm(dst)
        with torch.inference_mode():
            r = smollm2.compare_models(ref, model, tokens, window=1024)
        rows.append((label, r, secs))
        print(label, r, f"{secs:.1f} s", flush=True)
        del model
    lines = [f"Machine: {machine()}", f"Run: {time.strftime('%Y-%m-%d %H:%M')}", "",
             f"SmolLM2-135M-Instruct (BF16), MLP linears only, qstream default `--scale-search mse`. NVFP4 W4A4 "
             f"calibrated on {CALIB_SAMPLES} x {CALIB_SEQLEN} tokens from the start of "
             f"tests/data/pride_and_prejudice.txt; all scored on its tokens {EVAL_START}-"
             f"{EVAL_START + int(tokens.numel())} ({int(tokens.numel())} tokens, 1024-token windows), full-vocabulary "
             "KL(BF16 || output) in nats. W4A4 activations: compressed-tensors' own quantize-dequantize "
             "(tests/w4a4_reference.py).", "",
             f"| output | mean KL | perplexity (BF16 {rows[0][1]['ppl_ref']:.3f}) | top-1 agreement | convert (s) |",
             "|---|---:|---:|---:|---:|"]
    for label, r, secs in rows:
        lines.append(f"| {label} | {r['mean_kl']:.4f} | {r['ppl_test']:.3f} | {r['top1_agreement']:.3f} | {secs:.1f} |")
    report(lines, args.out)


if __name__ == "__main__":
    main()
