"""The static activation scale of NVFP4 W4A4 (``--activations nvfp4``), from a calibrated
input absmax, as each layout stores it (qstream/activations.py plans them)."""

from __future__ import annotations

import numpy as np

E4M3_MAX, FP4_MAX = 448.0, 6.0


def input_global_scale(amax: float) -> np.float32:
    """compressed-tensors ``input_global_scale`` = generate_gparam(-amax, amax) on a float32
    amax: ``2688 / amax`` as torch evaluates it (reciprocal, then times 2688), amax clamped to
    float32's tiny, a non-finite result 1 (reference.nvfp4_global_scale, the weights' rule)."""
    from .reference import nvfp4_global_scale

    return nvfp4_global_scale(np.float32(amax), np.float32)


def input_scale(amax: float) -> np.float32:
    """ModelOpt ``input_scale`` = amax.float() / (maxbound * 448) (maxbound 6 for E2M1)."""
    return np.float32(np.float32(amax) / np.float32(FP4_MAX * E4M3_MAX))
