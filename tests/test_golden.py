"""Golden outputs: the SHA-256 of every file qstream writes, for a matrix of
family fixture x scheme x layout x scale-search mode, so that a refactoring that
changes a single output byte anywhere fails here and says which file of which cell.

Each cell converts a tiny deterministic fixture (fixed seeds, fixed folder names) in
process and hashes every output file: each shard, the index, config.json,
hf_quant_config.json (ModelOpt), the copied side files and the model card
(README.md). The staging folder (``STAGING_DIR``, holding the journal) is left out (it holds timings and
is not output). The card records the command line; in process qstream records none,
so each cell sets a fixed one (``plan.command``) and the card is fully deterministic:
no path and no time in it. A cell that qstream refuses (an invalid combination, e.g.
ModelOpt output keeping FP8 attention) records its one-line error instead, with the
fixture folder spelled ``<ROOT>``.

When an output changes on purpose, regenerate the hashes and commit them with the change:

    QSTREAM_UPDATE_GOLDEN=1 python -m pytest tests/test_golden.py

and review the diff of tests/golden_hashes.json: it names every file that changed.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from synth import (deepseek_v3_config, deepseek_v3_tensors, gemma3_config, gemma3_tensors, gpt_oss_config,
                   gpt_oss_mxfp4_tensors, gpt_oss_tensors,
                   llama_config, llama_tensors, mixtral_config, mixtral_tensors, qwen3_moe_config, qwen3_moe_tensors,
                   write_checkpoint, write_mistral3_fp8, write_qwen3_block_fp8)
from qstream.convert import Executor
from qstream.errors import QStreamError
from qstream.plan.plan import Options, make_plan
from qstream.sources.source import open_checkpoint
from qstream.writer import STAGING_DIR, prepare_dst

GOLDEN = Path(__file__).with_name("golden_hashes.json")
UPDATE = os.environ.get("QSTREAM_UPDATE_GOLDEN") == "1"

SIDE_FILES = {"tokenizer_config.json": '{"model_max_length": 256}', "generation_config.json": '{"do_sample": false}',
              "chat_template.jinja": "{{ messages }}", "README.md": "---\nlicense: apache-2.0\n---\n# tiny\n"}


def _llama(root: Path) -> Path:
    cfg = llama_config(hidden=64, inter=160, layers=3)
    return write_checkpoint(root, cfg, llama_tensors(cfg), n_shards=2, extra_files=SIDE_FILES)


def _moe(cfg_fn, t_fn, **kw):
    def build(root: Path) -> Path:
        cfg = cfg_fn()
        return write_checkpoint(root, cfg, t_fn(cfg, **kw), n_shards=2)
    return build


def _gemma3(multimodal: bool):
    def build(root: Path) -> Path:
        cfg = gemma3_config(multimodal)
        return write_checkpoint(root, cfg, gemma3_tensors(cfg), n_shards=2, straddle=False)
    return build


def _gpt_oss_mxfp4(root: Path) -> Path:
    cfg = gpt_oss_config(mxfp4=True)
    return write_checkpoint(root, cfg, gpt_oss_mxfp4_tensors(cfg), n_shards=2)


# family -> builder; each writes a fixed checkpoint into the folder it is given
FAMILIES = {
    "llama": _llama,
    "mistral3_fp8_tensor": write_mistral3_fp8,  # multimodal, FP8 per-tensor static source
    "qwen3_fp8_block": write_qwen3_block_fp8,  # FP8 128x128 block source
    "mixtral": _moe(mixtral_config, mixtral_tensors),
    "qwen3_moe": _moe(qwen3_moe_config, qwen3_moe_tensors),
    "qwen3_moe_fused": _moe(qwen3_moe_config, qwen3_moe_tensors, fused=True),
    "deepseek_v3": _moe(deepseek_v3_config, deepseek_v3_tensors),
    "gpt_oss": _moe(gpt_oss_config, gpt_oss_tensors),
    "gpt_oss_mxfp4": _gpt_oss_mxfp4,  # released gpt-oss layout: MXFP4 expert blocks
    "gemma3_text": _gemma3(False),
    "gemma3_mm": _gemma3(True),  # SigLIP tower, the Hub's names
}

# (scheme, layout, scale search): ModelOpt is NVFP4 only, 4over6 is NVFP4 only
MODES = [(s, "compressed-tensors", m) for s, ms in (("mxfp4", ("none", "mse")), ("nvfp4", ("none", "mse", "4over6")))
         for m in ms] + [("nvfp4", "modelopt", m) for m in ("none", "mse", "4over6")]

# a few more cells for the options that change outputs: attention choices and a ModelOpt source
EXTRA = [
    ("llama", "nvfp4", "compressed-tensors", "none", {"attn": "fp8"}),
    ("llama", "mxfp4", "compressed-tensors", "mse", {"attn": "fp8-block"}),
    ("mistral3_fp8_tensor", "nvfp4", "compressed-tensors", "none", {"attn": "fp8-block"}),
    ("qwen3_fp8_block", "nvfp4", "compressed-tensors", "mse", {"attn": "fp8-block"}),
    ("mistral3_fp8_tensor", "nvfp4", "compressed-tensors", "none", {"attn": "bf16"}),
    ("mistral3_fp8_tensor", "nvfp4", "modelopt", "none", {"attn": "bf16"}),
    ("qwen3_fp8_block", "mxfp4", "compressed-tensors", "mse", {"attn": "bf16"}),
    ("qwen3_fp8_block", "nvfp4", "modelopt", "mse", {"attn": "bf16"}),
    ("llama", "nvfp4", "compressed-tensors", "mse", {"max_shard_size": 60_000}),
]


def cell_id(family: str, scheme: str, layout: str, search: str, extra: dict) -> str:
    parts = [family, scheme, layout, search] + [f"{k}={v}" for k, v in sorted(extra.items())]
    return "/".join(parts)


CELLS = [(f, s, lay, m, {}) for f in FAMILIES for s, lay, m in MODES] + EXTRA
CELLS.append(("llama_modelopt_source", "nvfp4", "compressed-tensors", "none", {}))


def _command(family: str, scheme: str, layout: str, search: str, extra: dict) -> str:
    cmd = f"qstream convert {family} OUT --mlp {scheme} --scale-search {search}"
    if layout != "compressed-tensors":
        cmd += f" --format {layout}"
    for k, v in sorted(extra.items()):
        cmd += f" --{k.replace('_', '-')} {v}"
    return cmd


def convert_cell(src: Path, dst: Path, cell: tuple) -> dict[str, str]:
    """Convert one cell into dst; return {file: sha256} of every output file, or {"error": line}."""
    family, scheme, layout, search, extra = cell
    try:
        # gpt-oss per-expert outputs load nowhere (refused by default): their bytes are kept stable all the same
        plan = make_plan(open_checkpoint(src), Options(mlp=scheme, format=layout, scale_search=search,
                                                       allow_unloadable=family.startswith("gpt_oss"), **extra))
        plan.command = _command(*cell)
        prepare_dst(src, dst, overwrite=False, resume=False)
        Executor(plan, dst, threads=2).run()
    except QStreamError as e:
        return {"error": str(e).replace(str(src.parent), "<ROOT>").replace(str(dst.parent), "<ROOT>")}
    out = {}
    for p in sorted(dst.rglob("*")):
        rel = p.relative_to(dst)
        if str(rel).startswith(STAGING_DIR + "/") or not p.is_file():
            continue
        out[rel.as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("golden")
    out = {name: build(root / name) for name, build in FAMILIES.items()}
    # a ModelOpt NVFP4 checkpoint (qstream's own) as a source: repacked to compressed-tensors
    mo = root / "llama_modelopt_source"
    plan = make_plan(open_checkpoint(out["llama"]), Options(mlp="nvfp4", format="modelopt", scale_search="none"))
    prepare_dst(out["llama"], mo, overwrite=False, resume=False)
    Executor(plan, mo, threads=2).run()
    out["llama_modelopt_source"] = mo
    return out


def test_golden_outputs(sources, tmp_path):
    got = {}
    for k, cell in enumerate(CELLS):
        got[cell_id(*cell)] = convert_cell(sources[cell[0]], tmp_path / f"{k:03d}" / cell[0], cell)
    if UPDATE:
        GOLDEN.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
        pytest.skip(f"QSTREAM_UPDATE_GOLDEN=1: wrote {len(got)} cells to {GOLDEN.name}; review and commit its diff")
    assert GOLDEN.exists(), f"{GOLDEN} is missing; create it with QSTREAM_UPDATE_GOLDEN=1 python -m pytest {__file__}"
    want = json.loads(GOLDEN.read_text())
    problems = []
    for cell in sorted(set(want) | set(got)):
        if cell not in got:
            problems.append(f"{cell}: cell in {GOLDEN.name} but no longer in the test matrix")
            continue
        if cell not in want:
            problems.append(f"{cell}: new cell, not in {GOLDEN.name}")
            continue
        w, g = want[cell], got[cell]
        for f in sorted(set(w) | set(g)):
            if f not in g:
                problems.append(f"{cell}: {f} is no longer written")
            elif f not in w:
                problems.append(f"{cell}: {f} is new ({g[f][:60]})")
            elif w[f] != g[f]:
                problems.append(f"{cell}: {f} changed" + (f" ({w[f]!r} -> {g[f]!r})" if f == "error" else ""))
    assert not problems, (f"{len(problems)} golden output(s) differ (if on purpose, regenerate with "
                          "QSTREAM_UPDATE_GOLDEN=1 python -m pytest tests/test_golden.py and commit the diff):\n"
                          + "\n".join(problems))
    # the matrix really produced outputs: every non-error cell wrote shards, an index, config and card
    for cell, files in got.items():
        if "error" not in files:
            assert {"config.json", "model.safetensors.index.json", "README.md"} <= set(files), cell
            assert any(f.endswith(".safetensors") for f in files), cell
