"""qstream runs from a source checkout without being installed: only PYTHONPATH=<checkout>
(the family data files in formats/ are found next to the package), while an installed wheel
still carries them as qstream.formats (pyproject.toml)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from synth import llama_config, llama_tensors, write_checkpoint

REPO = Path(__file__).resolve().parent.parent

# drop an editable install's import hook (setuptools' __editable__ finder), so that only the
# checkout on PYTHONPATH can provide qstream and its data: as on a machine that never ran pip install
NO_INSTALL = ("import sys\n"
              "sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, '__module__', '').startswith('__editable__')]\n"
              "sys.path_hooks[:] = [h for h in sys.path_hooks if not getattr(h, '__module__', '').startswith('__editable__')]\n"
              "sys.path_importer_cache.clear()\n")


def test_convert_from_a_checkout_without_install(tmp_path):
    cfg = llama_config(hidden=64, inter=128, layers=1)
    src = write_checkpoint(tmp_path / "src", cfg, llama_tensors(cfg), n_shards=1)
    dst = tmp_path / "out"
    code = NO_INSTALL + (
        "import runpy\n"
        f"sys.argv = ['qstream', 'convert', {str(src)!r}, {str(dst)!r}, '--mlp', 'nvfp4', '-q']\n"
        "import qstream, qstream.roles\n"
        f"assert qstream.__file__.startswith({str(REPO)!r}), qstream.__file__\n"
        "runpy.run_module('qstream', run_name='__main__')\n")
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "PYTHONPATH": str(REPO), "COLUMNS": "200",
           "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-s", "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    qc = json.loads((dst / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "nvfp4-pack-quantized"


def test_wheel_still_packages_the_formats(tmp_path):
    """A wheel built from the checkout (a copy, so no build/ folder is left here) holds every
    formats/*.toml as qstream/formats/ and every qstream module."""
    import shutil
    import zipfile

    tree = tmp_path / "tree"
    tree.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, tree / name)
    for name in ("qstream", "formats"):
        shutil.copytree(REPO / name, tree / name, ignore=shutil.ignore_patterns("__pycache__", "*.nbi", "*.nbc"))
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                        str(tmp_path / "dist"), str(tree)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    (wheel,) = (tmp_path / "dist").glob("qstream_convert-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    want = {f"qstream/formats/{t.name}" for t in (REPO / "formats").glob("*.toml")}
    want |= {p.relative_to(REPO).as_posix() for p in (REPO / "qstream").rglob("*.py")}
    assert len(want) > 20 and want <= names, sorted(want - names)
