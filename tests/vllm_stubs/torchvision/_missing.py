"""Placeholders returned for every name the stand-in is asked for."""


class Missing:
    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> "Missing":
        if attr.startswith("__"):
            raise AttributeError(attr)
        return Missing(f"{self._name}.{attr}")

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"torchvision.{self._name}: torchvision is not installed in the vLLM test venv "
                           "(import-only stand-in; the tests process no image)")

    def __repr__(self) -> str:
        return f"<torchvision stand-in {self._name}>"
