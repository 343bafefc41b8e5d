"""FP8 E4M3 source weights: each one found from the headers with the scales that describe it
(per tensor, per channel, or in blocks), in the transformers / Mistral (``weight_scale_inv``,
``activation_scale``), DeepSeek block and compressed-tensors (``weight_scale``, ``input_scale``)
layouts. The decoding math (E4M3 -> float, the scale applied) is
:func:`qstream.schemes.fp8.decode_fp8` / :func:`~qstream.schemes.fp8.apply_scale`."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import QStreamError
from ..safetensors_io import TensorInfo


@dataclass
class Fp8Weight:
    """An FP8 weight with the tensors that describe it in the source."""

    weight: TensorInfo
    scale: TensorInfo  # a multiplier: w = fp8 * scale (Mistral/DeepSeek name it weight_scale_inv)
    input_scale: TensorInfo | None
    layout: str  # "tensor" | "channel" | "block"
    block: tuple[int, int] | None


def _fp8_block_size(config: dict) -> tuple[int, int]:
    qc = config.get("quantization_config") or {}
    bs = qc.get("weight_block_size")
    if isinstance(bs, list) and len(bs) == 2:
        return int(bs[0]), int(bs[1])
    for g in (qc.get("config_groups") or {}).values():
        st = (g.get("weights") or {}).get("block_structure")
        if isinstance(st, list) and len(st) == 2:
            return int(st[0]), int(st[1])
    return 128, 128


def find_fp8_weights(tensors: dict[str, TensorInfo], config: dict) -> dict[str, Fp8Weight]:
    """FP8 E4M3 weights and their scales, in the transformers/Mistral (`weight_scale_inv`,
    `activation_scale`), DeepSeek block and compressed-tensors (`weight_scale`,
    `input_scale`) layouts."""
    out: dict[str, Fp8Weight] = {}
    block = _fp8_block_size(config)
    for name, info in tensors.items():
        if not name.endswith(".weight") or info.dtype != "F8_E4M3":
            continue
        mod = name.removesuffix(".weight")
        scale = tensors.get(mod + ".weight_scale_inv") or tensors.get(mod + ".weight_scale")
        if scale is None:
            raise QStreamError(
                f"tensor {name!r} ({info.path.name}) is FP8 but has no {mod}.weight_scale_inv or "
                f"{mod}.weight_scale beside it; the checkpoint is incomplete or in a layout qstream does not know."
            )
        if scale.dtype not in ("F32", "BF16", "F16"):
            raise QStreamError(f"tensor {scale.name!r} ({scale.path.name}) has dtype {scale.dtype}; FP8 scales must be F32, BF16 or F16.")
        inp = tensors.get(mod + ".activation_scale") or tensors.get(mod + ".input_scale")
        out_f, in_f = info.shape if len(info.shape) == 2 else (0, 0)
        if len(info.shape) != 2:
            raise QStreamError(f"tensor {name!r} ({info.path.name}) is FP8 with shape {list(info.shape)}; qstream reads 2-D FP8 weights only.")
        if scale.numel == 1:
            layout, blk = "tensor", None
        elif tuple(scale.shape) in ((out_f, 1), (out_f,)):
            layout, blk = "channel", None
        elif tuple(scale.shape) == (-(-out_f // block[0]), -(-in_f // block[1])):
            layout, blk = "block", block
        else:
            raise QStreamError(
                f"tensor {scale.name!r} ({scale.path.name}) has shape {list(scale.shape)}, which is neither "
                f"per-tensor, per-channel [{out_f}, 1] nor {block[0]}x{block[1]} blocks of {name!r} {list(info.shape)}."
            )
        out[name] = Fp8Weight(info, scale, inp, layout, blk)
    return out
