"""gpt-oss MXFP4 in OpenAI's own layout (``quant_method: mxfp4``), the layout both vLLM and
transformers load for gpt-oss.

Experts stay stacked per layer: ``experts.gate_up_proj_blocks`` uint8 [E, 2I, H/32, 16] and
``experts.gate_up_proj_scales`` uint8 [E, 2I, H/32] (output-major rows, gate/up interleaved as
gpt-oss has them), ``experts.down_proj_blocks`` [E, H, I/32, 16] / ``_scales`` [E, H, I/32], and
the biases ``experts.*_bias`` [E, out] as in the source. The codes and E8M0 scales of a row are
byte for byte what compressed-tensors' MXFP4 holds for that row (the same nibble order), so an
OpenAI MXFP4 source is copied as it is.

Why not compressed-tensors: vLLM 0.32's compressed-tensors FP4 MoE methods
(``CompressedTensorsW4A4Mxfp4MoEMethod``, ``CompressedTensorsW4A4Nvfp4MoEMethod``) register no
expert biases, so its gpt-oss loader has nowhere to put gpt-oss's ``w13_bias`` / ``w2_bias``
(KeyError); ``GptOssMxfp4MoEMethod`` (this layout) has them. transformers 5.23 fuses gpt-oss's
experts into 3-D parameters that compressed-tensors does not quantize, so it leaves per-expert
compressed-tensors experts unused (random experts); this layout it reads with its own MXFP4
integration (Mxfp4HfQuantizer, dequantized to BF16 where no MXFP4 kernel runs).

The layout quantizes only the experts; it is used for ``--mlp mxfp4`` weight-only outputs
whose other layers stay as they are (see :func:`applies`).
"""

from __future__ import annotations

from ..errors import QStreamError
from ..plan.ops import Copy, Op, OutTensor, Quantize, View

# OpenAI's own list (gpt-oss-20b / -120b config.json): what stays unquantized
MODULES_TO_NOT_CONVERT = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]


def applies(family, opts, recipe) -> bool:
    """gpt-oss, ``--mlp mxfp4``, the default format, weight-only, attention not made FP8, no recipe."""
    return (family.name == "gpt_oss" and opts.mlp == "mxfp4" and opts.format == "compressed-tensors"
            and opts.activations == "none" and opts.attn in ("keep", "bf16") and not opts.recipe)


def expert_ops(role: str, info, scales, prefix: str, kind: str, E: int, rows: int, in_dim: int,
               transpose: bool) -> list[Op]:
    """The ops writing one stacked expert tensor: an OpenAI MXFP4 source (``scales`` given) is
    copied; a float one [E, H, 2I] / [E, I, H] (``transpose``) is quantized row by row."""
    module = f"{prefix}.{kind}"
    if scales is not None:
        return [Copy(role, info, [OutTensor(info.name, info.dtype, info.shape)], module_scheme="mxfp4", out_module=module,
                     layout="openai"),
                Copy(role, scales, [OutTensor(scales.name, scales.dtype, scales.shape)], out_module=module)]
    if in_dim % 32:
        raise QStreamError(f"tensor {info.name!r} ({info.path.name}) has input dimension {in_dim}, not a multiple of "
                           "MXFP4's 32; gpt-oss experts cannot be written as MXFP4.")
    g = in_dim // 32
    outs = [OutTensor(f"{module}_blocks", "U8", (E, rows, g, 16)), OutTensor(f"{module}_scales", "U8", (E, rows, g))]
    return [Quantize(role, info, outs, scheme="mxfp4", view=View(0, transpose, 0, 1, rows, in_dim, experts=E),
                     out_module=module, module_scheme="mxfp4")]


def bias_op(role: str, bias) -> Op:
    return Copy(role, bias, [OutTensor(bias.name, bias.dtype, bias.shape)], out_module=bias.name.removesuffix("_bias"))


def quantization_config(src_config: dict, ops: list[Op]) -> dict:
    """OpenAI's ``quantization_config``; an FP8 or FP4 tensor outside the experts has no place in it."""
    other = [op for op in ops if op.quantized and not (op.out_module or "").endswith(("experts.gate_up_proj",
                                                                                       "experts.down_proj"))]
    if other:
        raise QStreamError(f"tensor {other[0].source.name!r} would be written quantized ({other[0].action}), but gpt-oss "
                           "MXFP4 is written in OpenAI's layout (quant_method mxfp4), which quantizes only the experts; "
                           "use --attn bf16 or --ignore it.")
    src = src_config.get("quantization_config") or {}
    keep = src.get("modules_to_not_convert") if src.get("quant_method") == "mxfp4" else None
    return {"modules_to_not_convert": list(keep or MODULES_TO_NOT_CONVERT), "quant_method": "mxfp4"}


def is_openai(qconfig: dict | None) -> bool:
    """Whether an output's quantization_config is this layout's."""
    return (qconfig or {}).get("quant_method") == "mxfp4"


CARD_REQUIREMENT = ("- **MXFP4, OpenAI's gpt-oss layout** (`quant_method: mxfp4`, the layout of the released gpt-oss "
                    "checkpoints): vLLM {v} loads it as `gpt_oss_mxfp4` (`GptOssMxfp4MoEMethod`, the experts with their "
                    "biases; attention, router, embeddings and lm_head unquantized), compute capability 8.0 or higher; "
                    "vLLM's MXFP4 MoE backend selection picks the kernel (FlashInfer / Triton where they run, the "
                    "Marlin MoE kernel otherwise). transformers reads it with its own MXFP4 integration (needs `accelerate`; MXFP4 "
                    "kernels on a GPU with `kernels` / Triton installed, else dequantized to BF16).")
CARD_NOTE = ("The `quantization_config` in config.json is OpenAI's gpt-oss MXFP4 (`quant_method: mxfp4`): the experts "
             "stacked per layer as `*_blocks` / `*_scales` (E8M0) with their `*_bias`, which vLLM and transformers read "
             "directly; each row's codes and scales are the bytes compressed-tensors' MXFP4 would hold for it.")
