"""Which kernels run: the fused numba kernels, unless QSTREAM_KERNELS=reference asks for the
numpy spec or numba is not installed at all. A broken install is an error that says so, not a
silent switch to kernels that are ~100x slower."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def kernels_in_child(setup: str = "", env: dict | None = None, tmp: Path | None = None, pythonpath: str = "") -> subprocess.CompletedProcess:
    code = (f"import sys\n{setup}\n"
            "from qstream.convert import _kernels\n"
            "k = _kernels()\n"
            "print('KERNELS', getattr(k, '__name__', 'reference'))\n")
    e = {k: v for k, v in os.environ.items() if k != "QSTREAM_KERNELS"}
    e["PYTHONPATH"] = os.pathsep.join(p for p in (pythonpath, str(REPO)) if p)
    e.update(env or {})
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e, timeout=120)


def test_default_is_the_fused_kernels():
    r = kernels_in_child()
    assert r.returncode == 0 and "KERNELS qstream.schemes.kernels" in r.stdout, r.stderr


def test_reference_on_request():
    r = kernels_in_child(env={"QSTREAM_KERNELS": "reference"})
    assert r.returncode == 0 and "KERNELS reference" in r.stdout, r.stderr


def test_numba_not_installed_falls_back_with_a_warning():
    r = kernels_in_child("sys.modules['numba'] = None  # as if numba were not installed")
    assert r.returncode == 0 and "KERNELS reference" in r.stdout, r.stderr
    assert "numba is not installed" in r.stderr


def test_broken_kernel_import_is_an_error(tmp_path):
    """numba installed but its llvmlite broken: a clear error naming the cause and the way out."""
    fake = tmp_path / "shadow" / "llvmlite"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('libllvmlite.so: cannot open shared object file')\n")
    r = kernels_in_child(pythonpath=str(fake.parent))
    assert r.returncode != 0 and "KERNELS" not in r.stdout, r.stdout
    last = r.stderr.strip().splitlines()[-1]
    assert "QStreamError" in last and "libllvmlite.so" in last and "QSTREAM_KERNELS=reference" in last, r.stderr


def test_unknown_choice_is_an_error():
    r = kernels_in_child(env={"QSTREAM_KERNELS": "fast"})
    assert r.returncode != 0 and "QSTREAM_KERNELS" in r.stderr.strip().splitlines()[-1], r.stderr
