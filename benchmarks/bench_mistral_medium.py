#!/usr/bin/env python3
"""The size our users convert: a checkpoint with Mistral Medium 3.5's shapes and layout.

Generates ``Mistral3ForConditionalGeneration`` checkpoints in Mistral's FP8 release
layout -- language model hidden 12288, intermediate 28672, GQA 96/8 heads of 128,
vocab 131072, every decoder linear FP8 E4M3 per tensor with a 0-d ``weight_scale_inv``
and ``activation_scale``, BF16 norms, embeddings and lm_head, a Pixtral vision tower
(1024 wide, 24 layers) and the projector in BF16, 5 GB shards with an index -- with 4
and 8 decoder layers, converts each with ``qstream convert --mlp SCHEME`` (the default
scale search, FP8 attention kept), and records wall time, CPU time, peak RSS and
seconds per GB of source, side by side in one run. Then writes the full 88-layer
checkpoint as sparse files (real headers, holes for the data: 133 GB apparent, a few
MB on disk) and times ``qstream inspect`` on it (headers only).

    python benchmarks/bench_mistral_medium.py --work /tmp/mm --out benchmarks/RESULTS-mistral-medium.md

Weights are drawn from one seeded pool of E4M3 values (normal, std 1 before the cast,
so the scale search sees realistic spreads), tiled per tensor at a name-dependent offset.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
import zlib
from pathlib import Path

import ml_dtypes
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
from bench_convert import machine, report, run_timed, warm  # noqa: E402
from qstream.safetensors_io import build_header  # noqa: E402

HIDDEN, INTER, HEADS, KV, HEAD_DIM, VOCAB = 12288, 28672, 96, 8, 128, 131072
V_HIDDEN, V_INTER, V_LAYERS, V_HEADS, PATCH = 1024, 4096, 24, 16, 14
SHARD_BYTES = 5 * 10**9
FP8_WEIGHT_SCALE = 0.02 / 448 * 4  # the 0-d weight_scale_inv: fp8 * scale = weight


def config(layers: int) -> dict:
    return {
        "architectures": ["Mistral3ForConditionalGeneration"], "model_type": "mistral3",
        "text_config": {"model_type": "mistral", "hidden_size": HIDDEN, "intermediate_size": INTER,
                        "num_hidden_layers": layers, "num_attention_heads": HEADS, "num_key_value_heads": KV,
                        "head_dim": HEAD_DIM, "vocab_size": VOCAB, "max_position_embeddings": 131072,
                        "rms_norm_eps": 1e-5, "rope_theta": 1000000000.0},
        "vision_config": {"model_type": "pixtral", "hidden_size": V_HIDDEN, "intermediate_size": V_INTER,
                          "num_hidden_layers": V_LAYERS, "num_attention_heads": V_HEADS, "image_size": 1540,
                          "patch_size": PATCH, "head_dim": V_HIDDEN // V_HEADS},
        "spatial_merge_size": 2, "image_token_index": 10, "projector_hidden_act": "gelu",
        "multimodal_projector_bias": False, "vision_feature_layer": -1, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "quantization_config": {"quant_method": "fp8", "activation_scheme": "static", "weight_block_size": None,
                                "modules_to_not_convert": ["model.vision_tower", "model.multi_modal_projector", "lm_head"]},
    }


def tensors(layers: int) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, dtype, shape) in Mistral's order: vision tower, projector, language model."""
    out: list[tuple[str, str, tuple[int, ...]]] = []
    v = "model.vision_tower."
    out += [(v + "patch_conv.weight", "BF16", (V_HIDDEN, 3, PATCH, PATCH)), (v + "ln_pre.weight", "BF16", (V_HIDDEN,))]
    for i in range(V_LAYERS):
        p = f"{v}transformer.layers.{i}."
        out += [(p + "attention_norm.weight", "BF16", (V_HIDDEN,)), (p + "ffn_norm.weight", "BF16", (V_HIDDEN,))]
        out += [(p + f"attention.{n}_proj.weight", "BF16", (V_HIDDEN, V_HIDDEN)) for n in "qkvo"]
        out += [(p + "feed_forward.gate_proj.weight", "BF16", (V_INTER, V_HIDDEN)),
                (p + "feed_forward.up_proj.weight", "BF16", (V_INTER, V_HIDDEN)),
                (p + "feed_forward.down_proj.weight", "BF16", (V_HIDDEN, V_INTER))]
    m = "model.multi_modal_projector."
    out += [(m + "norm.weight", "BF16", (V_HIDDEN,)), (m + "patch_merger.merging_layer.weight", "BF16", (V_HIDDEN, 4 * V_HIDDEN)),
            (m + "linear_1.weight", "BF16", (HIDDEN, V_HIDDEN)), (m + "linear_2.weight", "BF16", (HIDDEN, HIDDEN))]
    lm = "model.language_model."
    out.append((lm + "embed_tokens.weight", "BF16", (VOCAB, HIDDEN)))
    for i in range(layers):
        p = f"{lm}layers.{i}."
        out += [(p + "input_layernorm.weight", "BF16", (HIDDEN,)), (p + "post_attention_layernorm.weight", "BF16", (HIDDEN,))]
        for name, shape in (("self_attn.q_proj", (HEADS * HEAD_DIM, HIDDEN)), ("self_attn.k_proj", (KV * HEAD_DIM, HIDDEN)),
                            ("self_attn.v_proj", (KV * HEAD_DIM, HIDDEN)), ("self_attn.o_proj", (HIDDEN, HEADS * HEAD_DIM)),
                            ("mlp.gate_proj", (INTER, HIDDEN)), ("mlp.up_proj", (INTER, HIDDEN)), ("mlp.down_proj", (HIDDEN, INTER))):
            out += [(p + name + ".weight", "F8_E4M3", shape), (p + name + ".weight_scale_inv", "F32", ()),
                    (p + name + ".activation_scale", "F32", ())]
    out += [(lm + "norm.weight", "BF16", (HIDDEN,)), ("lm_head.weight", "BF16", (VOCAB, HIDDEN))]
    return out


def _nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    return int(np.prod(shape, dtype=np.int64)) * {"BF16": 2, "F32": 4, "F8_E4M3": 1}[dtype]


def write(dst: Path, layers: int, sparse: bool = False) -> int:
    """Write the checkpoint; with ``sparse`` only the headers (the data are holes). Returns its size."""
    shards: list[list[tuple[str, str, tuple[int, ...]]]] = [[]]
    size = 0
    for t in tensors(layers):
        nb = _nbytes(t[1], t[2])
        if shards[-1] and size + nb > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += nb
    dst.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    pools = {"BF16": (rng.standard_normal(1 << 23, dtype=np.float32) * 0.02).astype(ml_dtypes.bfloat16).view(np.uint8),
             "F8_E4M3": (rng.standard_normal(1 << 24, dtype=np.float32) * 4).astype(ml_dtypes.float8_e4m3fn).view(np.uint8)}
    scalars = {"weight_scale_inv": np.float32(FP8_WEIGHT_SCALE), "activation_scale": np.float32(8.0 / 448.0)}
    weight_map, total, n = {}, 0, len(shards)
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        entries, off = [], 0
        for name, dtype, shape in shard:
            nb = _nbytes(dtype, shape)
            entries.append((name, dtype, shape, off, off + nb))
            off += nb
            weight_map[name] = fname
        header = build_header(entries, {"format": "pt"})
        total += off
        with open(dst / fname, "wb") as f:
            f.write(header)
            if sparse:
                f.truncate(len(header) + off)
                continue
            for name, dtype, shape in shard:
                nb = _nbytes(dtype, shape)
                if dtype == "F32":
                    f.write(scalars[name.rsplit(".", 1)[1]].tobytes())
                elif len(shape) == 1:
                    f.write(np.ones(shape, ml_dtypes.bfloat16).tobytes())
                else:
                    pool = pools[dtype]
                    pos, done = (zlib.crc32(name.encode()) & 0xFFFF) * 4096 % len(pool), 0
                    while done < nb:
                        m = min(nb - done, len(pool) - pos)
                        f.write(pool[pos:pos + m].data)
                        done += m
                        pos = 0
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    (dst / "config.json").write_text(json.dumps(config(layers), indent=1))
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/mm"))
    ap.add_argument("--layers", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--schemes", nargs="+", default=["nvfp4", "mxfp4"])
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    py = [sys.executable, "-m", "qstream"]
    rows = []
    for layers in args.layers:
        src = work / f"mm-{layers}l"
        if not (src / "config.json").exists():
            t0 = time.perf_counter()
            write(src, layers)
            print(f"wrote {src} in {time.perf_counter() - t0:.0f} s", flush=True)
        size = sum(f.stat().st_size for f in src.iterdir())
        for scheme in args.schemes:
            dst = work / "out"
            shutil.rmtree(dst, ignore_errors=True)
            warm(src)
            wall, rss, cpu = run_timed(py + ["convert", str(src), str(dst), "--mlp", scheme, "-q"])
            out_size = sum(f.stat().st_size for f in dst.iterdir() if f.is_file())
            rows.append((layers, scheme, size, out_size, wall, cpu, rss))
            print(rows[-1], flush=True)
            shutil.rmtree(dst, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(src, ignore_errors=True)
    full = work / "mm-88l-sparse"
    shutil.rmtree(full, ignore_errors=True)
    full_size = write(full, 88, sparse=True)
    on_disk = sum(f.stat().st_blocks * 512 for f in full.iterdir())
    subprocess.run(py + ["inspect", str(full)], capture_output=True, cwd="/", check=True)  # warm imports
    t_inspect = []
    for _ in range(3):
        t, rss_i, _ = run_timed(py + ["inspect", str(full)])
        t_inspect.append(t)
    shutil.rmtree(full, ignore_errors=True)

    lines = ["# Mistral Medium 3.5 shapes: 4 and 8 decoder layers, and inspect of all 88", "",
             f"Machine: {machine()}. `python benchmarks/bench_mistral_medium.py`, "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.", "",
             "FP8 per-tensor source (Mistral's release layout), `qstream convert --mlp SCHEME` (default scale search,",
             "FP8 attention kept), warm source cache, each run fsyncs its output. Peak RSS of the qstream process.", "",
             "| layers | scheme | source GB | output GB | wall (s) | CPU (s) | s per source GB | peak RSS |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for layers, scheme, size, out_size, wall, cpu, rss in rows:
        lines.append(f"| {layers} | {scheme} | {size / 1e9:.2f} | {out_size / 1e9:.2f} | {wall:.1f} | {cpu:.1f} | "
                     f"{wall / (size / 1e9):.2f} | {rss / 2**30:.2f} GiB |")
    lines += ["", "Ratios, 8 layers / 4 layers (flat memory: peak RSS ratio 1.0; linear time: s per GB ratio 1.0):", ""]
    for scheme in args.schemes:
        r = {ly: (w / (s / 1e9), m) for ly, sc, s, _, w, _, m in rows if sc == scheme}
        if len(r) >= 2:
            lo, hi = min(r), max(r)
            lines.append(f"- {scheme}: peak RSS {r[hi][1] / r[lo][1]:.2f}x, s per GB {r[hi][0] / r[lo][0]:.2f}x")
    lines += ["", "Per decoder layer (the difference between the two runs over the added layers: the embeddings, "
              "lm_head and vision tower are a fixed part, so whole-run s per GB rises with the layer count), and "
              "the 88-layer model on this machine by that line (fixed part + 88 x per layer):", ""]
    for scheme in args.schemes:
        r = {ly: (w, c, s) for ly, sc, s, _, w, c, _ in rows if sc == scheme}
        if len(r) >= 2:
            lo, hi = min(r), max(r)
            n = hi - lo
            wl, cl, gb = ((r[hi][k] - r[lo][k]) / n for k in range(3))
            fixed = r[lo][0] - lo * wl
            lines.append(f"- {scheme}: {wl:.1f} s wall, {cl:.1f} s CPU, {gb / 1e9:.2f} GB of source per layer "
                         f"({wl / (gb / 1e9):.2f} s per GB); fixed part {fixed:.1f} s; 88 layers: "
                         f"{(fixed + 88 * wl) / 60:.0f} min")
    lines += ["", f"`qstream inspect` of the 88-layer checkpoint ({full_size / 1e9:.1f} GB apparent, "
              f"{on_disk / 1e6:.1f} MB on disk: sparse shards with real headers): "
              f"{min(t_inspect):.2f} s best of 3 ({', '.join(f'{t:.2f}' for t in t_inspect)} s), whole process "
              f"including the Python start."]
    report(lines, args.out)


if __name__ == "__main__":
    main()
