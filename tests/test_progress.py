"""Progress: a tensor counts as done when its bytes are written, not when its work is queued."""

from __future__ import annotations

from synth import llama_config, llama_tensors, write_checkpoint
from qstream.convert import Executor, Progress
from qstream.plan.plan import Options, make_plan
from qstream.sources.source import open_checkpoint
from qstream.writer import STAGING_DIR, prepare_dst


def test_on_tensor_fires_after_the_tensor_is_written(tmp_path):
    cfg = llama_config(hidden=64, inter=256, layers=2)
    src = write_checkpoint(tmp_path / "src", cfg, llama_tensors(cfg, seed=5), n_shards=2)
    plan = make_plan(open_checkpoint(src), Options(mlp="nvfp4", scale_search="mse"))
    dst = tmp_path / "out"
    prepare_dst(src, dst, overwrite=False, resume=False)
    seen: dict[int, list[bytes]] = {}
    order: list[str] = []

    def on_tensor(op, nbytes):
        order.append(op.source.name)
        got = []
        for o in op.outputs:
            shard = plan.shards[o.shard]
            with open(dst / STAGING_DIR / (shard.filename + ".partial"), "rb") as f:
                f.seek(len(shard.header) + o.offset)
                got.append(f.read(o.nbytes))
        seen[id(op)] = got

    # one thread, tiny work items: many items per tensor, the last ones still queued at submission
    Executor(plan, dst, threads=1, block_bytes=128).run(Progress(on_tensor=on_tensor))
    assert sorted(order) == sorted(op.source.name for op in plan.ops), "on_tensor not called once per tensor"
    early = []
    for op in plan.ops:
        for o, got in zip(op.outputs, seen[id(op)]):
            shard = plan.shards[o.shard]
            with open(dst / shard.filename, "rb") as f:
                f.seek(len(shard.header) + o.offset)
                if f.read(o.nbytes) != got:
                    early.append(o.name)
    assert not early, f"on_tensor reported {len(early)} tensors done before their bytes were written: {early[:5]}"
