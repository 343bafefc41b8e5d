"""Hub error messages: built from the exception alone, never by importing a module qstream
does not declare (a missing one would replace the user's real error by an ImportError)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

from qstream.errors import QStreamError

PKG = Path(__file__).resolve().parent.parent / "qstream"
DECLARED = {"safetensors", "numpy", "ml_dtypes", "huggingface_hub", "zstandard", "rich", "click", "numba",
            "llvmlite", "yaml"}  # yaml: pyyaml (the model card metadata); llvmlite: numba's own code generator, a required dependency of numba (kernels.py intrinsics)
# the `calibrate` extra (pyproject.toml), imported only by the modules behind `qstream eval` and `--calibrate`
_CALIBRATE = {"evaluate.py", "layerwise.py", "calibrate.py", "gptq.py", "calib_experts.py", "act_emulation.py"}
# compressed-tensors (also in the calibrate extra): the W4A4 activation emulation of `qstream eval`
OPTIONAL = {"torch": _CALIBRATE, "transformers": _CALIBRATE, "compressed_tensors": {"act_emulation.py"}}


def test_error_message_needs_no_undeclared_module(monkeypatch):
    """With httpx2 (huggingface_hub's HTTP client, not a qstream dependency) unimportable,
    an unexpected error still becomes one sentence naming the repo and the original error."""
    import huggingface_hub.errors  # noqa: F401 - a huggingface_hub whose client is some other module
    from qstream.sources.hub_source import _hub_error

    monkeypatch.setitem(sys.modules, "httpx2", None)  # `import httpx2` now raises ImportError
    e = _hub_error("reading the repo", RuntimeError("connection reset by peer"), "org/model")
    assert isinstance(e, QStreamError)
    assert "org/model" in str(e) and "connection reset by peer" in str(e)


def test_network_errors_are_still_recognised():
    """huggingface_hub's own transport errors (and plain socket errors) read as "cannot reach"."""
    httpx2 = pytest.importorskip("httpx2")
    from qstream.sources.hub_source import _hub_error

    for exc in (httpx2.ConnectError("refused"), httpx2.ConnectTimeout("slow"), ConnectionRefusedError(111, "refused"),
                TimeoutError("timed out")):
        msg = str(_hub_error("reading the repo", exc, "org/model"))
        assert "cannot reach" in msg and "HF_HUB_OFFLINE=1" in msg, (exc, msg)


def test_qstream_imports_only_declared_third_party_modules():
    std = set(sys.stdlib_module_names)
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
            for n in names:
                top = n.split(".")[0]
                if top not in std and top not in DECLARED and top != "qstream" and \
                        path.name not in OPTIONAL.get(top, ()):
                    bad.append(f"{path.relative_to(PKG.parent)}:{node.lineno} imports {n}")
    assert not bad, "imports of modules that pyproject.toml does not declare:\n" + "\n".join(bad)
