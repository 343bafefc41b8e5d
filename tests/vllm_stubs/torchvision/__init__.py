"""Import-only stand-in for torchvision in the vLLM test venv.

transformers' Pixtral image processor (imported by vLLM's mistral3.py / pixtral.py
at module level) does ``from torchvision.transforms.v2 import functional``. PyPI's
torchvision wheels are CUDA builds that fail to import beside the CPU torch
2.13.0 wheel ("operator torchvision::nms does not exist"), and the tests never
process an image (``limit_mm_per_prompt={"image": 0}``). This package only lets
that import succeed: it has no distribution metadata (so transformers'
``is_torchvision_available()`` stays False) and any attribute use raises.
It is put on PYTHONPATH for the vLLM harness subprocess only.
"""

from torchvision._missing import Missing

__version__ = "0.0.0+standin"


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return Missing(name)
