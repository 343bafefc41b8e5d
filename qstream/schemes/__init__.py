"""Number formats qstream writes, and what each adds to a checkpoint.

FP4 formats (``--mlp``) are :class:`Scheme` entries of :data:`SCHEMES`; FP8 output encodings
for attention (``--attn``) are :class:`~qstream.schemes.fp8.Fp8Output` entries of
:data:`ATTN_SCHEMES`, one module each. The FP4 math lives in :mod:`qstream.schemes.reference` (readable numpy spec, held
byte-exact to compressed-tensors by the tests) and
:mod:`qstream.schemes.kernels` (fused numba kernels, held byte-exact to the
reference).
"""

from __future__ import annotations

from dataclasses import dataclass

from . import fp8, fp8_block
from .fp8 import Fp8Output


@dataclass(frozen=True)
class Scheme:
    name: str  # CLI name
    group_size: int
    format: str  # compressed-tensors format name
    scale_dtype: str  # safetensors dtype of weight_scale
    has_global_scale: bool
    weights_args: dict
    description: str

    def outputs(self, module: str, shape: tuple[int, int]) -> list[tuple[str, str, tuple[int, ...]]]:
        """(name, safetensors dtype, shape) of every tensor written for one Linear."""
        out, inp = shape
        res = [
            (f"{module}.weight_packed", "U8", (out, inp // 2)),
            (f"{module}.weight_scale", self.scale_dtype, (out, inp // self.group_size)),
        ]
        if self.has_global_scale:
            res.append((f"{module}.weight_global_scale", "F32", (1,)))
        return res

    def quantize(self, k, x, global_scale, search: str):
        """(packed codes, block scales) of the float rows ``x`` with the kernels ``k``
        (:mod:`qstream.schemes.kernels`, or the reference's functions of the same names)."""
        if self.has_global_scale:
            return getattr(k, f"quantize_{self.name}")(x, global_scale, search=search)
        return getattr(k, f"quantize_{self.name}")(x, search=search)


MXFP4 = Scheme(
    name="mxfp4",
    group_size=32,
    format="mxfp4-pack-quantized",
    scale_dtype="U8",
    has_global_scale=False,
    weights_args={
        "num_bits": 4,
        "type": "float",
        "symmetric": True,
        "group_size": 32,
        "strategy": "group",
        "dynamic": False,
        "scale_dtype": "torch.uint8",
    },
    description="OCP microscaling FP4: E2M1 values, one power-of-two (E8M0) scale per 32 weights; "
    "4.25 bits per weight. Weight-only (W4A16).",
)

NVFP4 = Scheme(
    name="nvfp4",
    group_size=16,
    format="nvfp4-pack-quantized",
    scale_dtype="F8_E4M3",
    has_global_scale=True,
    weights_args={
        "num_bits": 4,
        "type": "float",
        "symmetric": True,
        "group_size": 16,
        "strategy": "tensor_group",
        "dynamic": False,
        "scale_dtype": "torch.float8_e4m3fn",
    },
    description="NVIDIA FP4: E2M1 values, one FP8 E4M3 scale per 16 weights and one FP32 global "
    "scale per tensor (shared by fused partners); 4.5 bits per weight. Weight-only (NVFP4A16).",
)

# compressed-tensors (and ModelOpt) decode FP4 weights to bfloat16: an output whose config.json
# says float16 or float32 fails at its first matmul in transformers (Half != BFloat16).
FP4_DTYPE = "bfloat16"

SCHEMES: dict[str, Scheme] = {s.name: s for s in (MXFP4, NVFP4)}

# FP8 output encodings for attention, by `--attn` name (each one module: fp8.py, fp8_block.py)
ATTN_SCHEMES: dict[str, Fp8Output] = {s.name: s for s in (fp8.FP8_DYNAMIC, fp8_block.FP8_BLOCK)}


def fp8_group_args(layout: str, block: tuple[int, int] | None = None, static_input: bool = False) -> dict:
    """compressed-tensors `weights` / `input_activations` args for an FP8 module.

    layout "tensor" + static_input: per-tensor static (Mistral FP8 sources, vLLM W8A8Fp8);
    "channel": FP8_DYNAMIC (per-channel weights, dynamic per-token activations);
    "block": FP8_BLOCK (128x128 weight blocks, dynamic per-group-128 activations);
    "tensor" without input scale: per-tensor weights, dynamic per-token activations.
    """
    w = {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None, "strategy": layout, "dynamic": False}
    if layout == "block":
        w["block_structure"] = list(block or (128, 128))
        a = {"num_bits": 8, "type": "float", "symmetric": True, "group_size": (block or (128, 128))[1],
             "strategy": "group", "dynamic": True}
    elif static_input:
        a = {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None, "strategy": "tensor",
             "dynamic": False}
    else:
        a = {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None, "strategy": "token",
             "dynamic": True}
    return {"weights": w, "input_activations": a, "format": "float-quantized"}
