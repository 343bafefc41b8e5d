"""Hub in, Hub out: convert straight from a Hub repo and push while converting.

Source: :func:`open_hub_checkpoint` resolves ``org/name[@revision]`` to one commit,
downloads config.json, the index and the small side files (into the HF cache), and
reads every safetensors header with HTTP range requests, so the plan is made before
any tensor byte is fetched. Each shard's ``TensorInfo.path`` is where the shard
*will* be: its HF cache snapshot path, or ``DST/.cache/huggingface/qstream/downloads/<file>`` with
``--low-disk``. :class:`SourceFetcher` downloads a shard when the executor first
opens it (prefetching the next one in the background, never more than two
unreleased shards) and, with ``--low-disk``, deletes it as soon as the executor
releases it. With ``HF_HUB_OFFLINE=1`` a cached snapshot is opened like a folder.

Destination: :class:`HubPusher` creates the repo, records the branch head, uploads
each finished output shard from a background thread (``preupload_lfs_files``:
Xet when ``hf_xet`` is importable, LFS with ``HF_HUB_DISABLE_XET=1``), and at the
end makes one ``create_commit`` with every shard, the index, config.json, the side
files and the card, with ``parent_commit`` set. Rerunning an interrupted push
re-sends nothing the Hub already has: LFS objects already stored are skipped by
the LFS batch API, and Xet deduplicates the chunks it already holds.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import re
import shutil
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .convert import Hooks
from .errors import QStreamError
from .plan import Plan
from .safetensors_io import ShardHeader, header_length, parse_header, read_header
from .source import GENERATED, INDEX_NAME, WEIGHT_SUFFIXES, Checkpoint, _load_json, collect_tensors, open_checkpoint
from .writer import STAGING_DIR

DOWNLOADS = "downloads"  # DST/.cache/huggingface/qstream/downloads: source shards fetched with --low-disk
PUSH_STATE = "push.json"  # DST/.cache/huggingface/qstream/push.json: what an interrupted push was doing
HEADER_PROBE = 256 << 10  # first range request per shard; most headers fit
HEADER_THREADS = 8  # shard headers read concurrently
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")


def is_repo_id(text: str) -> bool:
    """``org/name`` as the Hub spells repo ids (a path that does not exist locally)."""
    return bool(_REPO_ID.fullmatch(text)) and ".." not in text and "--" not in text and not text.endswith(".git")


def _hf():
    """huggingface_hub, imported on first use (it reads HF_ENDPOINT/HF_HOME at import)."""
    import huggingface_hub
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()  # qstream draws its own progress
    return huggingface_hub


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _hub_error(what: str, e: Exception, repo_id: str, revision: str | None = None, source: bool = False) -> QStreamError:
    """One actionable sentence for an error raised by huggingface_hub (``source``: the repo
    is SRC, so "not found" also means there is no local folder of that name)."""
    from huggingface_hub import errors as E

    import httpx2

    rev = f" at revision {revision!r}" if revision else ""
    if isinstance(e, E.RevisionNotFoundError):
        return QStreamError(f"{repo_id}: revision {revision!r} does not exist; pass an existing branch, tag or commit to --revision.")
    if isinstance(e, E.GatedRepoError):
        return QStreamError(f"{repo_id} is gated: accept its conditions on the Hub, then log in with `hf auth login` or set HF_TOKEN.")
    if isinstance(e, E.RepositoryNotFoundError):
        also = " (and there is no local folder of that name)" if source else ""
        return QStreamError(f"{repo_id}: repository not found on {_endpoint()}{also}; check the name, or log in "
                            "with `hf auth login` / set HF_TOKEN if it is private.")
    if isinstance(e, E.RemoteEntryNotFoundError):
        return QStreamError(f"{repo_id}{rev}: {what}: the file is missing from the repo; fix the repo or pick another --revision.")
    if isinstance(e, E.LocalEntryNotFoundError) or isinstance(e, E.OfflineModeIsEnabled):
        return QStreamError(f"{repo_id}{rev}: {what}: not in the local Hugging Face cache and the Hub is not reachable "
                            "(HF_HUB_OFFLINE is set or there is no network); download it once online first.")
    if isinstance(e, (httpx2.ConnectError, httpx2.TimeoutException, httpx2.NetworkError)):
        return QStreamError(f"{repo_id}: {what}: cannot reach {_endpoint()} ({e.__class__.__name__}); check the "
                            "network, or set HF_HUB_OFFLINE=1 to use a snapshot already in the cache.")
    if isinstance(e, E.HfHubHTTPError):
        status = e.response.status_code if e.response is not None else "?"
        first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        if status in (401, 403):
            return QStreamError(f"{repo_id}: {what}: the Hub refused the token (HTTP {status}); log in with "
                                "`hf auth login` or set HF_TOKEN to a token with write access.")
        return QStreamError(f"{repo_id}: {what} failed (HTTP {status}: {first}); rerun the same command to retry.")
    return QStreamError(f"{repo_id}: {what} failed ({e.__class__.__name__}: {e}); rerun the same command to retry.")


# --------------------------------------------------------------------------- source


@dataclass
class HubCheckpoint(Checkpoint):
    """A checkpoint whose shards are (or will be) downloaded from a Hub repo."""

    repo_id: str = ""
    revision: str | None = None
    commit: str = ""
    sizes: dict[Path, int] = field(default_factory=dict)  # shard path -> size in bytes
    remote: dict[Path, str] = field(default_factory=dict)  # shard path -> filename in the repo, if it must be downloaded
    download_dir: Path | None = None  # set with --low-disk: shards land (and are deleted) here

    @property
    def label(self) -> str:
        return f"{self.repo_id}@{self.commit[:10]}"

    def fingerprint(self) -> str:
        """Identity of the source: repo, commit, shard names and sizes, tensors, config."""
        h = hashlib.sha256(f"hub:{self.repo_id}@{self.commit}\n".encode())
        for s in self.shards:
            h.update(f"{s.path.name}:{self.sizes[s.path]}\n".encode())
        for t in self.tensors.values():
            h.update(f"{t.name}:{t.dtype}:{t.shape}:{t.path.name}:{t.begin}\n".encode())
        h.update(json.dumps(self.config, sort_keys=True).encode())
        return h.hexdigest()


def _snapshot_dir(repo_id: str, commit: str) -> Path:
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    return Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model") / "snapshots" / commit


def _record_ref(repo_id: str, revision: str, commit: str) -> None:
    """Remember revision -> commit in the HF cache (``refs/<revision>``, as hf_hub_download does
    for a branch), so that HF_HUB_OFFLINE=1 finds this snapshot later; shards are downloaded
    by commit hash, which alone does not write the ref."""
    if revision == commit:
        return
    ref = _snapshot_dir(repo_id, commit).parent.parent / "refs" / revision
    try:
        if ref.is_file() and ref.read_text() == commit:
            return
        ref.parent.mkdir(parents=True, exist_ok=True)
        tmp = ref.with_name(f"{ref.name}.{os.getpid()}.tmp")
        tmp.write_text(commit)
        os.replace(tmp, ref)
    except OSError:
        pass  # a read-only cache still converts; only offline reuse by branch name is lost


def _read_remote_header(repo_id: str, filename: str, commit: str, size: int, path: Path) -> ShardHeader:
    """A shard's header through HTTP range requests on its resolve URL (no tensor bytes)."""
    hf = _hf()
    from huggingface_hub.utils import build_hf_headers, hf_raise_for_status, http_stream_backoff

    label = f"{repo_id}/{filename}"
    url = hf.hf_hub_url(repo_id, filename, revision=commit)
    headers = build_hf_headers()

    def get(start: int, stop: int) -> bytes:
        out = bytearray()
        with http_stream_backoff("GET", url, headers={**headers, "Range": f"bytes={start}-{stop - 1}"},
                                 follow_redirects=True) as r:
            hf_raise_for_status(r)
            skip = start if r.status_code == 200 else 0  # server ignored Range: skip to start, stop early
            for chunk in r.iter_bytes():
                if skip:
                    cut = min(skip, len(chunk))
                    chunk, skip = chunk[cut:], skip - cut
                out += chunk
                if len(out) >= stop - start:
                    break
        return bytes(out[: stop - start])

    try:
        head = get(0, min(size, HEADER_PROBE))
        n = header_length(head, size, label)
        raw = head[8: 8 + n]
        if len(raw) < n:
            raw += get(len(head), 8 + n)
    except QStreamError:
        raise
    except Exception as e:
        raise _hub_error(f"reading the header of {filename}", e, repo_id, commit, source=True) from e
    if len(raw) != n:
        raise QStreamError(f"{label}: the Hub returned {len(raw)} of the {n} header bytes; rerun, or re-upload the file.")
    return parse_header(raw, size, path, label=label)


def _download(repo_id: str, filename: str, commit: str, local_dir: Path | None) -> Path:
    hf = _hf()
    try:
        p = hf.hf_hub_download(repo_id, filename, revision=commit, local_dir=local_dir)
    except Exception as e:
        raise _hub_error(f"downloading {filename}", e, repo_id, commit, source=True) from e
    return Path(p)


def open_hub_checkpoint(repo_id: str, revision: str | None = None, download_dir: Path | None = None) -> HubCheckpoint:
    """Resolve a Hub repo to one commit and read everything the plan needs: config.json,
    the index, side files (downloaded into the HF cache) and every shard header (range
    requests). No tensor bytes are downloaded. With ``download_dir`` (``--low-disk``),
    shards not already in the cache will be downloaded there and deleted after use."""
    hf = _hf()
    from huggingface_hub import constants

    if constants.is_offline_mode():
        return _open_cached_snapshot(repo_id, revision, download_dir)
    api = hf.HfApi()
    try:
        info = api.model_info(repo_id, revision=revision, files_metadata=True)
    except Exception as e:
        import httpx2

        if isinstance(e, (httpx2.ConnectError, httpx2.TimeoutException)):
            try:
                return _open_cached_snapshot(repo_id, revision, download_dir)
            except QStreamError:
                pass
        raise _hub_error("reading the repo", e, repo_id, revision, source=True) from e
    commit = info.sha or ""
    _record_ref(repo_id, revision or "main", commit)
    sizes = {s.rfilename: (s.size if s.size is not None else (s.lfs.size if s.lfs else 0)) for s in info.siblings or []}
    where = f"{repo_id}@{revision or 'main'}"
    snap = _snapshot_dir(repo_id, commit)

    if "config.json" not in sizes:
        raise QStreamError(f"{where}: the repo has no config.json; a Hugging Face checkpoint needs it.")
    for small in ("config.json", INDEX_NAME):
        if small in sizes:
            _download(repo_id, small, commit, None)
    config = _load_json(snap / "config.json", "config.json")
    weight_map = None
    if INDEX_NAME in sizes:
        index = _load_json(snap / INDEX_NAME, INDEX_NAME)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise QStreamError(f"{where}: {INDEX_NAME} has no weight_map; fix the repo.")
        files: list[str] = []
        for fname in weight_map.values():
            if fname not in files:
                files.append(fname)
        for fname in files:
            if fname not in sizes:
                raise QStreamError(f"{where}: {INDEX_NAME} names shard {fname}, which is not in the repo; "
                                   "the upload is incomplete: fix the repo or pick another --revision.")
    else:
        files = sorted(f for f in sizes if f.endswith(".safetensors") and "/" not in f)
        if "model.safetensors" in files:
            files = ["model.safetensors"]
        if not files:
            raise QStreamError(f"{where}: no safetensors files in the repo (and no {INDEX_NAME}); qstream reads "
                               "safetensors checkpoints only.")

    shard_sizes: dict[Path, int] = {}
    remote: dict[Path, str] = {}
    for fname in files:
        cached = snap / fname
        if cached.is_file():  # already in the cache: read it there, never delete it
            path = cached
        else:
            path = (download_dir / fname) if download_dir is not None else cached
            remote[path] = fname
        shard_sizes[path] = sizes[fname]

    def header(path: Path) -> ShardHeader:
        if path in remote:
            return _read_remote_header(repo_id, remote[path], commit, shard_sizes[path], path)
        return read_header(path)

    with ThreadPoolExecutor(HEADER_THREADS) as pool:  # one round trip per shard: overlap them
        shards = list(pool.map(header, shard_sizes))
    tensors = collect_tensors(shards, weight_map)

    used = set(files)
    side: list[Path] = []
    skipped: list[Path] = []
    for rel in sorted(sizes):
        if any(part.startswith(".") for part in rel.split("/")) or rel in used or rel in GENERATED:
            continue
        if rel.endswith(WEIGHT_SUFFIXES):
            skipped.append(Path(rel))
            continue
        _download(repo_id, rel, commit, None)
        side.append(Path(rel))
    card = None
    if "README.md" in sizes:
        card = _download(repo_id, "README.md", commit, None).read_text(encoding="utf-8", errors="replace")
    return HubCheckpoint(snap, config, shards, tensors, side, skipped, card, repo_id=repo_id, revision=revision,
                         commit=commit, sizes=shard_sizes, remote=remote, download_dir=download_dir)


def _open_cached_snapshot(repo_id: str, revision: str | None, download_dir: Path | None) -> HubCheckpoint:
    """Offline: the cached snapshot of ``revision`` opened like a local folder."""
    hf = _hf()
    try:
        folder = Path(hf.snapshot_download(repo_id, revision=revision, local_files_only=True))
    except Exception as e:
        raise _hub_error("opening the cached snapshot", e, repo_id, revision, source=True) from e
    ck = open_checkpoint(folder)
    return HubCheckpoint(ck.root, ck.config, ck.shards, ck.tensors, ck.side_files, ck.skipped_files, ck.source_card,
                         repo_id=repo_id, revision=revision, commit=folder.name,
                         sizes={s.path: s.path.stat().st_size for s in ck.shards}, remote={}, download_dir=download_dir)


class SourceFetcher:
    """Downloads Hub shards when first needed (and the next one in the background) and,
    with ``delete`` (``--low-disk``), deletes each once the executor releases it."""

    def __init__(self, ckpt: HubCheckpoint, order: list[Path], delete: bool, max_live: int = 2,
                 on_disk_change: Callable[[], None] = lambda: None) -> None:
        self.ckpt = ckpt
        self.order = [p for p in order if p in ckpt.remote]
        self.delete = delete
        self.max_live = max_live
        self.on_disk_change = on_disk_change
        self._lock = threading.Lock()
        self._futures: dict[Path, Future] = {}
        self._released: set[Path] = set()
        self._closed = False

    def _download(self, path: Path, fut: Future) -> None:
        try:
            name = self.ckpt.remote[path]
            d = self.ckpt.download_dir
            local_dir = d if d is not None and path.is_relative_to(d) else None
            got = _download(self.ckpt.repo_id, name, self.ckpt.commit, local_dir)
            if os.path.abspath(got) != os.path.abspath(path):
                raise QStreamError(f"{self.ckpt.repo_id}/{name}: downloaded to {got}, expected {path}; "
                                   "HF_HOME/HF_HUB_CACHE changed while converting, rerun.")
            if got.stat().st_size != self.ckpt.sizes[path]:
                raise QStreamError(f"{self.ckpt.repo_id}/{name}: downloaded {got.stat().st_size} bytes, the repo "
                                   f"lists {self.ckpt.sizes[path]}; rerun to download it again.")
            self.on_disk_change()
            fut.set_result(path)
        except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
            fut.set_exception(e)

    def fetch(self, path: Path) -> None:
        if path not in self.ckpt.remote:
            return
        with self._lock:
            fut = self._futures.get(path)
            mine = fut is None
            if mine:
                fut = self._futures[path] = Future()
        if mine:
            self._download(path, fut)
        fut.result()
        self._prefetch()

    def release(self, path: Path) -> None:
        if path not in self.ckpt.remote:
            return
        self.on_disk_change()  # the peak is just before the delete
        with self._lock:
            self._released.add(path)
        if self.delete:
            _unlink_download(path, self.ckpt.download_dir)
        self._prefetch()

    def _prefetch(self) -> None:
        with self._lock:
            if self._closed:
                return
            live = sum(1 for p in self._futures if p not in self._released)
            if live >= self.max_live:
                return
            nxt = next((p for p in self.order if p not in self._futures and p not in self._released), None)
            if nxt is None:
                return
            fut = self._futures[nxt] = Future()
        threading.Thread(target=self._download, args=(nxt, fut), name="qstream-prefetch", daemon=True).start()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            pending = [f for f in self._futures.values() if not f.done()]
        for f in pending:
            try:
                f.result(timeout=600)
            except BaseException:  # noqa: BLE001 - a prefetch nobody waited for
                pass
        if self.delete and self.ckpt.download_dir is not None:
            shutil.rmtree(self.ckpt.download_dir, ignore_errors=True)


def _unlink_download(path: Path, download_dir: Path | None) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    if download_dir is not None:  # hf_hub_download(local_dir=...) keeps a small metadata file per download
        rel = path.relative_to(download_dir) if path.is_relative_to(download_dir) else Path(path.name)
        meta = download_dir / ".cache" / "huggingface" / "download" / rel
        for extra in (meta.with_name(meta.name + ".metadata"), meta.with_name(meta.name + ".lock")):
            try:
                extra.unlink()
            except FileNotFoundError:
                pass


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
    from .journal import Journal

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
        self._thread: threading.Thread | None = None

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
        self._thread = threading.Thread(target=self._worker, name="qstream-upload", daemon=True)
        self._thread.start()

    def _save_state(self) -> None:
        path = self.dst / STAGING_DIR / PUSH_STATE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({
            "repo_id": self.repo_id, "branch": self.branch, "fingerprint": self.fingerprint,
            "parent_commit": self.parent, "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }, indent=1), encoding="utf-8")
        os.replace(tmp, path)

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
        self._queue.put(None)
        assert self._thread is not None
        self._thread.join()
        small = [p.as_posix() for p in plan.source.side_files] + [g for g in GENERATED if (self.dst / g).is_file()]
        ops = list(self.ops)
        ops += [hf.CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(self.dst / rel)) for rel in small]
        ours = {s.filename for s in plan.shards}
        stale = sorted(f for f in self.existing if f.endswith(".safetensors") and "/" not in f and f not in ours)
        ops += [hf.CommitOperationDelete(path_in_repo=f) for f in stale]
        from . import __version__

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
        self.result = PushResult(self.repo_id, info.oid, info.commit_url, [op.path_in_repo for op in self.ops])
        return self.result

    def close(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._error = self._error or KeyboardInterrupt()
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
