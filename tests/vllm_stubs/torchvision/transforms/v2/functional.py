"""Import-only stand-in (see torchvision/__init__.py)."""

from torchvision._missing import Missing


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return Missing(name)
