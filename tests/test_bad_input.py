"""Bad input gets clear answers: the cases test_cli_errors.py does not cover, and a fuzz
test of the safetensors header reader.

Every CLI case: exit code 2, stderr is one "error: ..." sentence (rich may wrap it)
that names the file or tensor and says what to do, no traceback, nothing in DST that
looks finished (no config.json; any shard under its final name is complete), and
the process ends within its timeout (never hangs).
"""

from __future__ import annotations

import errno
import json
import math
import os
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from conftest import run_qstream
from synth import llama_config, llama_tensors, write_checkpoint
from qstream.errors import QStreamError
from qstream.safetensors_io import DTYPES, read_header

INDEX = "model.safetensors.index.json"


# --------------------------------------------------------------------------- helpers

def assert_clean_error(p, *words, dst: Path | None = None) -> str:
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    assert "Traceback" not in p.stderr, p.stderr
    msg = p.stderr.strip()
    assert msg.startswith("error:"), msg
    assert len(msg.splitlines()) <= 3, msg  # one sentence (rich may wrap it)
    flat = " ".join(msg.split())
    for w in words:
        assert w in flat, (w, flat)
    if dst is not None:
        assert_nothing_finished(dst)
    return flat


def assert_nothing_finished(dst: Path) -> None:
    """No config.json (the 'finished' marker), and every shard under its final name is
    complete: its size is the one its own header announces."""
    if not dst.exists():
        return
    assert not (dst / "config.json").exists()
    for f in dst.glob("*.safetensors"):
        hdr = read_header(f)
        end = max((t.end for t in hdr.tensors.values()), default=hdr.data_start)
        assert f.stat().st_size == end, f"{f.name} is under its final name but incomplete"


def read_raw(f: Path) -> tuple[dict, bytes]:
    data = f.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def write_raw(f: Path, header: dict, body: bytes) -> None:
    js = json.dumps(header, separators=(",", ":")).encode()
    js += b" " * (-len(js) % 8)
    f.write_bytes(struct.pack("<Q", len(js)) + js + body)


def shard_of(src: Path, tensor: str) -> Path:
    return src / json.loads((src / INDEX).read_text())["weight_map"][tensor]


@pytest.fixture
def src(tiny_ckpt, tmp_path) -> Path:
    s = tmp_path / "src"
    shutil.copytree(tiny_ckpt, s)
    return s


def convert(src: Path, dst: Path, *extra, check: bool = False):
    """The CLI entry point in a forked child (test_resume.run_forked: same code path and
    stderr as `python -m qstream`, a fraction of the start-up time)."""
    from test_resume import run_forked

    r = run_forked("convert", src, dst, *extra, timeout=60)
    if check:
        assert r.returncode == 0, r.stderr
    return r


# --------------------------------------------------------------------------- headers

def test_header_length_larger_than_file(src, tmp_path):
    f = shard_of(src, "model.norm.weight")
    data = bytearray(f.read_bytes())
    for n in (len(data), 2**63 + 5):
        data[:8] = struct.pack("<Q", n)
        f.write_bytes(bytes(data))
        p = run_qstream("convert", src, tmp_path / "out", timeout=60)  # a real process, for once
        assert_clean_error(p, f.name, "header length", "re-download", dst=tmp_path / "out")


@pytest.mark.parametrize("junk,words", [
    (b"{this is not json", ["not valid JSON"]),
    (b"\xff\xfe\x00garbage", ["not valid JSON"]),
    (b'["a", "list"]', ["not a JSON object"]),
    (b'{"w": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 4]}}', ["not valid JSON"]),
    (b"[" * 50000 + b"]" * 50000, ["not valid JSON"]),
], ids=["text", "not-utf8", "array", "int-too-long", "nested-deep"])
def test_header_not_json(src, tmp_path, junk, words):
    f = shard_of(src, "model.norm.weight")
    data = f.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    js = junk + b" " * (-len(junk) % 8)
    f.write_bytes(struct.pack("<Q", len(js)) + js + data[8 + n:])
    assert_clean_error(convert(src, tmp_path / "out"), f.name, *words, dst=tmp_path / "out")


@pytest.mark.parametrize("case", ["past_end", "negative", "reversed", "overlap", "size_mismatch", "shape_not_ints"])
def test_bad_tensor_offsets(src, tmp_path, case):
    name = "model.layers.1.mlp.down_proj.weight"
    f = shard_of(src, name)
    hdr, body = read_raw(f)
    b, e = hdr[name]["data_offsets"]
    words = [f.name, name]
    if case == "past_end":
        hdr[name]["data_offsets"] = [len(body) - (e - b) + 2, len(body) + 2]
        words += ["outside", "re-download"]
    elif case == "negative":
        hdr[name]["data_offsets"] = [-2, e - b - 2]
        words += ["outside"]
    elif case == "reversed":
        hdr[name]["data_offsets"] = [e, b]
        words += ["outside"]
    elif case == "overlap":
        other = next(k for k, v in hdr.items() if k != "__metadata__" and k != name
                     and v["data_offsets"][1] - v["data_offsets"][0] >= 2)
        ob, oe = hdr[other]["data_offsets"]
        hdr[name]["data_offsets"] = [ob + 2, ob + 2 + (e - b)] if ob + 2 + (e - b) <= len(body) else [ob - (e - b) + 2, ob + 2]
        words += ["overlap"]
    elif case == "size_mismatch":
        hdr[name]["shape"][0] -= 1
        words += ["needs", "corrupt"]
    else:
        hdr[name]["shape"] = [64.0, "160"]
        words += ["shape"]
    write_raw(f, hdr, body)
    assert_clean_error(convert(src, tmp_path / "out"), *words, dst=tmp_path / "out")


# --------------------------------------------------------------------------- index

def test_index_names_tensor_absent_from_its_shard(src, tmp_path):
    name = "model.layers.2.self_attn.o_proj.weight"
    f = shard_of(src, name)
    hdr, body = read_raw(f)
    del hdr[name]  # its bytes stay as a hole; the index still points here
    write_raw(f, hdr, body)
    assert_clean_error(convert(src, tmp_path / "out"), name, f.name, "re-download", dst=tmp_path / "out")


def test_index_names_tensor_that_exists_nowhere(src, tmp_path):
    idx = json.loads((src / INDEX).read_text())
    first = sorted(src.glob("model-*.safetensors"))[0].name
    idx["weight_map"]["model.layers.0.mlp.extra_proj.weight"] = first
    (src / INDEX).write_text(json.dumps(idx))
    assert_clean_error(convert(src, tmp_path / "out"), "model.layers.0.mlp.extra_proj.weight", first)


def _duplicate(src: Path, name: str) -> tuple[Path, Path]:
    """Copy tensor ``name`` (header entry and bytes) into the other shard too."""
    home = shard_of(src, name)
    other = next(p for p in sorted(src.glob("model-*.safetensors")) if p != home)
    h1, b1 = read_raw(home)
    h2, b2 = read_raw(other)
    s, e = h1[name]["data_offsets"]
    h2[name] = dict(h1[name], data_offsets=[len(b2), len(b2) + e - s])
    write_raw(other, h2, b2 + b1[s:e])
    return home, other


@pytest.mark.parametrize("with_index", [True, False])
def test_same_tensor_in_two_shards(src, tmp_path, with_index):
    name = "model.layers.0.input_layernorm.weight"
    home, other = _duplicate(src, name)
    if not with_index:
        (src / INDEX).unlink()
    assert_clean_error(convert(src, tmp_path / "out"), name, home.name, other.name, "fix", dst=tmp_path / "out")


@pytest.mark.parametrize("value", [12, None, ["a"], "", "../model-00001-of-00002.safetensors", "sub/x.safetensors"])
def test_index_with_non_string_file_name(src, value):
    idx = json.loads((src / INDEX).read_text())
    idx["weight_map"]["model.norm.weight"] = value
    (src / INDEX).write_text(json.dumps(idx))
    assert_clean_error(run_qstream("inspect", src, timeout=60), INDEX)


@pytest.mark.parametrize("text,words", [("{broken", ["cannot be read as JSON"]), ("[1, 2]", ["not a JSON object"]),
                                        ('{"weight_map": {}}', ["no weight_map"])])
def test_index_unreadable(src, tmp_path, text, words):
    (src / INDEX).write_text(text)
    assert_clean_error(convert(src, tmp_path / "out"), INDEX, *words, dst=tmp_path / "out")


# --------------------------------------------------------------------------- config

@pytest.mark.parametrize("kind", ["list", "binary", "directory"])
def test_config_unreadable(src, tmp_path, kind):
    cfg = src / "config.json"
    if kind == "list":
        cfg.write_text("[1, 2, 3]")
        words = ["not a JSON object"]
    elif kind == "binary":
        cfg.write_bytes(b"\xff\xfe\x00\x01{")
        words = ["cannot be read"]
    else:
        cfg.unlink()
        cfg.mkdir()
        words = ["cannot be read"]
    assert_clean_error(convert(src, tmp_path / "out"), "config.json", *words, dst=tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- NaN / Inf

def _with_nonfinite(tmp_path: Path, name: str, where: list[tuple[int, int, float]]) -> Path:
    cfg = llama_config(hidden=64, inter=128, layers=2)
    t = llama_tensors(cfg)
    w = t[name].astype(np.float32)
    for r, c, v in where:
        w[r, c] = v
    t[name] = w.astype(ml_dtypes.bfloat16)
    return write_checkpoint(tmp_path / "src", cfg, t, n_shards=2)


@pytest.mark.parametrize("scheme,name,count", [
    ("nvfp4", "model.layers.1.mlp.up_proj.weight", 3),  # read first for the gate/up global scale
    ("mxfp4", "model.layers.0.mlp.gate_proj.weight", 1),
    ("nvfp4", "model.layers.1.mlp.down_proj.weight", 1),
])
def test_nonfinite_weight_to_quantize(tmp_path, scheme, name, count):
    where = [(1, 2, np.nan), (5, 7, np.inf), (9, 0, -np.inf)][:count] if count == 3 else [(4, 4, np.inf)]
    s = _with_nonfinite(tmp_path, name, where)
    dst = tmp_path / "out"
    flat = assert_clean_error(convert(s, dst, "--mlp", scheme), name, f"{count} NaN/Inf", "--ignore", dst=dst)
    assert "up_proj" not in flat or "gate_proj" not in flat  # names the bad tensor only
    # the suggested way out works
    p = convert(s, tmp_path / "out2", "--mlp", scheme, "--ignore", name.replace(".", r"\.") + "$", "-q")
    assert p.returncode == 0, p.stderr


def test_nonfinite_in_a_copied_tensor_is_kept(tmp_path):
    """NaN in a weight that is not quantized (attention, kept as is) is copied, not refused."""
    name = "model.layers.0.self_attn.o_proj.weight"
    s = _with_nonfinite(tmp_path, name, [(0, 0, np.nan)])
    p = convert(s, tmp_path / "out", "-q")
    assert p.returncode == 0, p.stderr


# --------------------------------------------------------------------------- DST

def test_dst_is_src(src):
    assert_clean_error(convert(src, src), "inside SRC")


def test_dst_inside_src_through_a_symlink(src, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(src)
    assert_clean_error(convert(src, link / "out"), "inside SRC")
    assert not (src / "out").exists()


def test_dst_is_a_file(src, tmp_path):
    f = tmp_path / "out"
    f.write_text("mine")
    p = convert(src, f)
    assert p.returncode == 2 and "Traceback" not in p.stderr and "out" in p.stderr, p.stderr
    assert f.read_text() == "mine"


@contextmanager
def tmpfs(size_kb: int, ro: bool = False):
    """A fresh tmpfs of size_kb KiB (skips where mounting is not allowed)."""
    d = Path(tempfile.mkdtemp(prefix="qs-tmpfs-"))
    opts = f"size={size_kb}k" + (",ro" if ro else "")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "qstream-test", str(d)], capture_output=True, text=True)
    if r.returncode != 0:
        d.rmdir()
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()})")
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)
        d.rmdir()


def _out_bytes(src: Path, *opts) -> int:
    from qstream.plan.plan import Options, make_plan, parse_size
    from qstream.sources.source import open_checkpoint

    opts_ = Options(mlp=opts[0], max_shard_size=parse_size(opts[1]))
    return sum(s.file_bytes for s in make_plan(open_checkpoint(src), opts_).shards)


def test_no_space_midway_then_resume(src, tmp_path):
    """A tmpfs about half the output's size: the run fails on a shard with one sentence that
    says to free space and --resume; after growing the device, --resume completes the
    output byte-identical to a run that had room."""
    total = _out_bytes(src, "mxfp4", "40KB")
    with tmpfs(max(16, total // 2 // 1024)) as mnt:
        dst = mnt / "out"
        # refused up front ...
        assert_clean_error(convert(src, dst, "--max-shard-size", "40KB", "-q"), "the output needs", "free", dst=dst)
        # ... and where the free space is not what it seems, a full device midway is one sentence too
        p = convert(src, dst, "--max-shard-size", "40KB", "-q", "--skip-space-check")
        flat = assert_clean_error(p, "no space left", "--resume", dst=dst)
        assert ".safetensors" in flat  # names the shard it was writing
        assert 0 < len(list(dst.glob("*.safetensors")))
        r = subprocess.run(["mount", "-o", "remount,size=8m", str(mnt)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        convert(src, dst, "--max-shard-size", "40KB", "-q", "--resume", check=True)
        ref = tmp_path / "ref"
        convert(src, ref, "--max-shard-size", "40KB", "-q", check=True)
        from test_resume import assert_same_tree, assert_staging_clean

        assert_same_tree(dst, ref)
        assert_staging_clean(dst)


def test_no_space_before_the_first_byte(src):
    """A device already full: the journal is the first file written."""
    with tmpfs(64) as mnt:
        (mnt / "out").mkdir()
        fd = os.open(mnt / "filler", os.O_WRONLY | os.O_CREAT)
        try:
            while True:
                os.write(fd, b"\0" * 4096)
        except OSError as e:
            assert e.errno == errno.ENOSPC
        finally:
            os.close(fd)
        p = convert(src, mnt / "out", "-q")
        assert_clean_error(p, "the output needs", "free on that device", "out", dst=mnt / "out")
        p = convert(src, mnt / "out", "-q", "--skip-space-check")
        assert_clean_error(p, "no space left", "out", dst=mnt / "out")


def _limited(limit: int):
    def pre():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return pre


def test_file_size_limit(src, tmp_path):
    """RLIMIT_FSIZE below the largest shard (works without root): EFBIG, not SIGXFSZ,
    and a sentence that says what to do."""
    dst = tmp_path / "out"
    env = dict(os.environ, COLUMNS="200")
    p = subprocess.run([sys.executable, "-m", "qstream", "convert", str(src), str(dst), "-q"], capture_output=True,
                       text=True, env=env, timeout=60, preexec_fn=_limited(20_000))
    assert p.returncode == 2, (p.returncode, p.stderr)
    flat = assert_clean_error(p, ".safetensors", dst=dst)
    assert "too large" in flat and "--max-shard-size" in flat, flat


@contextmanager
def read_only(path: Path):
    """Make the existing folder ``path`` read-only, even for root (bind mount remounted ro;
    permission bits where not root)."""
    if os.geteuid() != 0:
        path.chmod(0o555)
        try:
            yield
        finally:
            path.chmod(0o755)
        return
    r = subprocess.run(["mount", "--bind", str(path), str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot bind-mount here ({r.stderr.strip()})")
    try:
        r = subprocess.run(["mount", "-o", "remount,bind,ro", str(path)], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot remount read-only here ({r.stderr.strip()})")
        yield
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.mark.parametrize("where", ["dst", "parent"])
def test_read_only_dst(src, tmp_path, where):
    box = tmp_path / "box"
    box.mkdir()
    dst = box if where == "dst" else box / "out"
    with read_only(box):
        with pytest.raises(OSError):
            (box / "probe").write_text("x")
        assert_clean_error(convert(src, dst), str(dst), "writable", dst=dst)


def test_read_only_dst_on_resume(src, tmp_path):
    from test_resume import Kill, run_forked

    dst = tmp_path / "out"
    r = run_forked("convert", src, dst, "--max-shard-size", "40KB", "-q", kill=Kill(2, "after", call="replace", target="of-000"))
    assert r.returncode < 0
    with read_only(dst):
        assert_clean_error(convert(src, dst, "--max-shard-size", "40KB", "--resume"), "writable", dst=dst)


# --------------------------------------------------------------------------- fuzz

FUZZ_DIR = Path(tempfile.mkdtemp(prefix="qs-fuzz-"))
FUZZ = settings(max_examples=300, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def check_reader(blob: bytes) -> None:
    """read_header either returns a header whose every tensor lies inside the file, with
    the size its shape and dtype need and no overlap, or raises QStreamError. Nothing else."""
    f = FUZZ_DIR / "x.safetensors"
    f.write_bytes(blob)
    try:
        h = read_header(f)
    except QStreamError as e:
        assert str(e).startswith(str(f)), e  # names the file
        return
    size = len(blob)
    spans = []
    for t in h.tensors.values():
        assert h.data_start <= t.begin <= t.end <= size
        assert t.end - t.begin == math.prod(t.shape) * DTYPES[t.dtype].itemsize
        assert all(isinstance(d, int) and d >= 0 for d in t.shape)
        if t.end > t.begin:
            spans.append((t.begin, t.end))
    spans.sort()
    assert all(b1 >= e0 for (_, e0), (b1, _) in zip(spans, spans[1:]))


def frame(js: bytes, body: bytes = b"", n: int | None = None) -> bytes:
    return struct.pack("<Q", len(js) if n is None else n) + js + body


@FUZZ
@given(st.binary(max_size=300))
@example(b"")
@example(b"\x00" * 7)
@example(struct.pack("<Q", 2**64 - 1))
@example(frame(b"{}"))
@example(frame(b"[" * 5000 + b"]" * 5000))
@example(frame(b'{"a": {"b": ' * 3000 + b"1" + b"}" * 6000))
@example(frame(b'{"t": {"dtype": "F32", "shape": [' + b"7" * 5000 + b'], "data_offsets": [0, 4]}}', b"\0" * 4))
@example(frame(b'{"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 1e400]}}', b"\0" * 4))
@example(frame(b'{"t": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 4]}}', b"\0" * 4))
@example(frame(b'{"\\ud800": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', b"\0" * 4))
@example(frame(b"\xef\xbb\xbf{}"))
def test_fuzz_random_bytes(blob):
    check_reader(blob)
    check_reader(frame(blob))  # the same bytes as a header of the right length
    check_reader(frame(blob, b"\0" * 64))


json_leaf = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70),
                      st.floats(allow_nan=True), st.text(max_size=8), st.sampled_from(list(DTYPES) + ["Q4_K", "f32", ""]))
json_value = st.recursive(json_leaf, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=4),
                          max_leaves=12)
entry = st.fixed_dictionaries(
    {},
    optional={
        "dtype": st.sampled_from(list(DTYPES) + ["Q4_K", "BF", None, 3]) | json_value,
        "shape": st.lists(st.integers(min_value=-3, max_value=40), max_size=3) | json_value,
        "data_offsets": st.lists(st.integers(min_value=-10, max_value=400), min_size=2, max_size=2) | json_value,
        "extra": json_value,
    },
)


@FUZZ
@given(st.dictionaries(st.text(max_size=10), entry | json_value, max_size=5),
       st.one_of(st.none(), json_value), st.integers(min_value=0, max_value=400))
def test_fuzz_json_headers(entries, metadata, body_len):
    obj = dict(entries)
    if metadata is not None:
        obj["__metadata__"] = metadata
    js = json.dumps(obj).encode()
    check_reader(frame(js, b"\x01" * body_len))


def _valid() -> tuple[dict, bytes]:
    hdr = {"__metadata__": {"format": "pt"}}
    off = 0
    for i, (dt, shape) in enumerate([("BF16", [4, 8]), ("F32", [3]), ("U8", [0]), ("F8_E4M3", [2, 2]), ("I64", [])]):
        n = math.prod(shape) * DTYPES[dt].itemsize
        hdr[f"t{i}"] = {"dtype": dt, "shape": shape, "data_offsets": [off, off + n]}
        off += n
    return hdr, bytes(range(256))[:off] if off <= 256 else b"\0" * off


WEIRD = st.sampled_from([-1, -2**63, 2**63, 2**64 + 1, 10**30, 0, 1, 3.5, True, None, "8", [], [1], {}, float("inf")])


def _mutate(hdr: dict, names: list[str], name: str, op: str, data) -> None:
    ent = hdr[name]
    if op == "offset":
        ent["data_offsets"][data.draw(st.integers(0, 1))] = data.draw(WEIRD | st.integers(-20, 300))
    elif op == "offsets":
        ent["data_offsets"] = data.draw(st.lists(WEIRD | st.integers(-5, 80), max_size=3) | WEIRD)
    elif op == "shape":
        ent["shape"] = data.draw(st.lists(WEIRD | st.integers(-2, 9), max_size=4) | WEIRD)
    elif op == "dim" and ent["shape"]:
        ent["shape"][0] = data.draw(WEIRD | st.integers(-2, 9))
    elif op == "dtype":
        ent["dtype"] = data.draw(st.sampled_from(list(DTYPES) + ["Q4_K", "bf16", "F4", ""]) | WEIRD)
    elif op == "drop":
        ent.pop(data.draw(st.sampled_from(["dtype", "shape", "data_offsets"])), None)
    elif op == "swap":
        other = hdr[data.draw(st.sampled_from(names))]
        ent["data_offsets"], other["data_offsets"] = other["data_offsets"], ent["data_offsets"]
    elif op == "dup":
        hdr[name + "_copy"] = json.loads(json.dumps(ent))
    elif op == "meta":
        hdr["__metadata__"] = data.draw(json_value)
    else:
        hdr[name] = data.draw(json_value)


@FUZZ
@given(st.data())
def test_fuzz_mutated_valid_header(data):
    hdr, body = _valid()
    check_reader(frame(json.dumps(hdr).encode(), body))  # the base case reads
    names = [k for k in hdr if k != "__metadata__"]
    for _ in range(data.draw(st.integers(1, 3))):
        name = data.draw(st.sampled_from(names))
        op = data.draw(st.sampled_from(["offset", "offsets", "shape", "dim", "dtype", "drop", "swap", "dup", "meta", "entry"]))
        try:
            _mutate(hdr, names, name, op, data)
        except (TypeError, IndexError, AttributeError, KeyError):
            pass  # an earlier mutation replaced this entry with something that is not an object
    js = json.dumps(hdr).encode()
    blob = frame(js, body)
    cut = data.draw(st.sampled_from(["none", "body", "header", "length", "bytes"]))
    if cut == "body":
        blob = blob[: data.draw(st.integers(0, len(blob)))]
    elif cut == "header":
        blob = frame(js[: data.draw(st.integers(0, len(js)))], body)
    elif cut == "length":
        blob = frame(js, body, n=data.draw(st.integers(0, len(js) + len(body) + 16)))
    elif cut == "bytes":
        b = bytearray(blob)
        for _ in range(data.draw(st.integers(1, 4))):
            i = data.draw(st.integers(0, len(b) - 1))
            b[i] = data.draw(st.integers(0, 255))
        blob = bytes(b)
    check_reader(blob)
