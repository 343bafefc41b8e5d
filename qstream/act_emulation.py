"""W4A4 outputs run as their runtime runs them: the FP4 quantize-dequantize of each FP4
Linear's input, for ``qstream eval`` (and anything else that runs an output layer by layer).

A W4A4 checkpoint (``--activations mxfp4`` / ``nvfp4``) does not only hold FP4 weights: its
runtime rounds every input of those Linears to FP4 too, and the figures of such a model
must include that error. The quantize-dequantize here is compressed-tensors' own
``forward_quantize`` with the checkpoint's own arguments, nothing re-derived, run on the
float32 upcast of the bf16 input: vLLM's quantizers (``ref_nvfp4_quant``, the GPU kernels)
compute the block scale ``amax / 6`` in float32, where compressed-tensors given bf16 rounds
it to bf16 first (another FP8 block scale for about 1.4 % of SmolLM2's NVFP4 blocks); on
float32 the codes equal vLLM's (tests/w4a4_reference.py does the same):

* compressed-tensors: the FP4 config group's ``input_activations`` (MXFP4: dynamic group
  32, E8M0 scales; NVFP4: tensor_group 16 with FP8 block scales computed at run time
  against the static per-layer ``X.input_global_scale``, a divisor ``2688 / amax``);
* ModelOpt NVFP4 (``quant_algo: NVFP4``): ``X.input_scale``, a multiplier ``amax / 2688``:
  vLLM (modelopt.py, ``KNvfp4Dynamic``) uses ``1 / input_scale`` as the global scale, the
  same arithmetic as compressed-tensors' NVFP4 preset, which is what runs here.

compressed-tensors comes with the ``calibrate`` extra; only W4A4 outputs need it.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from .errors import QStreamError

FP4_FORMATS = ("mxfp4-pack-quantized", "nvfp4-pack-quantized")
# compressed-tensors' NVFP4 preset input_activations: what ModelOpt's NVFP4 input_scale means
NVFP4_INPUT_ARGS = {"num_bits": 4, "type": "float", "symmetric": True, "group_size": 16,
                    "strategy": "tensor_group", "dynamic": "local", "scale_dtype": "torch.float8_e4m3fn"}


def _matches(name: str, target: str) -> bool:
    """compressed-tensors' target matching for a Linear (``re:`` patterns match from the start)."""
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target == "Linear" or name == target or name.endswith("." + target)


def _ct_args(args: dict):
    try:
        from compressed_tensors.quantization import QuantizationArgs
    except ImportError as e:
        raise QStreamError("this output quantizes its activations (W4A4); running it needs compressed-tensors, "
                           "which emulates that: pip install 'qstream-convert[calibrate]'.") from e
    return QuantizationArgs(**args)


class InputQdq:
    """Which Linears of a checkpoint quantize their inputs, and how (none: weight-only)."""

    def __init__(self, config: dict, tensors: dict, read) -> None:
        """``tensors``: the checkpoint's tensor infos by name; ``read(name)`` -> numpy array."""
        self.specs: dict[str, tuple[object, float | None]] = {}  # module -> (QuantizationArgs, global scale)
        qc = config.get("quantization_config") or {}
        if qc.get("quant_method") == "compressed-tensors":
            groups = [g for g in (qc.get("config_groups") or {}).values()
                      if g.get("format") in FP4_FORMATS and g.get("input_activations")]
            if not groups:
                return
            ignore = qc.get("ignore") or []
            for w in tensors:
                if not w.endswith(".weight_packed"):
                    continue
                mod = w.removesuffix(".weight_packed")
                if any(_matches(mod, t) for t in ignore):
                    continue
                g = next((g for g in groups if any(_matches(mod, t) for t in g.get("targets") or [])), None)
                if g is None:
                    continue
                args = _ct_args(g["input_activations"])
                gs = None
                if args.strategy == "tensor_group":
                    if mod + ".input_global_scale" not in tensors:
                        raise QStreamError(f"{mod}: its config group quantizes NVFP4 activations, but the checkpoint "
                                           f"holds no {mod}.input_global_scale; the output is incomplete.")
                    gs = float(read(mod + ".input_global_scale").reshape(-1)[0])
                self.specs[mod] = (args, gs)
        elif qc.get("quant_method") == "modelopt" and qc.get("quant_algo") == "NVFP4":
            for w in tensors:
                if w.endswith(".input_scale") and w.removesuffix(".input_scale") + ".weight_scale_2" in tensors:
                    mod = w.removesuffix(".input_scale")
                    scale = read(w).astype("float32").reshape(-1)[0]
                    if not scale > 0:
                        raise QStreamError(f"{mod}.input_scale is {float(scale)!r}; a ModelOpt NVFP4 input scale "
                                           "must be positive, the output is damaged.")
                    self.specs[mod] = (_ct_args(NVFP4_INPUT_ARGS), float(1.0 / torch.tensor(scale)))

    def __bool__(self) -> bool:
        return bool(self.specs)

    def attach(self, module: nn.Module, name: str) -> int:
        """Hook the input QDQ onto every W4A4 Linear inside ``module`` (checkpoint name
        ``name``); refuses a W4A4 module it cannot reach (fused experts). Returns the count."""
        if not self.specs:
            return 0
        from compressed_tensors.quantization import QuantizationStatus
        from compressed_tensors.quantization.lifecycle.forward import forward_quantize

        hooked = set()
        for sub, m in module.named_modules():
            full = f"{name}.{sub}" if sub else name
            spec = self.specs.get(full)
            if spec is None or not isinstance(m, nn.Linear):
                continue
            args, gs = spec
            m.quantization_status = QuantizationStatus.FROZEN
            if gs is not None:
                p = next(m.parameters())
                m.input_global_scale = nn.Parameter(torch.tensor([gs], dtype=torch.float32, device=p.device),
                                                    requires_grad=False)

            def pre(mod, inputs, args=args):  # on the float32 upcast, as vLLM computes the block scales
                x = inputs[0]
                return (forward_quantize(mod, x.float(), "input", args).to(x.dtype),) + tuple(inputs[1:])

            m.register_forward_pre_hook(pre)
            hooked.add(full)
        missed = sorted(k for k in self.specs if k.startswith(name + ".") and k not in hooked)
        if missed:
            raise QStreamError(f"{missed[0]}: its activations are quantized (W4A4), but in this model it sits inside "
                               "a fused module (MoE experts) whose inputs qstream cannot reach to emulate that; "
                               "its figures would leave the activation error out, so qstream does not run it.")
        return len(hooked)
