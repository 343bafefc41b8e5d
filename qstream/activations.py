"""W4A4: FP4 activations (``--activations``) on top of FP4 weights. Data-free (no torch).

What each layout stores, as its runtimes read it (compressed-tensors 0.20
quantization/quant_scheme.py presets; vLLM 0.32 compressed_tensors_w4a4_nvfp4.py,
compressed_tensors_w4a4_mxfp4.py and modelopt.py; nvidia-modelopt 0.40
export/quant_utils.py, qtensor/nvfp4_tensor.py, export/convert_hf_config.py):

* ``mxfp4`` (compressed-tensors preset ``MXFP4``): the weights of ``--mlp mxfp4`` plus
  dynamic group-32 activations (E8M0 scale per 32 inputs, computed at run time): the
  config group's ``input_activations`` only, no tensor, no calibration.
* ``nvfp4``, compressed-tensors (preset ``NVFP4``): ``input_activations`` tensor_group,
  group 16, ``dynamic: "local"`` (the FP8 block scales are computed at run time, against a
  static per-layer global scale), and per quantized Linear ``X.input_global_scale``
  float32 [1], a DIVISOR like ``weight_global_scale``: ``448 * 6 / amax`` (CT
  ``generate_gparam``), ``amax`` the largest |input| seen in calibration. vLLM takes the
  max of the fused partners' values (q/k/v, gate/up) and warns when they differ: partners
  get the value of their largest amax, as they share one input.
* ``nvfp4``, ModelOpt (``quant_algo: NVFP4``): ``X.input_scale`` float32 0-d, a
  MULTIPLIER: ``amax / (6 * 448)`` (``NVFP4QTensor.get_activation_scaling_factor``,
  ``.squeeze()`` on export); fused partners share the max amax
  (``preprocess_linear_fusion``). The config group gains ``input_activations`` (the
  converted config ModelOpt's ``convert_hf_quant_config_format`` writes for NVFP4); vLLM
  routes a NVFP4 config without it to weight-only.

The input absmax per Linear comes from ``--calibrate``'s GPTQ pass itself
(:mod:`qstream.calibrate`: the hooks that accumulate each quantized Linear's Hessian also
record its max |input|), one pass over the model. Those inputs are what llm-compressor's
sequential pipeline observes: the decoder layers before L already quantized (weights; GPTQ
calibrates with quantization disabled, so activations are not fake-quantized), layer L
itself still the source's (llm-compressor modifiers/quantization/gptq/base.py
``on_start``: the input observers' calibration hooks, then ``disable_quantization``; each
subgraph's GPTQ weights are written back before the next one is calibrated). The plan is made once, before the pass, with the input-scale
tensors in it (shapes only); :func:`set_input_amax` gives the ops their values from the
pass's statistics before the converter writes them. ``Options.input_amax`` (statistics
given up front, part of the plan's identity) remains for the library API.
"""

from __future__ import annotations

import re

import numpy as np

from .errors import QStreamError
from .plan.ops import OutTensor
from .roles import EXPERT_LINEAR
from .schemes.act_scales import input_global_scale, input_scale  # noqa: F401  (the layouts' scale values)

ACTIVATIONS = ("none", "mxfp4", "nvfp4")

# compressed-tensors preset_name_to_scheme(...).input_activations.model_dump(mode="json")
INPUT_ARGS = {
    "mxfp4": {"num_bits": 4, "type": "float", "symmetric": True, "group_size": 32, "strategy": "group",
              "dynamic": True, "scale_dtype": "torch.uint8"},
    "nvfp4": {"num_bits": 4, "type": "float", "symmetric": True, "group_size": 16, "strategy": "tensor_group",
              "dynamic": "local", "scale_dtype": "torch.float8_e4m3fn", "observer": "static_minmax"},
}
CT_FORMATS = {"mxfp4": "mxfp4-pack-quantized", "nvfp4": "nvfp4-pack-quantized"}
# ModelOpt convert_hf_quant_config_format, quant_algo NVFP4 (group_size 16)
MODELOPT_INPUT_ARGS = {"dynamic": False, "num_bits": 4, "type": "float", "group_size": 16}


def check(opts, ops: list) -> None:
    """Refuse what no runtime reads: W4A4 needs every FP4 module in the activations' format."""
    act = opts.activations
    if act not in ACTIVATIONS:
        raise QStreamError(f"unknown --activations {act!r}; choose one of {', '.join(ACTIVATIONS)}.")
    if act == "none":
        if opts.input_amax:
            raise QStreamError("input statistics were given but --activations is none; pass --activations nvfp4 "
                               "to write them.")
        return
    fp4 = [op for op in ops if op.module_scheme in CT_FORMATS]
    if not fp4:
        raise QStreamError(f"--activations {act}: no Linear is quantized to FP4, so there is nothing to quantize "
                           f"the activations of; pass --mlp {act}.")
    other = next((op for op in fp4 if op.module_scheme != act), None)
    if other is not None:
        raise QStreamError(f"--activations {act} needs {act} weights, but {other.module} would be "
                           f"{other.module_scheme}; pass --mlp {act} (and the same scheme in a --recipe).")
    if act == "mxfp4" and opts.format == "modelopt":
        raise QStreamError("--activations mxfp4 has no ModelOpt layout; use --format compressed-tensors.")
    if act == "nvfp4" and not opts.input_amax and not opts.calibrate_label:
        raise QStreamError("--activations nvfp4 needs static activation scales from calibration; pass "
                           "--calibrate FILE (a UTF-8 text or .jsonl file), or use --activations mxfp4 (dynamic, "
                           "no data needed).")


def add_input_scales(ops: list, opts, scale_groups: dict[str, list[str]]) -> None:
    """NVFP4 W4A4: one ``input_global_scale`` output per quantized Linear (renamed
    ``input_scale`` by :func:`qstream.layouts.modelopt.apply_format`). Its value is set from
    ``opts.input_amax`` when given, else (``--calibrate``) by :func:`set_input_amax` from the
    GPTQ pass's statistics before the converter runs."""
    if opts.activations != "nvfp4":
        return
    amax = dict(opts.input_amax)
    for op in ops:
        if op.module_scheme != "nvfp4":
            continue
        if op.kind != "quantize":
            raise QStreamError(f"--activations nvfp4: {op.module} is NVFP4 in the source and is repacked; "
                               "qstream writes activation scales only for Linears it quantizes.")
        op.outputs.append(OutTensor(f"{op.module}.input_global_scale", "F32", (1,)))
        if amax:
            _assign(op, amax, scale_groups)


def set_input_amax(plan, amax: dict[str, float]) -> None:
    """Give every NVFP4 W4A4 op of ``plan`` its input absmax from the calibration statistics
    ``amax`` ({module: max |input|}, what the GPTQ pass recorded: :class:`qstream.calibrate.
    CalibratedWeights.input_absmax`; the converter calls it), refusing a Linear it has none of.
    Ops given their value by ``Options.input_amax`` keep it."""
    if plan.options.activations != "nvfp4":
        return
    for op in plan.ops:
        if op.module_scheme == "nvfp4" and op.kind == "quantize" and op.input_amax is None:
            _assign(op, amax, plan.scale_groups)


def _unrouted_expert_amax(module: str, amax: dict[str, float]) -> float | None:
    """A routed expert no calibration token reached has no input statistics of its own: it
    takes the largest recorded input absmax of the same projection of its layer's other
    experts. The router picks each expert's tokens from the same hidden states (gate/up), and
    the largest over the experts is the scale that clips none of them; None where no expert of
    that layer has any."""
    m = EXPERT_LINEAR.match(module)
    if m is None:
        return None
    pat = re.compile(re.escape(m["base"]) + r"\.\d+\." + re.escape(m["proj"]) + "$")
    seen = [v for k, v in amax.items() if pat.match(k)]
    return max(seen) if seen else None


def _assign(op, amax: dict[str, float], scale_groups: dict[str, list[str]]) -> None:
    members = scale_groups.get(op.scale_group, [op.module])
    own = {m: amax[m] if m in amax else _unrouted_expert_amax(m, amax) for m in members}
    missing = [m for m, v in own.items() if v is None]
    expert = EXPERT_LINEAR.match(missing[0]) if missing else None
    if expert:
        raise QStreamError(f"--activations nvfp4: the calibration routed no token to any expert of "
                           f"{expert['base']}, so it has no input statistics for {missing[0]}; "
                           "pass more --calibrate text (--calib-samples), --ignore that layer's experts, or use "
                           "--activations mxfp4 (dynamic, no calibration).")
    if missing:
        raise QStreamError(f"--activations nvfp4: the calibration recorded no input of {missing[0]}; the "
                           "calibration pass did not run that Linear; check that --calibrate's text reaches "
                           "it, or --ignore it.")
    bad = next((m for m, v in own.items() if not np.isfinite(v) or v < 0), None)
    if bad is not None:
        raise QStreamError(f"--activations nvfp4: the input absmax of {bad} is {own[bad]!r}; the calibration "
                           "produced non-finite activations, the source is damaged.")
    op.input_amax = max(own.values())  # q/k/v, gate/up share one input


def apply_ct_config(qconfig: dict | None, opts) -> None:
    """Give the FP4 groups of a compressed-tensors config their ``input_activations``."""
    if opts.activations == "none" or qconfig is None or "config_groups" not in qconfig:
        return
    for g in qconfig["config_groups"].values():
        if g.get("format") == CT_FORMATS[opts.activations]:
            g["input_activations"] = dict(INPUT_ARGS[opts.activations])


def card_line(opts) -> str | None:
    """What the model card says about the activations (None: weight-only)."""
    if opts.activations == "mxfp4":
        return ("Activations: MXFP4 too (W4A4), quantized at run time per 32 inputs (dynamic E8M0 scales); "
                "no calibration data was used.")
    if opts.activations == "nvfp4":
        where = "input_scale (ModelOpt)" if opts.format == "modelopt" else "input_global_scale"
        return (f"Activations: NVFP4 too (W4A4): FP8 block scales per 16 inputs computed at run time against a "
                f"static per-layer global scale ({where}) calibrated on {opts.calibrate_label or 'calibration text'}.")
    return None


def card_requirement(opts) -> str | None:
    """What vLLM 0.32 does with the W4A4 modules (kernels/linear/__init__.py's NVFP4 list, the
    CT W4A4 MXFP4 scheme's docstring)."""
    if opts.activations == "none":
        return None
    return (f"- **W4A4 ({opts.activations.upper()} activations)**: true FP4 x FP4 GEMMs (activations quantized at "
            "run time) on Blackwell data-center GPUs (SM 10.x) through FlashInfer / CUTLASS; on earlier GPUs vLLM "
            "falls back to the weight-only FP4 Marlin kernel (the activation scales are then unused, BF16 "
            "activations).")
