#!/usr/bin/env python3
"""Write a synthetic Llama-shaped BF16 checkpoint of about --size-gb GB.

Real names and shapes (hidden 2560, intermediate 6912, GQA 20/4 heads, vocab
32000), random normal weights (std 0.02) drawn from one seeded pool, 2 GB
shards with an index, written tensor by tensor (memory stays small).

    python benchmarks/make_synthetic.py /tmp/synth-4g --size-gb 4
"""

from __future__ import annotations

import argparse
import json
import zlib
import sys
from pathlib import Path

import ml_dtypes
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from qstream.safetensors_io import build_header  # noqa: E402

HIDDEN, INTER, HEADS, KV_HEADS, VOCAB = 2560, 6912, 20, 4, 32000


def layer_shapes(L: int) -> list[tuple[str, tuple[int, ...]]]:
    hd = HIDDEN // HEADS
    p = f"model.layers.{L}."
    return [
        (p + "input_layernorm.weight", (HIDDEN,)),
        (p + "self_attn.q_proj.weight", (HIDDEN, HIDDEN)),
        (p + "self_attn.k_proj.weight", (KV_HEADS * hd, HIDDEN)),
        (p + "self_attn.v_proj.weight", (KV_HEADS * hd, HIDDEN)),
        (p + "self_attn.o_proj.weight", (HIDDEN, HIDDEN)),
        (p + "post_attention_layernorm.weight", (HIDDEN,)),
        (p + "mlp.gate_proj.weight", (INTER, HIDDEN)),
        (p + "mlp.up_proj.weight", (INTER, HIDDEN)),
        (p + "mlp.down_proj.weight", (HIDDEN, INTER)),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dst", type=Path)
    ap.add_argument("--size-gb", type=float, default=4.0)
    ap.add_argument("--shard-gb", type=float, default=2.0)
    args = ap.parse_args()

    per_layer = sum(np.prod(s) for _, s in layer_shapes(0)) * 2
    fixed = 2 * VOCAB * HIDDEN * 2 + HIDDEN * 2
    layers = max(1, int(round((args.size_gb * 1e9 - fixed) / per_layer)))
    tensors = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    for L in range(layers):
        tensors += layer_shapes(L)
    tensors += [("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (VOCAB, HIDDEN))]

    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in tensors:
        nb = int(np.prod(shape)) * 2
        if shards[-1] and size + nb > args.shard_gb * 1e9:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nb

    args.dst.mkdir(parents=True, exist_ok=True)
    pool = (np.random.default_rng(0).standard_normal(1 << 24, dtype=np.float32) * 0.02).astype(ml_dtypes.bfloat16)
    ones = np.ones(HIDDEN, ml_dtypes.bfloat16)
    weight_map, total = {}, 0
    n = len(shards)
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        entries, off = [], 0
        for name, shape in shard:
            nb = int(np.prod(shape)) * 2
            entries.append((name, "BF16", shape, off, off + nb))
            off += nb
        with open(args.dst / fname, "wb") as f:
            f.write(build_header(entries, {"format": "pt"}))
            for i, (name, shape) in enumerate(shard):
                count = int(np.prod(shape))
                if len(shape) == 1:
                    f.write(ones.tobytes())
                else:
                    start = (zlib.crc32(name.encode()) & 0xFFFF) * 97
                    done = 0
                    while done < count:
                        s = (start + done) % len(pool)
                        m = min(count - done, len(pool) - s)
                        f.write(pool[s:s + m].tobytes())
                        done += m
                weight_map[name] = fname
                total += count * 2
    (args.dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    (args.dst / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
        "intermediate_size": INTER, "num_hidden_layers": layers, "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS, "vocab_size": VOCAB, "torch_dtype": "bfloat16",
        "tie_word_embeddings": False, "rms_norm_eps": 1e-5, "max_position_embeddings": 4096,
    }, indent=1))
    print(f"{args.dst}: {layers} layers, {n} shards, {total / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
