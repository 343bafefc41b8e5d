"""Atomic output, journal and --resume, proved by killing the converter.

Kill points. A converter run on a tiny model takes well under a second, so a
timer cannot hit "the 7th shard" reliably. Most kills here are therefore placed
by counting the converter's own I/O: the run is forked from this process (the
child runs the real entry point, ``qstream.cli.run()``, with ``sys.argv`` set as
on a command line) and the child's ``os.pwrite`` / ``os.copy_file_range`` /
``os.posix_fallocate`` / ``os.fsync`` / ``os.replace`` are wrapped so that the
N-th call, before or after it happens, sends a real signal (SIGKILL, SIGTERM or
SIGINT) to the process. Nothing in qstream is changed or told about it. A first,
uninterrupted traced run lists those calls; kill points are spread evenly over
that list, plus one before and one after every rename of the final phase (side
files, index, config.json, README.md, the completed journal). Forking keeps each
run at a fraction of a second, so ~40 kills fit in the time budget.

A few kills come from outside, on a real ``python -m qstream`` process: SIGINT
and SIGTERM when the k-th shard shows up in DST, SIGKILL at seeded random times.

After every kill: whatever sits in DST under a final name is complete (byte for
byte the uninterrupted run's file); a rerun without --resume refuses and names
--resume; the rerun with --resume ends with every file byte-identical to an
uninterrupted run. The model card is compared byte for byte except its
"How it was made" command line, which records the command as typed (see
``card_command`` and the xfail test
``test_determinism.py::test_card_does_not_depend_on_threads``).
"""

from __future__ import annotations

import io
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from conftest import run_qstream
from synth import llama_config, llama_tensors, write_checkpoint

MAX_SHARD = "20KB"  # ~24 output shards for the checkpoint below
SIDE_FILES = {
    "tokenizer_config.json": '{"model_max_length": 256}',
    "generation_config.json": '{"do_sample": false}',
    "README.md": "---\nlicense: apache-2.0\n---\n# killme\n",
}
STAGING = ".cache/huggingface/qstream"  # qstream.writer.STAGING_DIR
REF_SECONDS: list[float] = []  # wall time of the reference run (a real process)


# --------------------------------------------------------------------------- helpers

def card_command(text: str, dst: Path | str) -> str:
    """The card with its recorded command normalised: DST spelled <DST>, run-only flags
    (--resume, --threads N, -q/--quiet, --overwrite) dropped. Everything else must match."""
    text = text.replace(str(dst), "<DST>")

    def norm(m: re.Match) -> str:
        cmd = m.group(2)
        cmd = re.sub(r" --threads[ =]\d+", "", cmd)
        cmd = re.sub(r" (--resume|--quiet|-q|--overwrite)(?= |$)", "", cmd)
        return m.group(1) + cmd + m.group(3)

    return re.sub(r"(## How it was made\n\n```\n)(.*?)(\n```)", norm, text, flags=re.S)


def no_traceback(err: str) -> bool:
    return "Traceback" not in err


def tree(dst: Path) -> dict[str, bytes]:
    """Every output file (staging folder excluded) -> bytes; the card normalised."""
    out = {}
    for p in sorted(dst.rglob("*")):
        rel = p.relative_to(dst)
        if str(rel).startswith(STAGING + "/") or not p.is_file():
            continue
        data = p.read_bytes()
        if str(rel) == "README.md":
            data = card_command(data.decode(), dst).encode()
        out[str(rel)] = data
    return out


def assert_same_tree(got: Path, ref: Path) -> None:
    a, b = tree(got), tree(ref)
    assert sorted(a) == sorted(b), f"file sets differ: extra {sorted(set(a) - set(b))}, missing {sorted(set(b) - set(a))}"
    for name in b:
        assert a[name] == b[name], f"{name} differs from the uninterrupted run"


def errors(r) -> str:
    """stderr without the plan's warning lines (e.g. that --max-shard-size is below a tensor)."""
    return "\n".join(line for line in r.stderr.splitlines() if not line.startswith("warning:"))


def journal(dst: Path) -> dict:
    return json.loads((dst / STAGING / "journal.json").read_text())


def assert_staging_clean(dst: Path) -> None:
    """After a finished run only the journal remains in the staging folder, marked complete,
    and it records every shard with its true size and SHA-256."""
    import hashlib

    assert sorted(p.name for p in (dst / STAGING).iterdir()) == ["journal.json"]
    assert not (dst / ".qstream").exists() and not list(dst.rglob("*.partial"))
    j = journal(dst)
    assert j["complete"] is True
    shards = {p.name: p for p in dst.glob("*.safetensors")}
    assert set(j["shards"]) == set(shards)
    for name, rec in j["shards"].items():
        data = shards[name].read_bytes()
        assert (rec["size"], rec["sha256"]) == (len(data), hashlib.sha256(data).hexdigest()), name


@dataclass(frozen=True)
class Kill:
    """Send ``sig`` to the converter at the ``k``-th (1-based) call of ``call`` (any
    wrapped call if None) whose target file name contains ``target`` (any if None; a
    leading "=" asks for that exact file name)."""

    k: int
    when: str = "after"  # "before" | "after" the call
    sig: int = signal.SIGKILL
    call: str | None = None
    target: str | None = None
    slow: str | None = None  # make every call of this name 20 ms slower (e.g. "fsync")


WRAPPED = ("pwrite", "copy_file_range", "posix_fallocate", "fsync", "replace")


def _fd_name(fd) -> str:
    try:
        return os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        return "?"


def _install(kill: Kill | None, trace: list | None) -> None:
    """In the forked child: wrap os-level writes so the k-th one sends a signal."""
    lock = threading.Lock()
    count = [0]
    for name in WRAPPED:
        real = getattr(os, name, None)
        if real is None:
            continue

        def wrapper(*a, __real=real, __name=name, **kw):
            if __name == "replace":
                target = os.path.basename(str(a[1]))
            elif __name == "copy_file_range":
                target = _fd_name(a[1])
            else:
                target = _fd_name(a[0])
            fire = False
            with lock:
                if trace is not None:
                    trace.append((__name, target))
                if kill is not None and (kill.call in (None, __name)) and (kill.target is None or (target == kill.target[1:] if kill.target.startswith('=') else kill.target in target)):
                    count[0] += 1
                    fire = count[0] == kill.k
            if kill is not None and kill.slow == __name:
                time.sleep(0.02)
            if fire and kill.when == "before":
                os.kill(os.getpid(), kill.sig)
            r = __real(*a, **kw)
            if fire and kill.when == "after":
                os.kill(os.getpid(), kill.sig)
            return r

        setattr(os, name, wrapper)


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str


def _child_main(args: list[str], kill: Kill | None, trace_to: str | None, env: dict | None = None) -> int:
    """Body of the converter process: the real entry point with the os calls wrapped."""
    import logging

    logging.root.handlers[:] = []  # drop pytest's capture handlers: log to stderr as a fresh process does
    logging.root.setLevel(logging.WARNING)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.environ["COLUMNS"] = "200"
    os.environ.update(env or {})
    sys.argv = ["qstream", *args]
    trace: list | None = [] if trace_to is not None else None
    _install(kill, trace)
    from qstream.cli import run

    try:
        run()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    if trace_to is not None:
        Path(trace_to).write_text(json.dumps(trace))
    return code


_warm = False


def _warm_up() -> None:
    """Compile the serial kernels here once, so that forked children start warm."""
    global _warm
    if _warm:
        return
    import ml_dtypes

    import qstream.cli  # noqa: F401
    from qstream.convert import _kernels

    k = _kernels()
    x = np.ones((2, 64), ml_dtypes.bfloat16)
    k.absmax(x)
    k.quantize_mxfp4(x)
    k.quantize_nvfp4(x, np.float32(1.0))
    _warm = True


def run_forked(*args, kill: Kill | None = None, trace_to: Path | None = None, timeout: float = 60,
               env: dict | None = None) -> Ran:
    """Run ``qstream ARGS`` through the real entry point, ``qstream.cli.run()``, in a child
    process; returncode is negative for a signal, as with subprocess. The child is forked
    from this (warm) process, which makes a run ~0.1-0.3 s. Idle daemon helpers (tqdm's
    monitor, left by transformers in other tests) do not matter to a child that only runs
    qstream; if a non-daemon thread runs here, the child is a fresh interpreter instead."""
    import tempfile

    args = [str(a) for a in args]
    if any(not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        k = "None" if kill is None else f"T.Kill({kill.k}, {kill.when!r}, {int(kill.sig)}, {kill.call!r}, {kill.target!r}, {kill.slow!r})"
        code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_resume as T; "
                f"sys.exit(T._child_main({args!r}, {k}, {str(trace_to) if trace_to else None!r}, {env!r}))")
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                           env=dict(os.environ, COLUMNS="200"))
        return Ran(p.returncode, p.stdout, p.stderr)
    _warm_up()
    fd_out, out_path = tempfile.mkstemp(prefix="qs-out-")
    fd_err, err_path = tempfile.mkstemp(prefix="qs-err-")
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 99
        try:
            os.dup2(fd_out, 1)
            os.dup2(fd_err, 2)
            sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), write_through=True)
            sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), write_through=True)
            code = _child_main(args, kill, str(trace_to) if trace_to else None, env)
        except BaseException:
            traceback.print_exc()
            code = 98
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)
    os.close(fd_out)
    os.close(fd_err)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"qstream {' '.join(args)} hung (> {timeout} s)")
        time.sleep(0.002)
    out, err = Path(out_path).read_text(), Path(err_path).read_text()
    os.unlink(out_path)
    os.unlink(err_path)
    return Ran(os.waitstatus_to_exitcode(status), out, err)


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    cfg = llama_config(hidden=64, inter=160, layers=8)
    root = tmp_path_factory.mktemp("resume") / "src"
    return write_checkpoint(root, cfg, llama_tensors(cfg, seed=7), n_shards=3, extra_files=SIDE_FILES)


@pytest.fixture(scope="module")
def ref(src, tmp_path_factory) -> Path:
    """An uninterrupted run of the real CLI (subprocess), the yardstick for every resume."""
    dst = tmp_path_factory.mktemp("ref") / "out"
    t0 = time.monotonic()
    run_qstream("convert", src, dst, "--max-shard-size", MAX_SHARD, "--threads", "1", "-q", check=True, timeout=120)
    REF_SECONDS.append(time.monotonic() - t0)
    return dst


@pytest.fixture(scope="module")
def trace(src, ref, tmp_path_factory) -> list[tuple[str, str]]:
    """The wrapped calls of one uninterrupted forked run, in order."""
    d = tmp_path_factory.mktemp("trace")
    r = run_forked("convert", src, d / "out", "--max-shard-size", MAX_SHARD, "--threads", "1", "-q", trace_to=d / "trace.json")
    assert r.returncode == 0, r.stderr
    assert_same_tree(d / "out", ref)  # the forked runner itself is faithful
    t = [tuple(e) for e in json.loads((d / "trace.json").read_text())]
    n_shards = len(list(ref.glob("*.safetensors")))
    assert n_shards >= 20, n_shards
    assert sum(1 for c, tgt in t if c == "replace" and tgt.endswith(".safetensors")) == n_shards
    return t


def convert_args(src: Path, dst: Path, *extra: str) -> list:
    return ["convert", src, dst, "--max-shard-size", MAX_SHARD, "--threads", "1", *extra]


def check_killed_then_resume(src: Path, ref: Path, dst: Path, kill_rc: int, kill_err: str, sig: int) -> None:
    # 1. How it stopped.
    if sig == signal.SIGKILL:
        assert kill_rc in (-signal.SIGKILL, 0), (kill_rc, kill_err)  # 0: killed after it had finished
    else:
        assert kill_rc in (130, 0), (kill_rc, kill_err)
        assert no_traceback(kill_err), kill_err
        if kill_rc == 130:
            assert "--resume" in kill_err, kill_err
    # 2. Atomic output: anything under a final name is complete.
    ref_tree = tree(ref)
    if dst.exists():
        for p in dst.glob("*.safetensors"):
            assert p.read_bytes() == ref_tree[p.name], f"{p.name} is in DST under its final name but incomplete"
        if (dst / "config.json").exists():
            got = tree(dst)
            for name, data in ref_tree.items():
                if name != "README.md":  # see test_config_json_is_written_last
                    assert got.get(name) == data, f"config.json exists but {name} is not finished"
    # 3. Without --resume: a clear refusal that names --resume (unless the run had finished).
    finished = kill_rc == 0 or (dst.exists() and (dst / STAGING / "journal.json").exists() and journal(dst).get("complete"))
    if dst.exists() and any(dst.iterdir()) and not finished:
        r = run_forked(*convert_args(src, dst, "-q"))
        assert r.returncode == 2 and errors(r).startswith("error:") and "--resume" in r.stderr, r.stderr
    # 4. --resume ends byte-identical to the uninterrupted run.
    r = run_forked(*convert_args(src, dst, "-q", "--resume"))
    assert r.returncode == 0, r.stderr
    assert_same_tree(dst, ref)
    assert_staging_clean(dst)


@pytest.fixture
def scratch(tmp_path):
    """A fresh folder for DSTs, on tmpfs (/dev/shm) where there is one: these tests are
    about processes being killed, not disks, and fsync on a busy shared disk is what made
    them slow and their time erratic. tmp_path elsewhere."""
    import tempfile

    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield tmp_path
        return
    d = Path(tempfile.mkdtemp(prefix="qstream-test-", dir=shm))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


# --------------------------------------------------------------------------- kill points

N_SPREAD = 24
SIGS = [signal.SIGKILL, signal.SIGKILL, signal.SIGTERM, signal.SIGINT]


@pytest.mark.parametrize("i", range(N_SPREAD))
def test_kill_spread_over_the_run(i, src, ref, trace, scratch):
    """Kill at the i-th of N_SPREAD points spread evenly over the run's writes."""
    k = 1 + round(i * (len(trace) - 1) / (N_SPREAD - 1))
    sig = SIGS[i % len(SIGS)]
    kill = Kill(k, when="before" if i % 2 else "after", sig=sig)
    dst = scratch / "out"
    r = run_forked(*convert_args(src, dst, "-q"), kill=kill)
    check_killed_then_resume(src, ref, dst, r.returncode, r.stderr, sig)


def _final_phase_points(trace) -> list[tuple[str, int]]:
    """(target, occurrence) of each rename after the last shard's: side files, index,
    config.json, README.md, and the journal marked complete."""
    last_shard = max(i for i, (c, t) in enumerate(trace) if c == "replace" and t.endswith(".safetensors"))
    seen: dict[str, int] = {}
    for c, t in trace[:last_shard + 1]:
        if c == "replace":
            seen[t] = seen.get(t, 0) + 1
    pts = []
    for c, t in trace[last_shard + 1:]:
        if c == "replace":
            seen[t] = seen.get(t, 0) + 1
            pts.append((t, seen[t]))
    return pts


@pytest.mark.parametrize("when", ["before", "after"])
def test_kill_in_final_phase(when, src, ref, trace, scratch):
    """SIGKILL just before / just after every rename of the small-files phase."""
    pts = _final_phase_points(trace)
    names = [t for t, _ in pts]
    for must in ("model.safetensors.index.json", "config.json", "README.md", "journal.json", "tokenizer_config.json"):
        assert must in names, (must, names)
    for j, (target, occ) in enumerate(pts):
        dst = scratch / f"out{j}"
        kill = Kill(occ, when=when, call="replace", target=target)
        r = run_forked(*convert_args(src, dst, "-q"), kill=kill)
        check_killed_then_resume(src, ref, dst, r.returncode, r.stderr, signal.SIGKILL)


def test_config_json_is_written_last(src, scratch):
    dst = scratch / "out"
    r = run_forked(*convert_args(src, dst, "-q"), kill=Kill(1, "after", call="replace", target="=config.json"))
    assert r.returncode == -signal.SIGKILL
    assert (dst / "config.json").exists()
    assert (dst / "README.md").exists() and (dst / "model.safetensors.index.json").exists()


def _interrupt_while_finisher_lags(src: Path, dst: Path) -> Ran:
    """SIGINT after the 3rd shard is renamed, with fsync slowed down so that the shard
    finisher (fsync, rename, hash, journal) lags behind: several shards whose bytes are
    all written are still queued for it when the interrupt lands."""
    return run_forked(*convert_args(src, dst), kill=Kill(3, "after", signal.SIGINT, call="replace", target="of-000", slow="fsync"))


def test_interrupt_while_finisher_lags(src, ref, scratch):
    dst = scratch / "out"
    r = _interrupt_while_finisher_lags(src, dst)
    assert r.returncode == 130, r.stderr
    assert "--resume" in r.stderr
    done = journal(dst)["shards"]
    assert 2 <= len(done) < len(list(ref.glob("*.safetensors")))
    r = run_forked(*convert_args(src, dst, "--resume"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("already done") == len(done)
    assert_same_tree(dst, ref)
    assert_staging_clean(dst)


def test_interrupt_while_finisher_lags_prints_no_traceback(src, scratch):
    r = _interrupt_while_finisher_lags(src, scratch / "out")
    assert r.returncode == 130
    assert "Traceback" not in r.stderr, r.stderr


# --------------------------------------------------------------------------- signals from outside


def _popen(*args) -> subprocess.Popen:
    env = dict(os.environ, COLUMNS="200")
    return subprocess.Popen([sys.executable, "-m", "qstream", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def _wait_for_shards(p: subprocess.Popen, dst: Path, k: int, timeout: float = 60) -> bool:
    """Poll DST until k shards are there under their final names; False if the run ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if p.poll() is not None:
            return False
        try:
            if sum(1 for n in os.listdir(dst) if n.endswith(".safetensors")) >= k:
                return True
        except FileNotFoundError:
            pass
        time.sleep(0.0005)
    raise AssertionError("converter made no progress")


@pytest.mark.parametrize("sig,k", [(signal.SIGINT, 2), (signal.SIGTERM, 5)])
def test_signal_from_outside_stops_cleanly(sig, k, src, ref, scratch):
    """A real `python -m qstream` process: SIGINT / SIGTERM when the k-th shard appears.
    It stops with exit 130 and a message saying to rerun with --resume; resume completes."""
    dst = scratch / "out"
    for attempt in range(3):
        shutil.rmtree(dst, ignore_errors=True)
        p = _popen(*convert_args(src, dst))
        if _wait_for_shards(p, dst, k):
            os.kill(p.pid, signal.SIGSTOP)  # freeze it where it is, then interrupt
            os.kill(p.pid, sig)
            os.kill(p.pid, signal.SIGCONT)
        out, err = p.communicate(timeout=60)
        if p.returncode != 0:
            break
    else:
        pytest.skip("the converter finished before it could be interrupted, 3 times")
    assert p.returncode == 130, (p.returncode, err)
    assert no_traceback(err), err
    assert "--resume" in err, err
    assert not (dst / "config.json").exists()
    r = run_qstream(*convert_args(src, dst, "--resume"), check=True)  # a real process resumes
    assert "already done" in r.stdout
    assert_same_tree(dst, ref)
    assert_staging_clean(dst)


def test_sigkill_at_random_times(src, ref, scratch):
    """SIGKILL a real process at seeded random times over a whole run (startup included);
    whatever it left is resumed and ends byte-identical."""
    span = REF_SECONDS[0]
    rng = random.Random(1234)
    for j in range(3):
        dst = scratch / f"out{j}"
        p = _popen(*convert_args(src, dst, "-q"))
        time.sleep(rng.uniform(0.4, 1.0) * span)
        p.send_signal(signal.SIGKILL)
        p.communicate(timeout=60)
        check_killed_then_resume(src, ref, dst, p.returncode, "", signal.SIGKILL)


# --------------------------------------------------------------------------- journal and refusals

def test_journal_of_an_uninterrupted_run(src, ref):
    from qstream.plan.plan import Options, make_plan, parse_size
    from qstream.sources.source import open_checkpoint

    assert_staging_clean(ref)
    plan = make_plan(open_checkpoint(src), Options(mlp="mxfp4", max_shard_size=parse_size(MAX_SHARD)))
    assert journal(ref)["fingerprint"] == plan.fingerprint()
    assert [s.filename for s in plan.shards] == sorted(journal(ref)["shards"])


def test_journal_of_an_interrupted_run(src, ref, scratch):
    """A finished run keeps no journal; an interrupted one keeps exactly the journal of its plan
    (and no half-written .partial: a SIGKILLed one's is removed by the next run)."""
    import hashlib

    from qstream.plan.plan import Options, make_plan, parse_size
    from qstream.sources.source import open_checkpoint

    assert_staging_clean(ref)
    plan = make_plan(open_checkpoint(src), Options(mlp="mxfp4", max_shard_size=parse_size(MAX_SHARD)))
    dst = scratch / "out"
    _interrupted(src, dst)
    j = journal(dst)
    assert j["fingerprint"] == plan.fingerprint() and not j["complete"]
    assert set(j["shards"]) <= {s.filename for s in plan.shards}
    for name, rec in j["shards"].items():
        assert hashlib.sha256((dst / name).read_bytes()).hexdigest() == rec["sha256"]


def _interrupted(src: Path, dst: Path, frac: float = 0.5, *extra) -> None:
    """A run SIGKILLed after about ``frac`` of its shards were renamed into place."""
    r = run_forked(*convert_args(src, dst, "-q", *extra), kill=Kill(12, "after", call="replace", target="of-000"))
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert 5 <= len(journal(dst)["shards"]) < 20


def test_no_resume_flag_on_interrupted_dst(src, scratch):
    dst = scratch / "out"
    _interrupted(src, dst)
    before = (dst / STAGING / "journal.json").read_bytes()
    r = run_qstream(*convert_args(src, dst))  # a real process: the exact message a user sees
    assert r.returncode == 2 and errors(r).startswith("error:"), r.stderr
    assert "interrupted" in r.stderr and "--resume" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert (dst / STAGING / "journal.json").read_bytes() == before  # nothing touched


@pytest.mark.parametrize("change", [("--mlp", "nvfp4"), ("--max-shard-size", "30KB"), ("--ignore", "layers\\.0\\.")])
def test_resume_refuses_changed_options(change, src, ref, scratch):
    dst = scratch / "out"
    _interrupted(src, dst)
    before = {p.name: p.read_bytes() for p in dst.rglob("*") if p.is_file()}
    args = ["convert", src, dst, "--max-shard-size", MAX_SHARD, "--resume", "-q"]
    if change[0] == "--max-shard-size":
        args[4] = change[1]
    else:
        args += list(change)
    r = run_forked(*args)
    assert r.returncode == 2 and errors(r).startswith("error:"), r.stderr
    msg = " ".join(errors(r).split())
    # the refusal names the option that changed, with its old and new value
    assert "options changed" in msg and change[0] in msg and "--overwrite" in msg, msg
    assert {p.name: p.read_bytes() for p in dst.rglob("*") if p.is_file()} == before
    # threads are not an output option: resuming with other threads is allowed, same bytes
    r = run_forked("convert", src, dst, "--max-shard-size", MAX_SHARD, "--threads", "2", "-q", "--resume")
    assert r.returncode == 0, r.stderr
    assert_same_tree(dst, ref)


@pytest.mark.parametrize("what", ["tensor", "config"])
def test_resume_refuses_changed_source(what, src, scratch):
    s2 = scratch / "src"
    shutil.copytree(src, s2)
    dst = scratch / "out"
    _interrupted(s2, dst)
    if what == "tensor":
        f = sorted(s2.glob("model-*.safetensors"))[-1]
        data = bytearray(f.read_bytes())
        data[-3] ^= 0x40  # same size, one weight changed
        f.write_bytes(bytes(data))
    else:
        cfg = json.loads((s2 / "config.json").read_text())
        cfg["rms_norm_eps"] = 1e-6
        (s2 / "config.json").write_text(json.dumps(cfg))
    r = run_forked(*convert_args(s2, dst, "--resume", "-q"))
    assert r.returncode == 2, r.stderr
    msg = " ".join(errors(r).split())
    assert msg.startswith("error:") and "the source changed" in msg and "--overwrite" in msg, msg
    # --overwrite starts over and gives a clean, complete conversion of the new source
    assert run_forked(*convert_args(s2, dst, "--overwrite", "-q")).returncode == 0
    fresh = scratch / "fresh"
    assert run_forked(*convert_args(s2, fresh, "-q")).returncode == 0
    assert_same_tree(dst, fresh)
    assert_staging_clean(dst)


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "append"])
def test_damaged_finished_shard_is_redone(damage, src, ref, scratch):
    dst = scratch / "out"
    shutil.copytree(ref, dst)
    victim = sorted(dst.glob("*.safetensors"))[6]
    data = bytearray(victim.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01
        victim.write_bytes(bytes(data))
    elif damage == "truncate":
        victim.write_bytes(bytes(data[:-1]))
    elif damage == "append":
        victim.write_bytes(bytes(data) + b"\0")
    else:
        victim.unlink()
    r = run_forked(*convert_args(src, dst, "--resume"))
    assert r.returncode == 0, r.stderr
    notes = [ln for ln in r.stdout.splitlines() if victim.name in ln]
    want = "checksum mismatch" if damage == "flip" else "missing or wrong size"
    assert any(want in ln for ln in notes), r.stdout
    assert sum("already done" in ln for ln in r.stdout.splitlines()) == len(list(ref.glob("*.safetensors"))) - 1
    assert_same_tree(dst, ref)
    assert_staging_clean(dst)


def test_corrupted_shard_of_interrupted_run(src, ref, scratch):
    dst = scratch / "out"
    _interrupted(src, dst)
    done = sorted(journal(dst)["shards"])
    for name in (done[0], done[-1]):
        f = dst / name
        data = bytearray(f.read_bytes())
        data[100] ^= 0xFF
        f.write_bytes(bytes(data))
    r = run_forked(*convert_args(src, dst, "--resume"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("checksum mismatch") == 2, r.stdout
    assert_same_tree(dst, ref)
    assert_staging_clean(dst)


@pytest.mark.parametrize("junk", [b"", b"{", b"[]", b'{"fingerprint": 3}', b"\xff\xfe", "badrecords"])
def test_torn_journal_means_redo(junk, src, ref, scratch):
    dst = scratch / "out"
    _interrupted(src, dst)
    if junk == "badrecords":  # right fingerprint, records of the wrong type
        j = journal(dst)
        j["shards"] = {k: 5 for k in j["shards"]}
        junk = json.dumps(j).encode()
    (dst / STAGING / "journal.json").write_bytes(junk)
    r = run_forked(*convert_args(src, dst, "--resume"))
    assert r.returncode == 0, r.stderr
    assert "already done" not in r.stdout
    assert_same_tree(dst, ref)
    assert_staging_clean(dst)


def test_stale_partials_do_not_leak(src, ref, scratch):
    """Leftovers of a killed run (a half-written shard, a torn journal.tmp, a shard renamed
    but not yet journaled) are all redone or cleared by the resume."""
    dst = scratch / "out"
    _interrupted(src, dst)
    (dst / STAGING / "journal.tmp").write_text("{")
    names = sorted(p.name for p in ref.glob("*.safetensors"))
    not_done = [n for n in names if n not in journal(dst)["shards"]]
    (dst / STAGING / (not_done[0] + ".partial")).write_bytes(b"garbage")
    (dst / not_done[1]).write_bytes(b"renamed but never journaled")
    r = run_forked(*convert_args(src, dst, "--resume", "-q"))
    assert r.returncode == 0, r.stderr
    assert_same_tree(dst, ref)
    assert_staging_clean(dst)


def test_runner_without_fork(src, ref, scratch):
    """run_forked's other path (a fresh interpreter, used while a non-daemon thread runs
    here) kills and reports the same way."""
    stop = threading.Event()
    t = threading.Thread(target=stop.wait)
    t.start()
    try:
        dst = scratch / "out"
        r = run_forked(*convert_args(src, dst, "-q"), kill=Kill(3, "after", signal.SIGTERM, call="replace", target="of-000"))
    finally:
        stop.set()
        t.join()
    assert r.returncode == 130 and "--resume" in r.stderr, r.stderr
    check_killed_then_resume(src, ref, dst, r.returncode, r.stderr, signal.SIGTERM)
