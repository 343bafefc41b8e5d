"""The compressed-tensors reference for a W4A4 output: what its activations look like to a
runtime that quantizes them.

transformers 5.23 + compressed-tensors 0.20 cannot run a W4A4 FP4 checkpoint on the CPU as
it is: loaded compressed (the default) its Linears keep ``weight_packed`` and CT's quantized
forward fails at ``self.weight``; loaded with ``CompressedTensorsConfig(dequantize=True)``
(``smollm2.load_causal_lm``) the weights are decoded to dense bf16 and the modules lose their
quantization scheme, so the activations are NOT quantized (``input_global_scale`` is
reported unexpected and dropped). The reference here is that dense model plus, on every FP4
Linear, a forward pre-hook that quantizes and dequantizes its input with compressed-tensors'
own ``forward_quantize`` and the checkpoint's ``input_activations`` args (and, for NVFP4, its
``input_global_scale`` tensor): CT's decode of the weights and CT's own activation QDQ,
nothing written here. The QDQ runs on the float32 upcast of the bf16 input (cast back to
bf16 after), as vLLM's own NVFP4 emulation (``ref_nvfp4_quant``) and the FP4 GPU quantizers
compute the block scale: given a bf16 tensor, CT computes ``amax / 6`` in bf16 and rounds it
to 8 bits before the FP8 rounding, which on SmolLM2's MLP inputs as vLLM feeds them gives
another FP8 block scale for 1.4 % of the NVFP4 blocks (1.2 % of the activation codes); on
float32 its codes equal vLLM's exactly (MXFP4: equal either way, its scales are powers of 2).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open


def checkpoint_tensors(path: Path, suffix: str) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for n in st.keys():
                if n.endswith(suffix):
                    out[n.removesuffix(suffix)] = st.get_tensor(n)
    return out


def attach_input_qdq(model, path: Path) -> int:
    """Hook CT's input quantize-dequantize onto every FP4 Linear of ``model`` (loaded from the
    compressed-tensors W4A4 output ``path``); returns how many Linears were hooked."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationStatus
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize

    qc = json.loads((Path(path) / "config.json").read_text())["quantization_config"]
    groups = [g for g in qc["config_groups"].values() if g["format"] in ("mxfp4-pack-quantized", "nvfp4-pack-quantized")]
    assert len(groups) == 1 and groups[0]["input_activations"], qc["config_groups"]
    args = QuantizationArgs(**groups[0]["input_activations"])
    packed = checkpoint_tensors(path, ".weight_packed")
    igs = checkpoint_tensors(path, ".input_global_scale")
    n = 0
    for name, mod in model.named_modules():
        if name not in packed:
            continue
        mod.quantization_status = QuantizationStatus.FROZEN
        if name in igs:
            mod.input_global_scale = torch.nn.Parameter(igs[name], requires_grad=False)
        elif args.strategy == "tensor_group":
            raise AssertionError(f"{name}: NVFP4 W4A4 without input_global_scale")

        def pre(m, inputs, args=args):
            x = inputs[0]
            return (forward_quantize(m, x.float(), "input", args).to(x.dtype),) + tuple(inputs[1:])

        mod.register_forward_pre_hook(pre)
        n += 1
    return n


def load_w4a4_reference(path: Path):
    import smollm2

    model = smollm2.load_causal_lm(path)
    assert attach_input_qdq(model, path) > 0
    return model
