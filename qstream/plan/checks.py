"""Checks of a plan's source and of its warnings, kept out of plan/plan.py: a source quantized
in a format qstream does not decode is refused, and per-tensor warnings are grouped."""

from __future__ import annotations

import re

from ..sources.checkpoint import Checkpoint
from ..errors import QStreamError
from ..schemes.fp8_block import BLOCK as FP8_BLOCK_SHAPE, FP8_BLOCK

# Quantized encodings qstream does not decode: copying them through would make a model that
# loads random-looking weights. (FP8, gpt-oss MXFP4 and ModelOpt NVFP4 are read; see above.)
_FOREIGN_TENSORS = (
    (re.compile(r"\.(qweight|qzeros|g_idx)$"), "GPTQ/AWQ (qweight/qzeros/scales)"),
    (re.compile(r"\.weight\.(absmax|quant_map|nested_absmax|quant_state\..*)$|\.SCB$|\.weight_format$"),
     "bitsandbytes"),
    (re.compile(r"\.weight_zero_point$"), "compressed-tensors integer (zero points)"),
    (re.compile(r"\.weight_packed$"), "compressed-tensors packed"),
)
READ_QUANT_METHODS = ("fp8", "mxfp4", "compressed-tensors", "modelopt")


def check_source_quantization(src: Checkpoint) -> None:
    """Refuse a source whose weights are quantized in a way qstream does not read."""
    qc = src.config.get("quantization_config")
    method = str(qc.get("quant_method", "")).lower() if isinstance(qc, dict) else ""
    cfg_fmt = str(qc.get("format", "")) if isinstance(qc, dict) else ""
    for rx, fmt in _FOREIGN_TENSORS:
        hit = next((n for n in src.tensors if rx.search(n)), None)
        if hit is not None:
            what = fmt + (f", quant_method {method}" if method else "") + (f", format {cfg_fmt}" if cfg_fmt else "")
            raise QStreamError(
                f"{src.root}: the source is already quantized ({what}: tensor {hit!r}); qstream does not "
                "decode that format and would copy it through unusable: convert from the original "
                "BF16/FP16/FP32 (or FP8) checkpoint instead.")
    if method and not method.startswith(READ_QUANT_METHODS):
        raise QStreamError(
            f"{src.root}/config.json: quantization_config says quant_method {method!r}, a format qstream does not "
            f"decode (it reads {', '.join(READ_QUANT_METHODS)} FP8 / MXFP4 / NVFP4 sources); convert from the "
            "original BF16/FP16/FP32 checkpoint instead.")
    if method == "compressed-tensors" and cfg_fmt and cfg_fmt not in ("float-quantized", "naive-quantized", "dense"):
        raise QStreamError(
            f"{src.root}/config.json: compressed-tensors format {cfg_fmt!r} is not one qstream decodes (it reads FP8 "
            "float-quantized sources); convert from the original BF16/FP16/FP32 checkpoint instead.")


def group_warnings(warnings: list[str]) -> list[str]:
    """One line per kind of warning: ``name: message`` lines with the same message (layer
    numbers aside) become ``N tensors (a, b, ... and M more): message``."""
    groups: dict[str, list[str]] = {}
    order: list[str] = []
    for w in warnings:
        name, sep, msg = w.partition(": ")
        key = msg if sep and " " not in name else w
        if key not in groups:
            order.append(key)
        groups.setdefault(key, []).append(name if sep and " " not in name else "")
    out = []
    for key in order:
        names = [n for n in groups[key] if n]
        if len(names) <= 1:
            out.append(f"{names[0]}: {key}" if names else key)
        else:
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            out.append(f"{len(names)} tensors ({shown}): {key}")
    return out


def unknown_family_warning(config: dict) -> str:
    from ..roles import _model_identity

    archs, types = _model_identity(config)
    what = ", ".join(archs + types) or "none given in config.json"
    return (f"architecture {what} is not one qstream knows (formats/*.toml); the generic name rules decide each "
            "tensor's role: check the plan with `qstream inspect`, or pass --recipe")


def unmatched_ignores(patterns: list[str], compiled: list[re.Pattern[str]], names) -> list[str]:
    return [f"--ignore {pat!r} matches no tensor of the source; check the pattern (`qstream inspect SRC --tensors` "
            "lists the names)" for pat, rx in zip(patterns, compiled) if not any(rx.search(n) for n in names)]


def check_something_quantized(src: Checkpoint, opts, ops: list, warnings: list[str]) -> None:
    """A plan that quantizes nothing is a copy: refused unless --mlp none asks for one."""
    if not any(op.quantized for op in ops) and opts.mlp != "none":
        why = next((w for w in warnings if "not a multiple" in w), warnings[-1] if warnings else "")
        raise QStreamError(
            f"{src.root}: nothing would be quantized with --mlp {opts.mlp}" + (f" ({why})" if why else "")
            + "; the output would be a copy of the source. Check the plan with `qstream inspect`, "
            "or pass --mlp none to copy on purpose.")


def oversized_tensors(ops: list, max_size: int) -> list[str]:
    big = [op for op in ops if op.bytes_out > max_size]
    if not big:
        return []
    worst = max(big, key=lambda op: op.bytes_out)
    return [f"--max-shard-size {max_size} B is smaller than {len(big)} tensor(s) (largest: {worst.source.name}, "
            f"{worst.bytes_out} B out); a tensor is never split, so those shards are larger than the limit"]


def unloadable_experts(family: str, ops: list, opts) -> list[str]:
    """gpt-oss experts quantized one by one in compressed-tensors (everything but ``--mlp mxfp4``
    weight-only, which is written in OpenAI's stacked layout: layouts/openai_mxfp4.py): no
    runtime loads that, so it is refused unless ``--allow-unloadable`` (then a warning)."""
    if family != "gpt_oss" or not any(op.view is not None and op.view.experts == 1 and op.quantized for op in ops):
        return []
    why = ("vLLM 0.32 cannot load it (its compressed-tensors and ModelOpt FP4 MoE methods have no expert biases) "
           "and transformers 5.23 leaves the experts unloaded (it fuses them into 3-D parameters "
           "compressed-tensors does not quantize); only compressed-tensors' per-module decompression reads it")
    if not opts.allow_unloadable:
        causes = [c for c, on in ((f"--mlp {opts.mlp}", opts.mlp != "mxfp4"), (f"--format {opts.format}", opts.format != "compressed-tensors"),
                                  (f"--attn {opts.attn}", opts.attn not in ("keep", "bf16")),
                                  (f"--activations {opts.activations}", opts.activations != "none"),
                                  ("--recipe", bool(opts.recipe))) if on]
        raise QStreamError(f"gpt-oss{' with ' + ' '.join(causes) if causes else ''}: the experts would be written one "
                           "by one in compressed-tensors, which neither vLLM 0.32 (its FP4 MoE methods have no expert "
                           "biases) nor transformers 5.23 (it fuses the experts unquantized) loads; use --mlp mxfp4 "
                           "alone (OpenAI's MXFP4 layout, which both load), or pass --allow-unloadable to write it "
                           "anyway.")
    return [f"--allow-unloadable: gpt-oss experts are written one by one in compressed-tensors: {why}."]


def runtime_warnings(family: str, ops: list, fused_key) -> list[str]:
    """What a runtime is known not to load, said at plan time (README, "What vLLM does").
    ``fused_key``: the family's fused-partner key of a tensor name (``Classifier.fused_key``)."""
    out = []
    # --attn fp8-block: vLLM fuses q/k/v (gate/up) into one GEMM, and its compressed-tensors FP8_BLOCK
    # layer wants every part of it in whole blocks (``validate_fp8_block_shape``: "output_partition_size
    # = N is not divisible by weight quantization block_n = 128"; only its native ``quant_method: fp8``
    # config lets partial blocks through). transformers and compressed-tensors load it either way.
    rows = FP8_BLOCK_SHAPE[0]
    odd = [op for op in ops if op.kind == "fp8" and op.scheme == FP8_BLOCK.name and op.shape[0] % rows
           and fused_key(op.source.name)]
    if odd:
        out.append(f"--attn fp8-block: {odd[0].source.name} has {odd[0].shape[0]} rows, not whole {rows}-row "
                   f"blocks ({len(odd)} such fused weight(s)), so vLLM 0.32 refuses to build the fused GEMM it "
                   "belongs to (transformers loads it); use --attn fp8 (per-channel FP8) for an output vLLM serves.")
    return out
