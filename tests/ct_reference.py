"""compressed-tensors 0.20 reference output for one Linear weight.

Mirrors llm-compressor 0.14 ``model_free_ptq`` (entrypoints/model_free/converter.py
``ModelFreePtqConverter._process_standard`` / ``_process_microscale``) using only
compressed-tensors code, because llm-compressor itself pins compressed-tensors 0.19
and cannot be installed next to 0.20:

1. ``initialize_quantized_linear``: a bias-free ``torch.nn.Linear`` in the weight's
   dtype, weight copied in, ``initialize_module_for_quantization(module, scheme,
   force_zero_point=False)`` (weight_scale is created in the WEIGHT dtype,
   weight_global_scale in float32).
2. The ``memoryless_minmax`` observer (llmcompressor/observers/min_max.py):
   ``flatten_for_calibration`` (observers/helpers.py ``_flatten_weight``: GROUP /
   TENSOR_GROUP -> ``value.unflatten(-1, (-1, group_size)).unsqueeze(0)``), then
   ``amin`` / ``amax`` over dims ``(0, -1)``, in the weight's own dtype.
3. ``Observer.get_global_scale`` (observers/base.py, TENSOR_GROUP only): absmax over
   this observer and every fused partner's statistics, then
   ``generate_gparam(-absmax, absmax)``.
4. ``calculate_qparams(min_vals, max_vals, args, global_scale)``; ``update_qparams``
   copies the results into the module's parameters (``update_offload_parameter`` ->
   ``param.copy_``, i.e. cast to the parameter's dtype).
5. ``compress_module(module)`` -> ``NVFP4PackedCompressor`` / ``MXFP4PackedCompressor``.

Decompression uses the compressor's own ``decompress``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from compressed_tensors.compressors import compress_module
from compressed_tensors.compressors.mxfp4.base import MXFP4PackedCompressor
from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
from compressed_tensors.offload import update_offload_parameter
from compressed_tensors.quantization import (
    QuantizationScheme,
    initialize_module_for_quantization,
    preset_name_to_scheme,
)
from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam

__all__ = [
    "NVFP4_PRESET",
    "MXFP4_PRESET",
    "observe_minmax",
    "observer_global_scale",
    "ct_nvfp4",
    "ct_mxfp4",
    "ct_decompress_nvfp4",
    "ct_decompress_mxfp4",
]

NVFP4_PRESET = "NVFP4A16"  # compressed_tensors/quantization/quant_scheme.py
MXFP4_PRESET = "MXFP4A16"


def _scheme(preset: str) -> QuantizationScheme:
    return preset_name_to_scheme(preset, ["Linear"])


def _linear(weight: torch.Tensor, scheme: QuantizationScheme) -> torch.nn.Linear:
    # llmcompressor/entrypoints/model_free/lifecycle.py initialize_quantized_linear
    out_features, in_features = weight.shape
    module = torch.nn.Linear(
        in_features, out_features, bias=False, device=weight.device, dtype=weight.dtype
    )
    module.weight.data.copy_(weight)
    initialize_module_for_quantization(module, scheme, force_zero_point=False)
    return module


def observe_minmax(weight: torch.Tensor, args) -> tuple[torch.Tensor, torch.Tensor]:
    """memoryless_minmax statistics of a weight, after flatten_for_calibration."""
    # observers/helpers.py _flatten_weight (GROUP / TENSOR_GROUP)
    observed = weight.unflatten(-1, (-1, args.group_size)).unsqueeze(0)
    # observers/min_max.py _get_min_max
    min_vals = torch.amin(observed, dim=(0, -1))
    max_vals = torch.amax(observed, dim=(0, -1))
    return min_vals, max_vals


def observer_global_scale(stats: Sequence[tuple[torch.Tensor, torch.Tensor]]):
    """observers/base.py Observer.get_global_scale over this + fused observers."""
    global_absmax = stats[0][1].max()
    for min_vals, max_vals in stats:
        global_absmax = torch.max(global_absmax, -min_vals.min())
        global_absmax = torch.max(global_absmax, max_vals.max())
    return generate_gparam(-global_absmax.reshape(1), global_absmax.reshape(1))


def _quantize_and_compress(
    weight: torch.Tensor, preset: str, partners: Sequence[torch.Tensor] = ()
) -> dict[str, torch.Tensor]:
    scheme = _scheme(preset)
    module = _linear(weight, scheme)
    args = module.quantization_scheme.weights

    min_vals, max_vals = observe_minmax(module.weight, args)
    global_scale = None
    if hasattr(module, "weight_global_scale"):
        stats = [(min_vals, max_vals)] + [observe_minmax(p, args) for p in partners]
        global_scale = observer_global_scale(stats)
    elif partners:
        raise ValueError(f"{preset} has no global scale to share with partners")

    scale, _zero_point = calculate_qparams(
        min_vals=min_vals,
        max_vals=max_vals,
        quantization_args=args,
        global_scale=global_scale,
    )
    # llmcompressor update_qparams: only existing params are updated (no zero point
    # param exists: force_zero_point=False and symmetric)
    update_offload_parameter(module, "weight_scale", scale)
    if global_scale is not None:
        update_offload_parameter(module, "weight_global_scale", global_scale)
    assert not hasattr(module, "weight_zero_point")

    compress_module(module)
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def ct_nvfp4(
    weight: torch.Tensor, partners: Sequence[torch.Tensor] = ()
) -> dict[str, torch.Tensor]:
    """{weight_packed uint8, weight_scale float8_e4m3fn, weight_global_scale f32[1]}.

    ``partners`` are the other members of the fused set (e.g. up_proj for
    gate_proj): they only contribute to the shared global scale.
    """
    out = _quantize_and_compress(weight, NVFP4_PRESET, partners)
    assert set(out) == {"weight_packed", "weight_scale", "weight_global_scale"}, out
    return out


def ct_mxfp4(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """{weight_packed uint8, weight_scale uint8 (biased E8M0)}."""
    out = _quantize_and_compress(weight, MXFP4_PRESET)
    assert set(out) == {"weight_packed", "weight_scale"}, out
    return out


def ct_decompress_nvfp4(
    weight_packed: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_global_scale: torch.Tensor,
) -> torch.Tensor:
    """NVFP4PackedCompressor.decompress -> weight (bfloat16, the library's choice)."""
    sd = {
        "weight_packed": weight_packed,
        "weight_scale": weight_scale,
        "weight_global_scale": weight_global_scale,
    }
    return NVFP4PackedCompressor.decompress(sd, _scheme(NVFP4_PRESET))["weight"]


def ct_decompress_mxfp4(
    weight_packed: torch.Tensor, weight_scale: torch.Tensor
) -> torch.Tensor:
    """MXFP4PackedCompressor.decompress -> weight (bfloat16, the library's choice)."""
    sd = {"weight_packed": weight_packed, "weight_scale": weight_scale}
    return MXFP4PackedCompressor.decompress(sd, _scheme(MXFP4_PRESET))["weight"]
