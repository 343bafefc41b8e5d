"""The I/O layer's promises under failure and concurrency: durable renames, no leaked file
descriptors, a reader whose download callback does not stall other readers."""

from __future__ import annotations

import ast
import errno
import os
import stat
import threading
from pathlib import Path

import pytest

from qstream.errors import QStreamError

PKG = Path(__file__).resolve().parent.parent / "qstream"


@pytest.fixture
def fsyncs(monkeypatch):
    """Every os.fsync call, as (is a directory, path or None): the real fsync still runs."""
    calls: list[tuple[bool, str | None]] = []
    real = os.fsync

    def spy(fd):
        st = os.fstat(fd)
        try:
            name = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            name = None
        calls.append((stat.S_ISDIR(st.st_mode), name))
        return real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    return calls


def test_journal_save_fsyncs_file_and_folder(tmp_path, fsyncs):
    """The journal promises to survive a power cut: its rename must be followed by an fsync of
    the folder, else the old journal (or none) can come back."""
    from qstream.journal import Journal

    staging = tmp_path / ".qstream"
    staging.mkdir()
    Journal(staging / "journal.json", "fp").record("model-00001-of-00001.safetensors", 10, "ab" * 32)
    assert Journal.load(staging).shards["model-00001-of-00001.safetensors"]["size"] == 10
    assert any(not d for d, _ in fsyncs), "the journal file itself is not fsynced"
    assert (True, str(staging)) in fsyncs, f"no fsync of {staging} after the rename: {fsyncs}"


def test_push_state_is_written_durably(tmp_path, fsyncs):
    """push.json (what an interrupted push resumes from) is fsynced and its folder too."""
    from qstream.publish.hub import HubPusher, read_push_state
    from qstream.writer import STAGING_DIR

    staging = tmp_path / STAGING_DIR
    staging.mkdir(parents=True)
    p = HubPusher("org/model", tmp_path, "fingerprint")
    p.parent = "0" * 40
    p._save_state()
    assert read_push_state(tmp_path)["fingerprint"] == "fingerprint"
    assert any(not d for d, _ in fsyncs), "push.json is not fsynced before its rename"
    assert (True, str(staging)) in fsyncs, f"no fsync of {staging} after renaming push.json: {fsyncs}"


def test_one_atomic_write_helper():
    """Every rename-into-place goes through qstream/atomic.py (one implementation of the
    write-fsync-rename-fsync dance, not five)."""
    offenders = []
    for path in sorted(PKG.rglob("*.py")):
        if path.name == "atomic.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("replace", "rename") \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "os":
                offenders.append(f"{path.relative_to(PKG.parent)}:{node.lineno}")
    assert not offenders, f"os.replace/os.rename outside qstream/atomic.py: {offenders}"


def _shard(tmp_path: Path):
    from qstream.plan.plan import OutShard
    from qstream.writer import STAGING_DIR

    (tmp_path / STAGING_DIR).mkdir(parents=True, exist_ok=True)
    return OutShard("model-00001-of-00001.safetensors", [], b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError as e:
        assert e.errno == errno.EBADF
        return False


def test_shard_writer_finish_closes_its_file_when_fsync_fails(tmp_path, monkeypatch):
    """An fsync error (EIO: a failing disk) becomes one sentence, and the shard's file
    descriptor is closed, not leaked."""
    from qstream.writer import ShardWriter

    w = ShardWriter(tmp_path, _shard(tmp_path))
    fd = w.fd

    def failing_fsync(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(QStreamError, match="write failed"):
        w.finish()
    monkeypatch.undo()
    assert not _is_open(fd), "ShardWriter.finish leaked the shard's file descriptor"
    assert w.fd == -1
    w.abort()  # and aborting afterwards is harmless


def test_shard_writer_finish_closes_its_file_when_rename_fails(tmp_path):
    """The final name is taken by a folder: the rename fails with one sentence, no fd is leaked."""
    from qstream.writer import ShardWriter

    shard = _shard(tmp_path)
    (tmp_path / shard.filename).mkdir()
    (tmp_path / shard.filename / "x").write_text("x")
    w = ShardWriter(tmp_path, shard)
    fd = w.fd
    with pytest.raises(QStreamError, match=shard.filename):
        w.finish()
    assert not _is_open(fd)


def test_reader_download_does_not_stall_other_readers(tmp_path):
    """ShardReader calls on_open (a Hub download) for a file it has not opened yet: while
    one file downloads, reads of other files go on, and a second reader of the same file
    waits for that one download instead of starting another."""
    from qstream.safetensors_io import ShardReader

    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(b"A" * 64)
    b.write_bytes(b"B" * 64)
    started, release = threading.Event(), threading.Event()
    opened: list[str] = []

    def on_open(path: Path) -> None:
        opened.append(path.name)
        if path == a:
            started.set()
            release.wait(10)

    reader = ShardReader(on_open=on_open)
    got: dict[str, bytes] = {}

    def read(key: str, path: Path) -> None:
        got[key] = bytes(reader.read_bytes(path, 0, 4))

    slow = threading.Thread(target=read, args=("a1", a))
    slow.start()
    assert started.wait(10)
    second_a = threading.Thread(target=read, args=("a2", a))
    second_a.start()
    other = threading.Thread(target=read, args=("b", b))
    other.start()
    other.join(5)
    stalled = other.is_alive()
    release.set()
    for t in (slow, second_a, other):
        t.join(10)
    reader.close()
    assert not stalled, "reading b.bin waited for the download of a.bin (on_open called under the reader's lock)"
    assert got == {"a1": b"AAAA", "a2": b"AAAA", "b": b"BBBB"}
    assert sorted(opened) == ["a.bin", "b.bin"], f"on_open called {opened}: once per file expected"


def test_reader_download_error_is_raised_and_retried(tmp_path):
    """A failed download is raised to the reader that started it; nothing is left half-open
    (no reader waits forever), and a later read of that file tries the download again."""
    from qstream.safetensors_io import ShardReader

    a = tmp_path / "a.bin"
    a.write_bytes(b"A" * 8)
    calls = []

    def on_open(path: Path) -> None:
        calls.append(path)
        if len(calls) == 1:
            raise QStreamError(f"{path.name}: download failed; check the connection and rerun.")

    reader = ShardReader(on_open=on_open)
    with pytest.raises(QStreamError, match="download failed"):
        reader.read_bytes(a, 0, 4)
    assert bytes(reader.read_bytes(a, 0, 4)) == b"AAAA" and len(calls) == 2
    reader.close()


class _SlowScaleReader:
    """A real ShardReader whose reads of one tensor take a while and are counted
    (to widen the window in which two threads both miss a cache)."""

    def __init__(self, reader, name: str) -> None:
        self.reader, self.name, self.reads = reader, name, 0

    def __getattr__(self, attr):
        return getattr(self.reader, attr)

    def read(self, info):
        if info.name == self.name:
            self.reads += 1
            threading.Event().wait(0.05)
        return self.reader.read(info)


def test_fp8_source_scale_cache_is_locked_and_emptied(tmp_path):
    """Pool threads that decode the same FP8 weight read its scale tensor once, and a finished
    conversion keeps no source scale in memory."""
    from synth import write_qwen3_block_fp8
    from qstream.convert import Executor
    from qstream.plan.plan import Options, make_plan
    from qstream.sources.source import open_checkpoint
    from qstream.writer import prepare_dst

    src = write_qwen3_block_fp8(tmp_path / "src")
    plan = make_plan(open_checkpoint(src), Options(mlp="nvfp4", attn="bf16", scale_search="none"))
    dst = tmp_path / "out"
    prepare_dst(src, dst, overwrite=False, resume=False)
    ex = Executor(plan, dst, threads=4)
    op = next(o for o in plan.ops if o.src_scale is not None and o.kind == "quantize")
    slow = _SlowScaleReader(ex.reader, op.src_scale.name)
    ex.reader = slow
    threads = [threading.Thread(target=ex.read_float, args=(op, 0, 1)) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert slow.reads == 1, f"{op.src_scale.name} read {slow.reads} times by 6 threads (cache filled without a lock)"
    ex.reader = slow.reader
    ex.run()
    assert ex._scales == {}, f"source scales kept after the run: {sorted(ex._scales)}"
