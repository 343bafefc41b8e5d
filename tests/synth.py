"""Tiny synthetic checkpoints with real names and shapes, written by the tests."""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file


def llama_config(hidden=64, inter=128, layers=2, heads=4, kv_heads=2, vocab=256, tie=False) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "vocab_size": vocab,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": tie,
        "torch_dtype": "bfloat16",
        "hidden_act": "silu",
    }


def llama_tensors(cfg: dict, dtype=ml_dtypes.bfloat16, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * hd

    def w(*shape, scale=0.05):
        return (rng.standard_normal(shape) * scale).astype(dtype)

    t = {"model.embed_tokens.weight": w(v, h)}
    for L in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{L}."
        t[p + "input_layernorm.weight"] = np.ones(h, dtype)
        t[p + "post_attention_layernorm.weight"] = np.ones(h, dtype)
        t[p + "self_attn.q_proj.weight"] = w(h, h)
        t[p + "self_attn.k_proj.weight"] = w(kv, h)
        t[p + "self_attn.v_proj.weight"] = w(kv, h)
        t[p + "self_attn.o_proj.weight"] = w(h, h)
        t[p + "mlp.gate_proj.weight"] = w(i, h)
        t[p + "mlp.up_proj.weight"] = w(i, h)
        t[p + "mlp.down_proj.weight"] = w(h, i)
    t["model.norm.weight"] = np.ones(h, dtype)
    if not cfg.get("tie_word_embeddings"):
        t["lm_head.weight"] = w(v, h)
    return t


def write_checkpoint(root: Path, config: dict, tensors: dict[str, np.ndarray], n_shards: int = 2,
                     straddle: bool = True, extra_files: dict[str, str] | None = None) -> Path:
    """Write config.json, shards and index. With straddle, the first layer of each
    later shard has its q_proj and gate_proj moved into the previous shard."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(config, indent=2))
    names = list(tensors)
    per = -(-len(names) // n_shards)
    shards = [names[k * per:(k + 1) * per] for k in range(n_shards)]
    shards = [s for s in shards if s]
    if straddle:
        for k in range(1, len(shards)):
            import re
            layer = None
            for n in shards[k]:
                m = re.match(r"(.*\.layers\.\d+\.)", n)
                if m:
                    layer = m.group(1)
                    break
            if layer is None:
                continue
            for part in ("self_attn.q_proj.weight", "mlp.gate_proj.weight"):
                n = layer + part
                if n in shards[k]:
                    shards[k].remove(n)
                    shards[k - 1].append(n)
    total = len(shards)
    weight_map = {}
    size = 0
    for k, s in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{total:05d}.safetensors"
        save_file({n: np.ascontiguousarray(tensors[n]) for n in s}, str(root / fname), metadata={"format": "pt"})
        for n in s:
            weight_map[n] = fname
            size += tensors[n].nbytes
    (root / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": size}, "weight_map": weight_map}, indent=2))
    for name, text in (extra_files or {}).items():
        (root / name).write_text(text)
    return root
