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
        return _rand(rng, *shape, scale=scale, dtype=dtype)

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


# --------------------------------------------------------------------------- FP8 sources

def fp8_per_tensor(w: np.ndarray) -> tuple[np.ndarray, np.float32]:
    """Per-tensor FP8 E4M3 of a float32 weight, the way FP8 checkpoints are made."""
    scale = np.float32(np.abs(w).max() / 448.0)
    q = np.clip(w / scale, -448, 448).astype(ml_dtypes.float8_e4m3fn)
    return q, scale


def fp8_block(w: np.ndarray, b: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """128x128 block FP8 (DeepSeek-V3 style, partial edge blocks) of a float32 weight."""
    rows, cols = w.shape
    br, bc = -(-rows // b), -(-cols // b)
    scale = np.zeros((br, bc), np.float32)
    q = np.zeros(w.shape, ml_dtypes.float8_e4m3fn)
    for i in range(br):
        for j in range(bc):
            blk = w[i * b:(i + 1) * b, j * b:(j + 1) * b]
            s = np.float32(max(np.abs(blk).max(), 1e-12) / 448.0)
            scale[i, j] = s
            q[i * b:(i + 1) * b, j * b:(j + 1) * b] = np.clip(blk / s, -448, 448).astype(ml_dtypes.float8_e4m3fn)
    return q, scale


def dequant(q: np.ndarray, scale: np.ndarray, b: int = 128) -> np.ndarray:
    x = q.astype(np.float32)
    s = np.asarray(scale, np.float32)
    if s.size == 1:
        return x * s.reshape(-1)[0]
    return x * np.repeat(np.repeat(s, b, 0), b, 1)[: x.shape[0], : x.shape[1]]


def mistral3_config(fp8: bool = True, text: dict | None = None) -> dict:
    cfg = {
        "architectures": ["Mistral3ForConditionalGeneration"],
        "model_type": "mistral3",
        "text_config": {"model_type": "mistral", "hidden_size": 64, "intermediate_size": 128,
                        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                        "vocab_size": 256, "head_dim": 16, "max_position_embeddings": 256, "rms_norm_eps": 1e-5},
        "vision_config": {"model_type": "pixtral", "hidden_size": 32, "intermediate_size": 64,
                          "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 32,
                          "patch_size": 4, "head_dim": 16},
        "spatial_merge_size": 2,
        "image_token_index": 10,
        "projector_hidden_act": "gelu",
        "multimodal_projector_bias": False,
        "vision_feature_layer": -1,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }
    cfg["text_config"].update(text or {})
    if fp8:
        cfg["quantization_config"] = {
            "quant_method": "fp8", "activation_scheme": "static", "weight_block_size": None,
            "modules_to_not_convert": ["model.vision_tower", "model.multi_modal_projector", "lm_head"],
        }
    return cfg


def mistral3_tensors(seed: int = 0) -> dict[str, np.ndarray]:
    """float32 weights with the real Mistral3 (Pixtral vision) names and shapes."""
    rng = np.random.default_rng(seed)

    def w(*shape, scale=0.05):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    t = {"model.vision_tower.patch_conv.weight": w(32, 3, 4, 4), "model.vision_tower.ln_pre.weight": np.ones(32, np.float32)}
    v = "model.vision_tower.transformer.layers.0."
    t[v + "attention_norm.weight"] = np.ones(32, np.float32)
    t[v + "ffn_norm.weight"] = np.ones(32, np.float32)
    for p, s in (("feed_forward.gate_proj", (64, 32)), ("feed_forward.up_proj", (64, 32)), ("feed_forward.down_proj", (32, 64)),
                 ("attention.q_proj", (32, 32)), ("attention.k_proj", (32, 32)), ("attention.v_proj", (32, 32)), ("attention.o_proj", (32, 32))):
        t[v + p + ".weight"] = w(*s)
    t["model.multi_modal_projector.norm.weight"] = np.ones(32, np.float32)
    t["model.multi_modal_projector.patch_merger.merging_layer.weight"] = w(32, 128)
    t["model.multi_modal_projector.linear_1.weight"] = w(64, 32)
    t["model.multi_modal_projector.linear_2.weight"] = w(64, 64)
    t["model.language_model.embed_tokens.weight"] = w(256, 64, scale=0.5)
    for L in range(2):
        p = f"model.language_model.layers.{L}."
        for n, s in (("self_attn.q_proj", (64, 64)), ("self_attn.k_proj", (32, 64)), ("self_attn.v_proj", (32, 64)),
                     ("self_attn.o_proj", (64, 64)), ("mlp.gate_proj", (128, 64)), ("mlp.up_proj", (128, 64)),
                     ("mlp.down_proj", (64, 128))):
            t[p + n + ".weight"] = w(*s, scale=0.1)
        t[p + "input_layernorm.weight"] = np.ones(64, np.float32)
        t[p + "post_attention_layernorm.weight"] = np.ones(64, np.float32)
    t["model.language_model.norm.weight"] = np.ones(64, np.float32)
    t["lm_head.weight"] = w(256, 64, scale=0.1)
    return t


def write_mistral3_fp8(root: Path, twin: Path | None = None, seed: int = 0, text: dict | None = None) -> Path:
    """A Mistral3 checkpoint in Mistral's FP8 per-tensor static layout (language-model
    linears FP8 with `weight_scale_inv` and `activation_scale`, the rest BF16), and
    optionally its BF16 twin (FP8 weights dequantized) for reference logits."""
    f32 = mistral3_tensors(seed)
    out: dict[str, np.ndarray] = {}
    ref: dict[str, np.ndarray] = {}
    for name, w in f32.items():
        if name.startswith("model.language_model.layers.") and name.endswith("_proj.weight"):
            q, s = fp8_per_tensor(w)
            mod = name.removesuffix(".weight")
            out[name] = q
            out[mod + ".weight_scale_inv"] = np.asarray(s, np.float32)  # 0-d, as Mistral writes it
            out[mod + ".activation_scale"] = np.asarray(np.float32(8.0 / 448.0))
            ref[name] = dequant(q, s).astype(ml_dtypes.bfloat16)
        else:
            out[name] = w.astype(ml_dtypes.bfloat16)
            ref[name] = out[name]
    write_checkpoint(root, mistral3_config(fp8=True, text=text), out, n_shards=2, straddle=False)
    if twin is not None:
        write_checkpoint(twin, mistral3_config(fp8=False, text=text), ref, n_shards=1, straddle=False)
    return root


def qwen3_config(hidden=256, inter=320, layers=2, block_fp8=True) -> dict:
    cfg = {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 256, "max_position_embeddings": 256,
        "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    }
    if block_fp8:
        cfg["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128],
                                      "fmt": "e4m3"}
    return cfg


def write_qwen3_block_fp8(root: Path, twin: Path | None = None, seed: int = 1) -> Path:
    """Qwen3-FP8 / DeepSeek-V3 style: every decoder linear FP8 with a 128x128 block
    `weight_scale_inv`. The MLP's 320 leaves partial edge blocks; attention dimensions are
    multiples of 128 because compressed-tensors cannot decompress partial FP8 blocks on CPU."""
    cfg = qwen3_config()
    rng = np.random.default_rng(seed)
    h, i, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    out: dict[str, np.ndarray] = {}
    ref: dict[str, np.ndarray] = {}
    out["model.embed_tokens.weight"] = _rand(rng, 256, h, scale=0.5)
    for L in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{L}."
        for n, s in (("self_attn.q_proj", (4 * hd, h)), ("self_attn.k_proj", (2 * hd, h)), ("self_attn.v_proj", (2 * hd, h)),
                     ("self_attn.o_proj", (h, 4 * hd)), ("mlp.gate_proj", (i, h)), ("mlp.up_proj", (i, h)), ("mlp.down_proj", (h, i))):
            w = (rng.standard_normal(s) * 0.08).astype(np.float32)
            w[: min(5, s[0]), :7] *= 20  # uneven blocks: each block gets its own scale
            q, sc = fp8_block(w)
            out[p + n + ".weight"] = q
            out[p + n + ".weight_scale_inv"] = sc
            ref[p + n + ".weight"] = dequant(q, sc).astype(ml_dtypes.bfloat16)
        for n in ("input_layernorm", "post_attention_layernorm", "self_attn.q_norm", "self_attn.k_norm"):
            out[p + n + ".weight"] = np.ones(hd if "_norm" in n and "self_attn" in n else h, ml_dtypes.bfloat16)
    out["model.norm.weight"] = np.ones(h, ml_dtypes.bfloat16)
    out["lm_head.weight"] = _rand(rng, 256, h)
    for k, v in out.items():
        if not k.endswith("_scale_inv"):
            ref.setdefault(k, v)
    write_checkpoint(root, cfg, out, n_shards=2, straddle=True)
    if twin is not None:
        write_checkpoint(twin, qwen3_config(block_fp8=False), ref, n_shards=1, straddle=False)
    return root


# --------------------------------------------------------------------------- MoE

def _rand(rng, *shape, scale=0.08, dtype=ml_dtypes.bfloat16):
    """Normal weights in ``dtype``, rounded float64 -> float32 -> dtype: ml_dtypes < 0.7
    rounds float64 -> bfloat16 twice (through float32), 0.7 once, so a direct cast would make
    the fixtures (and the golden hashes) depend on the ml_dtypes version."""
    return (rng.standard_normal(shape) * scale).astype(np.float32).astype(dtype)


def _gqa_attention(t: dict, prefix: str, rng, h: int, hd: int) -> None:
    """q/k/v/o projections of a 4-head, 2-KV-head attention layer."""
    for n, s in (("self_attn.q_proj", (4 * hd, h)), ("self_attn.k_proj", (2 * hd, h)),
                 ("self_attn.v_proj", (2 * hd, h)), ("self_attn.o_proj", (h, 4 * hd))):
        t[prefix + n + ".weight"] = _rand(rng, *s)


def qwen3_moe_config(E=4, hidden=64, inter=64, layers=2) -> dict:
    return {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": hidden,
        "intermediate_size": 128, "moe_intermediate_size": inter, "num_hidden_layers": layers,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 256,
        "num_experts": E, "num_experts_per_tok": 2, "decoder_sparse_step": 1, "mlp_only_layers": [],
        "norm_topk_prob": True, "max_position_embeddings": 256, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    }


def qwen3_moe_tensors(cfg: dict, fused: bool = False, seed: int = 0) -> dict[str, np.ndarray]:
    """Qwen3-MoE weights; with fused, experts as transformers' 3-D gate_up_proj [E, 2I, H]
    and down_proj [E, H, I]."""
    rng = np.random.default_rng(seed)
    h, i, E, hd = cfg["hidden_size"], cfg["moe_intermediate_size"], cfg["num_experts"], cfg["head_dim"]
    t = {"model.embed_tokens.weight": _rand(rng, 256, h, scale=0.5)}
    for L in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{L}."
        _gqa_attention(t, p, rng, h, hd)
        t[p + "self_attn.q_norm.weight"] = np.ones(hd, ml_dtypes.bfloat16)
        t[p + "self_attn.k_norm.weight"] = np.ones(hd, ml_dtypes.bfloat16)
        t[p + "input_layernorm.weight"] = np.ones(h, ml_dtypes.bfloat16)
        t[p + "post_attention_layernorm.weight"] = np.ones(h, ml_dtypes.bfloat16)
        t[p + "mlp.gate.weight"] = _rand(rng, E, h, scale=0.3)
        gate = [_rand(rng, i, h) for _ in range(E)]
        up = [_rand(rng, i, h) for _ in range(E)]
        down = [_rand(rng, h, i) for _ in range(E)]
        for e in range(E):  # a few experts with very different magnitudes
            gate[e] = (gate[e].astype(np.float32) * (1 + 3 * e)).astype(ml_dtypes.bfloat16)
        if fused:
            t[p + "mlp.experts.gate_up_proj"] = np.stack([np.concatenate([gate[e], up[e]], 0) for e in range(E)])
            t[p + "mlp.experts.down_proj"] = np.stack(down)
        else:
            for e in range(E):
                t[p + f"mlp.experts.{e}.gate_proj.weight"] = gate[e]
                t[p + f"mlp.experts.{e}.up_proj.weight"] = up[e]
                t[p + f"mlp.experts.{e}.down_proj.weight"] = down[e]
    t["model.norm.weight"] = np.ones(h, ml_dtypes.bfloat16)
    t["lm_head.weight"] = _rand(rng, 256, h)
    return t


def mixtral_config(E=4, hidden=64, inter=96, layers=2) -> dict:
    return {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 256, "num_local_experts": E,
        "num_experts_per_tok": 2, "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    }


def mixtral_tensors(cfg: dict, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    h, i, E, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_local_experts"], cfg["head_dim"]
    t = {"model.embed_tokens.weight": _rand(rng, 256, h, scale=0.5)}
    for L in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{L}."
        _gqa_attention(t, p, rng, h, hd)
        t[p + "input_layernorm.weight"] = np.ones(h, ml_dtypes.bfloat16)
        t[p + "post_attention_layernorm.weight"] = np.ones(h, ml_dtypes.bfloat16)
        t[p + "block_sparse_moe.gate.weight"] = _rand(rng, E, h, scale=0.3)
        for e in range(E):
            t[p + f"block_sparse_moe.experts.{e}.w1.weight"] = _rand(rng, i, h, scale=0.05 * (e + 1))
            t[p + f"block_sparse_moe.experts.{e}.w3.weight"] = _rand(rng, i, h)
            t[p + f"block_sparse_moe.experts.{e}.w2.weight"] = _rand(rng, h, i)
    t["model.norm.weight"] = np.ones(h, ml_dtypes.bfloat16)
    t["lm_head.weight"] = _rand(rng, 256, h)
    return t


def mixtral_with_dead_expert(cfg: dict) -> dict:
    """Mixtral weights where layer 1's router never picks expert 3: hidden coordinate 0 is
    large and positive in every embedding (and stays so in the residual stream), and that
    expert's router row is strongly negative there."""
    t = mixtral_tensors(cfg)
    emb = t["model.embed_tokens.weight"].astype(np.float32)
    emb[:, 0] = 4.0
    t["model.embed_tokens.weight"] = emb.astype(t["model.embed_tokens.weight"].dtype)
    router = "model.layers.1.block_sparse_moe.gate.weight"
    gate = t[router].astype(np.float32)
    gate[3] = 0.0
    gate[3, 0] = -3.0
    t[router] = gate.astype(t[router].dtype)
    return t


def deepseek_v3_config(E=4, hidden=64, layers=2) -> dict:
    return {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "hidden_size": hidden,
        "intermediate_size": 128, "moe_intermediate_size": 32, "num_hidden_layers": layers,
        "first_k_dense_replace": 1, "n_routed_experts": E, "n_shared_experts": 1, "num_experts_per_tok": 2,
        "n_group": 1, "topk_group": 1, "routed_scaling_factor": 1.0, "norm_topk_prob": True,
        "num_attention_heads": 4, "num_key_value_heads": 4, "q_lora_rank": 32, "kv_lora_rank": 32,
        "qk_nope_head_dim": 16, "qk_rope_head_dim": 16, "v_head_dim": 16, "vocab_size": 256,
        "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "rope_scaling": None,
    }


def deepseek_v3_tensors(cfg: dict, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    h, E, mi = cfg["hidden_size"], cfg["n_routed_experts"], cfg["moe_intermediate_size"]
    nh, qk = cfg["num_attention_heads"], cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]
    t = {"model.embed_tokens.weight": _rand(rng, 256, h, scale=0.5)}
    for L in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{L}."
        t[p + "self_attn.q_a_proj.weight"] = _rand(rng, cfg["q_lora_rank"], h)
        t[p + "self_attn.q_a_layernorm.weight"] = np.ones(cfg["q_lora_rank"], ml_dtypes.bfloat16)
        t[p + "self_attn.q_b_proj.weight"] = _rand(rng, nh * qk, cfg["q_lora_rank"])
        t[p + "self_attn.kv_a_proj_with_mqa.weight"] = _rand(rng, cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"], h)
        t[p + "self_attn.kv_a_layernorm.weight"] = np.ones(cfg["kv_lora_rank"], ml_dtypes.bfloat16)
        t[p + "self_attn.kv_b_proj.weight"] = _rand(rng, nh * (cfg["qk_nope_head_dim"] + cfg["v_head_dim"]), cfg["kv_lora_rank"])
        t[p + "self_attn.o_proj.weight"] = _rand(rng, h, nh * cfg["v_head_dim"])
        t[p + "input_layernorm.weight"] = np.ones(h, ml_dtypes.bfloat16)
        t[p + "post_attention_layernorm.weight"] = np.ones(h, ml_dtypes.bfloat16)
        if L < cfg["first_k_dense_replace"]:
            t[p + "mlp.gate_proj.weight"] = _rand(rng, cfg["intermediate_size"], h)
            t[p + "mlp.up_proj.weight"] = _rand(rng, cfg["intermediate_size"], h)
            t[p + "mlp.down_proj.weight"] = _rand(rng, h, cfg["intermediate_size"])
        else:
            t[p + "mlp.gate.weight"] = _rand(rng, E, h, scale=0.3)
            t[p + "mlp.gate.e_score_correction_bias"] = (rng.standard_normal(E) * 0.1).astype(np.float32)
            for e in range(E):
                t[p + f"mlp.experts.{e}.gate_proj.weight"] = _rand(rng, mi, h)
                t[p + f"mlp.experts.{e}.up_proj.weight"] = _rand(rng, mi, h, scale=0.2)
                t[p + f"mlp.experts.{e}.down_proj.weight"] = _rand(rng, h, mi)
            t[p + "mlp.shared_experts.gate_proj.weight"] = _rand(rng, mi, h)
            t[p + "mlp.shared_experts.up_proj.weight"] = _rand(rng, mi, h)
            t[p + "mlp.shared_experts.down_proj.weight"] = _rand(rng, h, mi)
    t["model.norm.weight"] = np.ones(h, ml_dtypes.bfloat16)
    t["lm_head.weight"] = _rand(rng, 256, h)
    return t


def gpt_oss_config(E=4, hidden=64, inter=64, layers=2, mxfp4=False) -> dict:
    cfg = {
        "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 256, "num_local_experts": E,
        "num_experts_per_tok": 2, "experts_per_token": 2, "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5, "sliding_window": 128, "layer_types": ["sliding_attention", "full_attention"][:layers],
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "attention_bias": True,
        "rope_scaling": None, "swiglu_limit": 7.0,
    }
    if mxfp4:
        cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert":
                                      ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    return cfg


def gpt_oss_tensors(cfg: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """gpt-oss in BF16: experts gate_up_proj [E, H, 2I] (gate/up interleaved in the last
    axis), down_proj [E, I, H], biases, router."""
    rng = np.random.default_rng(seed)
    h, i, E, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_local_experts"], cfg["head_dim"]
    t = {"model.embed_tokens.weight": _rand(rng, 256, h, scale=0.5)}
    for L in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{L}."
        for n, s in (("q_proj", (4 * hd, h)), ("k_proj", (2 * hd, h)), ("v_proj", (2 * hd, h)), ("o_proj", (h, 4 * hd))):
            t[p + f"self_attn.{n}.weight"] = _rand(rng, *s)
            t[p + f"self_attn.{n}.bias"] = _rand(rng, s[0], scale=0.01)
        t[p + "self_attn.sinks"] = _rand(rng, 4, scale=0.1)
        t[p + "input_layernorm.weight"] = np.ones(h, ml_dtypes.bfloat16)
        t[p + "post_attention_layernorm.weight"] = np.ones(h, ml_dtypes.bfloat16)
        t[p + "mlp.router.weight"] = _rand(rng, E, h, scale=0.3)
        t[p + "mlp.router.bias"] = _rand(rng, E, scale=0.1)
        t[p + "mlp.experts.gate_up_proj"] = _rand(rng, E, h, 2 * i)
        t[p + "mlp.experts.gate_up_proj_bias"] = _rand(rng, E, 2 * i, scale=0.01)
        t[p + "mlp.experts.down_proj"] = _rand(rng, E, i, h)
        t[p + "mlp.experts.down_proj_bias"] = _rand(rng, E, h, scale=0.01)
    t["model.norm.weight"] = np.ones(h, ml_dtypes.bfloat16)
    t["lm_head.weight"] = _rand(rng, 256, h)
    return t


def gpt_oss_mxfp4_tensors(cfg: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """gpt-oss as released: experts as MXFP4 *_blocks uint8 [E, out, G, 16] and *_scales
    uint8 [E, out, G] (output-major; gate/up rows interleaved), random codes and exponents."""
    rng = np.random.default_rng(seed)
    t = gpt_oss_tensors(cfg, seed)
    h, i, E = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_local_experts"]
    for L in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{L}.mlp.experts."
        del t[p + "gate_up_proj"], t[p + "down_proj"]
        t[p + "gate_up_proj_blocks"] = rng.integers(0, 256, (E, 2 * i, h // 32, 16), dtype=np.uint8)
        t[p + "gate_up_proj_scales"] = rng.integers(118, 128, (E, 2 * i, h // 32), dtype=np.uint8)
        t[p + "down_proj_blocks"] = rng.integers(0, 256, (E, h, i // 32, 16), dtype=np.uint8)
        t[p + "down_proj_scales"] = rng.integers(118, 128, (E, h, i // 32), dtype=np.uint8)
    return t


# --------------------------------------------------------------------------- Gemma 3

def gemma3_text_config(hidden=64, inter=128, layers=2, heads=2, kv_heads=1, head_dim=32, vocab=256) -> dict:
    """Gemma 3 text: q/k norms, four norms per layer, GELU-tanh MLP, a sliding-window layer
    then a global one (as the real 5:1 pattern), embeddings tied to the output."""
    return {"model_type": "gemma3_text", "hidden_size": hidden, "intermediate_size": inter,
            "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
            "head_dim": head_dim, "vocab_size": vocab, "max_position_embeddings": 512, "rms_norm_eps": 1e-6,
            "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": head_dim, "sliding_window": 16,
            "layer_types": (["sliding_attention", "full_attention"] * layers)[:layers],
            "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0, "tie_word_embeddings": True,
            "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0, "torch_dtype": "bfloat16"}


def gemma3_config(multimodal: bool = False) -> dict:
    text = gemma3_text_config()
    if not multimodal:
        return {"architectures": ["Gemma3ForCausalLM"], **text}
    return {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3", "text_config": text,
            # SigLIP as Gemma 3 uses it (no pooling head); 28 / 14: 2 x 2 patches, pooled to 1 token
            "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                              "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 28, "patch_size": 14,
                              "vision_use_head": False, "layer_norm_eps": 1e-6},
            "mm_tokens_per_image": 1, "boi_token_index": 11, "eoi_token_index": 12, "image_token_index": 10,
            "tie_word_embeddings": True, "torch_dtype": "bfloat16"}


def gemma3_tensors(cfg: dict, names: str = "hub", seed: int = 0) -> dict[str, np.ndarray]:
    """BF16 weights with Gemma 3's real names. Multimodal ``names``: "hub" as google/gemma-3-*-it
    hold them (``language_model.model.``, ``vision_tower.vision_model.``), "v4.52" as
    transformers >= 4.52 saves them (``model.language_model.``, ``model.vision_tower.``, the
    prefixes vLLM's hf_to_vllm_mapper renames)."""
    rng = np.random.default_rng(seed)
    mm = "text_config" in cfg
    tc = cfg["text_config"] if mm else cfg
    h, i, v, hd = tc["hidden_size"], tc["intermediate_size"], tc["vocab_size"], tc["head_dim"]
    q, kv = tc["num_attention_heads"] * hd, tc["num_key_value_heads"] * hd
    lm = ("language_model.model." if names == "hub" else "model.language_model.") if mm else "model."
    t = {lm + "embed_tokens.weight": _rand(rng, v, h, scale=0.5)}
    for L in range(tc["num_hidden_layers"]):
        p = f"{lm}layers.{L}."
        for n, s in (("self_attn.q_proj", (q, h)), ("self_attn.k_proj", (kv, h)), ("self_attn.v_proj", (kv, h)),
                     ("self_attn.o_proj", (h, q)), ("mlp.gate_proj", (i, h)), ("mlp.up_proj", (i, h)),
                     ("mlp.down_proj", (h, i))):
            t[p + n + ".weight"] = _rand(rng, *s, scale=0.1)
        for n in ("self_attn.q_norm", "self_attn.k_norm"):  # Gemma norms scale by 1 + w
            t[p + n + ".weight"] = _rand(rng, hd, scale=0.1)
        for n in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"):
            t[p + n + ".weight"] = _rand(rng, h, scale=0.1)
    t[lm + "norm.weight"] = _rand(rng, h, scale=0.1)
    if not mm:
        return t
    vc = cfg["vision_config"]
    vh, vi, ps = vc["hidden_size"], vc["intermediate_size"], vc["patch_size"]
    vt = "vision_tower.vision_model." if names == "hub" else "model.vision_tower.vision_model."
    t[vt + "embeddings.patch_embedding.weight"] = _rand(rng, vh, 3, ps, ps, scale=0.02)
    t[vt + "embeddings.patch_embedding.bias"] = _rand(rng, vh, scale=0.02)
    t[vt + "embeddings.position_embedding.weight"] = _rand(rng, (vc["image_size"] // ps) ** 2, vh, scale=0.02)
    for L in range(vc["num_hidden_layers"]):
        p = f"{vt}encoder.layers.{L}."
        for n, s in (("self_attn.q_proj", (vh, vh)), ("self_attn.k_proj", (vh, vh)), ("self_attn.v_proj", (vh, vh)),
                     ("self_attn.out_proj", (vh, vh)), ("mlp.fc1", (vi, vh)), ("mlp.fc2", (vh, vi))):
            t[p + n + ".weight"] = _rand(rng, *s)
            t[p + n + ".bias"] = _rand(rng, s[0], scale=0.02)
        for n in ("layer_norm1", "layer_norm2"):
            t[p + n + ".weight"] = np.ones(vh, ml_dtypes.bfloat16)
            t[p + n + ".bias"] = np.zeros(vh, ml_dtypes.bfloat16)
    t[vt + "post_layernorm.weight"] = np.ones(vh, ml_dtypes.bfloat16)
    t[vt + "post_layernorm.bias"] = np.zeros(vh, ml_dtypes.bfloat16)
    mp = "multi_modal_projector." if names == "hub" else "model.multi_modal_projector."
    t[mp + "mm_input_projection_weight"] = _rand(rng, vh, h)  # a bare parameter, not a Linear
    t[mp + "mm_soft_emb_norm.weight"] = _rand(rng, vh, scale=0.1)
    return t


def byte_tokenizer(folder: Path) -> Path:
    """A byte-level tokenizer of 256 ids (the fixtures' vocabulary), no merges: what
    ``--calibrate`` needs in a synthetic source."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    return folder
