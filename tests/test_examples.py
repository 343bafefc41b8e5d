"""The examples are runnable scripts: run them."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow


def test_demo_smollm2(smollm2_checkpoint, tmp_path):
    out = tmp_path / "demo"
    out.mkdir()
    # reuse the test suite's cached BF16 build instead of rebuilding from the GGUF
    (out / smollm2_checkpoint.name).symlink_to(smollm2_checkpoint)
    p = subprocess.run([sys.executable, str(REPO / "examples" / "demo_smollm2.py"), "--out", str(out),
                        "--schemes", "nvfp4", "--tokens", "1024"], capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "nvfp4: perplexity" in p.stdout and "mean KL" in p.stdout
    assert (out / "smollm2-nvfp4" / "config.json").exists()
