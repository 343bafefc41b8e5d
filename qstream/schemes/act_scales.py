"""The static activation scale of NVFP4 W4A4 (``--activations nvfp4``), from a calibrated
input absmax, as each layout stores it (qstream/activations.py plans them).

Both layouts derive their scale from ``recorded_amax(amax)``: the calibrated absmax raised
by 2**-12 (0.024 %), so that no activation sits on an FP4 rounding tie. The observed amax
is a bf16 value and so are the activations, so with the plain ``2688 / amax``
``x * g / s`` (s the FP8 block scale) is within one float32 ulp of an E2M1 rounding
boundary (0.25, 0.75, ..., 5) for about 0.2 % of the activations: which way each rounds
then depends on the order of each runtime's float operations (vLLM divides by
``s * (1 / g)``, compressed-tensors by ``s / g``) and on the one-ulp difference between the
layouts' ``2688 / amax`` and ``1 / (amax / 2688)``. Measured on SmolLM2 W4A4 in vLLM 0.32:
0.22 % of the activation codes differ between the compressed-tensors and the ModelOpt
output of the same weights, 0.03 nats of prompt NLL; with the raised amax, none, and the
two score the same to the last bit (tests/test_vllm.py)."""

from __future__ import annotations

import numpy as np

E4M3_MAX, FP4_MAX = 448.0, 6.0
AMAX_MARGIN = 2.0 ** -12  # moves every would-be tie 2**11 float32 ulps away from its boundary


def recorded_amax(amax: float) -> np.float32:
    """The absmax both layouts' input scales are computed from: ``amax * (1 + 2**-12)`` in float32."""
    return np.float32(np.float64(np.float32(amax)) * (1.0 + AMAX_MARGIN))


def input_global_scale(amax: float) -> np.float32:
    """compressed-tensors ``input_global_scale`` = generate_gparam(-a, a) of the float32
    ``a = recorded_amax(amax)``: ``2688 / a`` as torch evaluates it (reciprocal, then times
    2688), a clamped to float32's tiny, a non-finite result 1 (reference.nvfp4_global_scale,
    the weights' rule)."""
    from .reference import nvfp4_global_scale

    return nvfp4_global_scale(recorded_amax(amax), np.float32)


def input_scale(amax: float) -> np.float32:
    """ModelOpt ``input_scale`` = a.float() / (maxbound * 448) (maxbound 6 for E2M1), a =
    ``recorded_amax(amax)``."""
    return np.float32(recorded_amax(amax) / np.float32(FP4_MAX * E4M3_MAX))
