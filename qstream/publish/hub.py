"""Hub in, Hub out: convert straight from a Hub repo and push while converting.

Source: :mod:`qstream.sources.hub_source` (:func:`open_hub_checkpoint`, :class:`SourceFetcher`).

Destination: :class:`HubPusher` creates the repo, records the branch head, uploads
each finished output shard from a background thread (``preupload_lfs_files``:
Xet when ``hf_xet`` is importable, LFS with ``HF_HUB_DISABLE_XET=1``; two at a time), and at the
end makes one ``create_commit`` with every shard, the index, config.json, the side
files and the card, with ``parent_commit`` set. Rerunning an interrupted push
re-sends nothing the Hub already has: LFS objects already stored are skipped by
the LFS batch API, and Xet deduplicates the chunks it already holds.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..atomic import os_error, write_atomic
from ..sources.checkpoint import GENERATED, Checkpoint
from ..convert import Hooks
from ..errors import QStreamError
from ..sources.hub_source import HubCheckpoint, SourceFetcher, _hf, _hub_error
from ..plan.plan import Plan
from ..writer import STAGING_DIR

PUSH_STATE = "push.json"  # DST/.cache/huggingface/qstream/push.json: what an interrupted push was doing
UPLOAD_WORKERS = 2  # finished shards uploaded at once: one slow request does not idle the uplink


def fetch_order(plan: Plan) -> list[Path]:
    """Source files in the order the plan first reads them: the prefetch order. Only a
    hint: a fused partner the executor needs earlier is simply fetched when opened."""
    order: dict[Path, None] = {}
    for op in plan.ops:
        order.setdefault(op.source.path)
        scale = getattr(op, "src_scale", None)
        if scale is not None:
            order.setdefault(scale.path)
    return list(order)


# --------------------------------------------------------------------------- disk meter


class DiskMeter:
    """High-water mark of the bytes under some folders: sampled every few milliseconds and
    at every event that can be a peak (a download done, a shard finished, before a delete)."""

    def __init__(self, folders: list[Path], interval: float = 0.005) -> None:
        self.folders = folders
        self.interval = interval
        self.peak = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="qstream-disk-meter", daemon=True)

    def bytes_now(self) -> int:
        total = 0
        for folder in self.folders:
            for dirpath, _, files in os.walk(folder):
                for f in files:
                    try:
                        total += os.lstat(os.path.join(dirpath, f)).st_size
                    except FileNotFoundError:
                        pass
        return total

    def sample(self) -> None:
        n = self.bytes_now()
        with self._lock:
            self.peak = max(self.peak, n)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def start(self) -> "DiskMeter":
        self._thread.start()
        return self

    def stop(self) -> int:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self.sample()
        return self.peak


# --------------------------------------------------------------------------- push


def _journal_sha256(dst: Path, path: Path) -> str | None:
    """The SHA-256 the executor's journal recorded for a finished shard, if it matches."""
    from ..journal import Journal

    j = Journal.load(dst / STAGING_DIR)
    rec = j.shards.get(path.name) if j is not None else None
    try:
        if rec and isinstance(rec.get("sha256"), str) and rec.get("size") == path.stat().st_size:
            return rec["sha256"]
    except OSError:
        pass
    return None


def read_push_state(dst: Path) -> dict | None:
    try:
        return json.loads((dst / STAGING_DIR / PUSH_STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def push_resumable(dst: Path, repo_id: str, fingerprint: str) -> bool:
    """Whether DST holds an interrupted push of this same plan to this repo (then the
    same command may reuse DST: everything in it was written by that run)."""
    st = read_push_state(dst) or {}
    same_repo = st.get("repo_id") == repo_id or ("/" not in repo_id and str(st.get("repo_id", "")).endswith("/" + repo_id))
    return same_repo and st.get("fingerprint") == fingerprint


def source_label(ckpt: Checkpoint) -> str:
    """How to name the source to a user: ``org/name@commit`` for a Hub repo, else the folder."""
    return ckpt.label if isinstance(ckpt, HubCheckpoint) else str(ckpt.root)


@dataclass
class PushResult:
    repo_id: str
    commit: str
    url: str
    uploaded: list[str]


class HubPusher:
    """Uploads finished shards in the background and commits everything once at the end."""

    def __init__(self, repo_id: str, dst: Path, fingerprint: str, *, private: bool = False, branch: str | None = None,
                 commit_message: str = "", delete_uploaded: bool = False,
                 log: Callable[[str], None] = lambda msg: None, on_disk_change: Callable[[], None] = lambda: None) -> None:
        self.repo_id = repo_id
        self.dst = dst
        self.fingerprint = fingerprint
        self.private = private
        self.branch = branch or "main"
        self.commit_message = commit_message
        self.delete_uploaded = delete_uploaded
        self.log = log
        self.on_disk_change = on_disk_change
        self.parent: str | None = None
        self.existing: set[str] = set()
        self.ops: list = []
        self.result: PushResult | None = None
        self._queue: queue.Queue = queue.Queue()
        self._cond = threading.Condition()
        self._handed: set[str] = set()  # shards given to add_shard
        self._uploaded: set[str] = set()  # shards whose upload finished (and, with delete_uploaded, deleted)
        self._busy = 0
        self._error: BaseException | None = None
        self._threads: list[threading.Thread] = []

    # ---------------------------------------------------------------- setup
    def connect(self) -> None:
        """Create the repo (and branch) if needed and record the branch head. Call it before
        touching DST: it fails fast on a missing token or a refused repo."""
        hf = _hf()
        api = hf.HfApi()
        if hf.get_token() is None:
            raise QStreamError(f"--push-to-hub {self.repo_id}: no Hugging Face token found; log in with "
                               "`hf auth login` or set HF_TOKEN to a token with write access.")
        try:
            url = api.create_repo(self.repo_id, private=self.private, exist_ok=True)
            self.repo_id = url.repo_id
            if self.branch != "main":
                api.create_branch(self.repo_id, branch=self.branch, exist_ok=True)
            info = api.model_info(self.repo_id, revision=self.branch)
        except Exception as e:
            raise _hub_error(f"preparing the push to branch {self.branch!r}", e, self.repo_id) from e
        self.parent = info.sha
        self.existing = {s.rfilename for s in info.siblings or []}

    def validate_card(self, card: str) -> None:
        """The Hub's own check of the card's metadata (``POST /api/validate-yaml``, which
        create_commit would run at the very end), made before the first shard is uploaded."""
        hf = _hf()
        try:
            hf.ModelCard(card).validate(repo_type="model")
        except ValueError as e:
            msg = " ".join(str(e).split())
            raise QStreamError(f"{self.repo_id}: the Hub rejects the model card's metadata ({msg}); nothing was "
                               "uploaded. Pass --base-model ORG/NAME with the Hub id of the source model, or fix "
                               "the source README.md's metadata (license, language, ...).") from e
        except Exception as e:
            raise _hub_error("checking the model card's metadata", e, self.repo_id) from e

    def start(self) -> None:
        """Record the push in DST (so the same command resumes it) and start the uploader."""
        assert self.parent is not None, "connect() first"
        self._save_state()
        self._threads = [threading.Thread(target=self._worker, name=f"qstream-upload-{i}", daemon=True)
                         for i in range(UPLOAD_WORKERS)]
        for t in self._threads:
            t.start()

    def _save_state(self) -> None:
        path = self.dst / STAGING_DIR / PUSH_STATE
        data = json.dumps({
            "repo_id": self.repo_id, "branch": self.branch, "fingerprint": self.fingerprint,
            "parent_commit": self.parent, "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }, indent=1)
        try:
            write_atomic(path, data, tmp=path.with_suffix(".tmp"))
        except OSError as e:
            raise os_error(path, e) from e

    # ---------------------------------------------------------------- uploads
    def _worker(self) -> None:
        hf = _hf()
        api = hf.HfApi()
        while True:
            path = self._queue.get()
            if path is None:
                return
            try:
                if self._error is None:
                    op = hf.CommitOperationAdd(path_in_repo=path.name, path_or_fileobj=str(path))
                    sha = _journal_sha256(self.dst, path)
                    if sha is not None:  # hashed by the executor already: do not read the shard again
                        op.upload_info.sha256 = bytes.fromhex(sha)
                    try:
                        api.preupload_lfs_files(self.repo_id, [op], revision=self.branch, free_memory=True)
                    except Exception as e:
                        raise _hub_error(f"uploading {path.name}", e, self.repo_id) from e
                    with self._cond:
                        self.ops.append(op)
                    self.log(f"uploaded {path.name}")
                    # An uploaded LFS/Xet file is committed by sha256 and size alone (free_memory
                    # dropped its path); a shard the Hub wants as a regular file must stay.
                    if self.delete_uploaded and op._is_uploaded:
                        self.on_disk_change()  # the peak is just before the delete
                        path.unlink()
                    with self._cond:
                        self._uploaded.add(path.name)
            except BaseException as e:  # noqa: BLE001 - raised in the converting thread
                self._error = e
            finally:
                with self._cond:
                    self._busy -= 1
                    self._cond.notify_all()

    def _raise_error(self) -> None:
        if self._error is not None:
            e = self._error
            if isinstance(e, QStreamError):
                raise e
            raise QStreamError(f"{self.repo_id}: upload failed ({e.__class__.__name__}: {e}); rerun the same "
                               "command: what the Hub already has is not sent again.") from e

    def wait(self) -> None:
        """Block until every shard handed over is uploaded."""
        with self._cond:
            while self._busy and self._error is None:
                self._cond.wait()
        self._raise_error()

    def wait_uploaded(self, names: list[str], staging: Path, patience: float = 60.0) -> None:
        """Block until the shards ``names`` are uploaded (pacing the conversion so that
        finished shards do not pile up on disk). Gives up waiting for a shard that the
        executor has not handed over ``patience`` seconds after its file stopped being
        written (its finisher failed: the executor reports that error itself)."""
        since: dict[str, float] = {}
        with self._cond:
            while self._error is None:
                missing = [n for n in names if n not in self._uploaded]
                if not missing:
                    break
                stalled = [n for n in missing if n not in self._handed]
                if stalled:
                    n = stalled[0]
                    if (staging / (n + ".partial")).exists():
                        since.pop(n, None)
                    elif time.monotonic() - since.setdefault(n, time.monotonic()) > patience:
                        return
                self._cond.wait(1.0)
        self._raise_error()

    def add_shard(self, path: Path) -> None:
        """Queue a finished shard for upload (called from the executor's finisher thread)."""
        self._raise_error()
        with self._cond:
            self._busy += 1
            self._handed.add(path.name)
            self._cond.notify_all()
        self._queue.put(path)

    # ---------------------------------------------------------------- commit
    def commit(self, plan: Plan) -> PushResult:
        """Wait for the uploads, then one commit: shards, side files, index, config, card."""
        hf = _hf()
        api = hf.HfApi()
        self.wait()
        for t in self._threads:
            self._queue.put(None)
        for t in self._threads:
            t.join()
        small = [p.as_posix() for p in plan.source.side_files] + [g for g in GENERATED if (self.dst / g).is_file()]
        ops = sorted(self.ops, key=lambda op: op.path_in_repo)  # the commit does not depend on upload order
        ops += [hf.CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(self.dst / rel)) for rel in small]
        ours = {s.filename for s in plan.shards}
        stale = sorted(f for f in self.existing if f.endswith(".safetensors") and "/" not in f and f not in ours)
        ops += [hf.CommitOperationDelete(path_in_repo=f) for f in stale]
        from .. import __version__

        schemes = ", ".join(plan.schemes(converted_only=True)).upper() or "unquantized"
        base = plan.source.repo_id if isinstance(plan.source, HubCheckpoint) else plan.source.root.name
        message = self.commit_message or f"Add {base} in {schemes} (qstream {__version__})"
        description = "Converted and uploaded by qstream while converting." + (
            f" Removed {len(stale)} stale shard(s) of an earlier upload." if stale else "")
        try:
            info = api.create_commit(self.repo_id, ops, commit_message=message, commit_description=description,
                                     revision=self.branch, parent_commit=self.parent)
        except Exception as e:
            from huggingface_hub import errors as E

            if isinstance(e, E.HfHubHTTPError) and e.response is not None and e.response.status_code == 412:
                raise QStreamError(f"{self.repo_id}: branch {self.branch!r} moved while converting (someone else "
                                   "committed); rerun the same command: uploaded shards are not sent again.") from e
            raise _hub_error("committing", e, self.repo_id) from e
        try:
            (self.dst / STAGING_DIR / PUSH_STATE).unlink()
        except FileNotFoundError:
            pass
        self.result = PushResult(self.repo_id, info.oid, info.commit_url, sorted(op.path_in_repo for op in self.ops))
        return self.result

    def close(self) -> None:
        alive = [t for t in self._threads if t.is_alive()]
        if alive:
            self._error = self._error or KeyboardInterrupt()
            for _ in alive:
                self._queue.put(None)


# --------------------------------------------------------------------------- hooks


class HubHooks(Hooks):
    """The executor's hooks for a Hub source and/or a Hub destination (and the disk meter)."""

    def __init__(self, plan: Plan, dst: Path, *, low_disk: bool = False, pusher: HubPusher | None = None,
                 meter: DiskMeter | None = None) -> None:
        self.plan = plan
        self.dst = dst
        self.pusher = pusher
        self.meter = meter
        src = plan.source
        sample = meter.sample if meter is not None else (lambda: None)
        self.fetcher = (SourceFetcher(src, fetch_order(plan), delete=low_disk, on_disk_change=sample)
                        if isinstance(src, HubCheckpoint) and src.remote else None)
        if pusher is not None:
            pusher.on_disk_change = sample

    def before_shard(self, index: int) -> None:
        """With --low-disk and --push-to-hub, output shard ``index`` starts only once the
        shards before ``index - 1`` are uploaded and deleted: at most two output shards are
        on disk (one being written, one being finished and uploaded)."""
        pusher = self.pusher
        if pusher is None or not pusher.delete_uploaded or index < 2:
            return
        names = [s.filename for s in self.plan.shards]
        pusher.wait_uploaded(names[: index - 1], self.dst / STAGING_DIR)

    def fetch(self, path: Path) -> None:
        if self.fetcher is not None:
            self.fetcher.fetch(path)

    def release(self, path: Path) -> None:
        if self.fetcher is not None:
            self.fetcher.release(path)

    def shard_done(self, path: Path) -> None:
        if self.meter is not None:
            self.meter.sample()
        if self.pusher is not None:
            self.pusher.add_shard(path)

    def finished(self, dst: Path) -> None:
        if self.fetcher is not None:
            self.fetcher.close()
            self.fetcher = None
        if self.pusher is not None:
            self.pusher.commit(self.plan)

    def close(self) -> None:
        """Stop background work after an error or an interrupt (downloads kept for a rerun)."""
        if self.pusher is not None:
            self.pusher.close()
        if self.meter is not None:
            self.meter.stop()
