"""Hub in: convert straight from a Hub repo.

Source: :func:`open_hub_checkpoint` resolves ``org/name[@revision]`` to one commit,
downloads config.json, the index and the small side files (into the HF cache), and
reads every safetensors header with HTTP range requests, so the plan is made before
any tensor byte is fetched. Each shard's ``TensorInfo.path`` is where the shard
*will* be: its HF cache snapshot path, or ``DST/.cache/huggingface/qstream/downloads/<file>`` with
``--low-disk``. :class:`SourceFetcher` downloads the shards in the plan's read order,
two at a time and back to back, so that the link never idles (a shard the executor opens
before its turn is fetched then); with ``--low-disk`` it keeps at most two unreleased
shards on disk and deletes each as soon as the executor releases it. With
``HF_HUB_OFFLINE=1`` a cached snapshot is opened like a folder. :func:`download_shards`
fetches every shard up front, for ``--calibrate`` (its pass reads all layers first).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..atomic import write_atomic
from .checkpoint import GENERATED, INDEX_NAME, WEIGHT_SUFFIXES, Checkpoint, _load_json, collect_tensors, open_local
from ..errors import QStreamError
from ..safetensors_io import ShardHeader, header_length, parse_header, read_header

DOWNLOADS = "downloads"  # DST/.cache/huggingface/qstream/downloads: source shards fetched with --low-disk
HEADER_PROBE = 256 << 10  # first range request per shard; most headers fit
HEADER_THREADS = 8  # shard headers read concurrently
# shards downloaded at once: one HTTP stream at a time reached 170 of a 200 MB/s link here
# (hf_hub_download's per-file round trips, one TCP stream), two fill it as snapshot_download does
DOWNLOADS_IN_FLIGHT = 2
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


# huggingface_hub's HTTP client (httpx2 in huggingface_hub 2.x, httpx before) is not a qstream
# dependency: its transport errors are recognised by class name, never by importing it here
_TRANSPORT_ERRORS = {"ConnectError", "TimeoutException", "NetworkError"}


def _is_network_error(e: BaseException) -> bool:
    """The Hub could not be reached (refused, timed out, connection lost)."""
    if isinstance(e, (ConnectionError, TimeoutError)):
        return True
    return any(c.__name__ in _TRANSPORT_ERRORS and c.__module__.split(".")[0].startswith("httpx")
               for c in type(e).__mro__)


def _hub_error(what: str, e: Exception, repo_id: str, revision: str | None = None, source: bool = False) -> QStreamError:
    """One actionable sentence for an error raised by huggingface_hub (``source``: the repo
    is SRC, so "not found" also means there is no local folder of that name)."""
    from huggingface_hub import errors as E

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
    if _is_network_error(e):
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
        write_atomic(ref, commit, tmp=ref.with_name(f"{ref.name}.{os.getpid()}.tmp"))
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
        if _is_network_error(e):
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
    ck = open_local(folder)
    return HubCheckpoint(ck.root, ck.config, ck.shards, ck.tensors, ck.side_files, ck.skipped_files, ck.source_card,
                         repo_id=repo_id, revision=revision, commit=folder.name,
                         sizes={s.path: s.path.stat().st_size for s in ck.shards}, remote={}, download_dir=download_dir)


def _fetch_shard(ckpt: HubCheckpoint, path: Path) -> None:
    """Download one remote shard of ``ckpt`` to ``path`` (the HF cache, or --low-disk's
    folder) and check it is where and as large as the plan expects."""
    name = ckpt.remote[path]
    d = ckpt.download_dir
    local_dir = d if d is not None and path.is_relative_to(d) else None
    got = _download(ckpt.repo_id, name, ckpt.commit, local_dir)
    if os.path.abspath(got) != os.path.abspath(path):
        raise QStreamError(f"{ckpt.repo_id}/{name}: downloaded to {got}, expected {path}; "
                           "HF_HOME/HF_HUB_CACHE changed while converting, rerun.")
    if got.stat().st_size != ckpt.sizes[path]:
        raise QStreamError(f"{ckpt.repo_id}/{name}: downloaded {got.stat().st_size} bytes, the repo "
                           f"lists {ckpt.sizes[path]}; rerun to download it again.")


def download_shards(ckpt: HubCheckpoint, log: Callable[[str], None] | None = None) -> None:
    """Download every shard of ``ckpt`` still remote into the HF cache now, ``DOWNLOADS_IN_FLIGHT``
    at a time, each checked against the size the repo lists, then mark them local (what
    ``--calibrate`` needs: its pass reads every decoder layer before the conversion starts)."""
    todo = list(ckpt.remote)
    if not todo:
        return
    if log is not None:
        total = sum(ckpt.sizes.get(p, 0) for p in todo)
        log(f"downloading {len(todo)} source shards ({total / 1e9:.2f} GB) of {ckpt.label} before the calibration pass")

    with ThreadPoolExecutor(DOWNLOADS_IN_FLIGHT) as pool:
        list(pool.map(lambda p: _fetch_shard(ckpt, p), todo))
    ckpt.remote.clear()  # all in the cache: nothing left for a SourceFetcher


class SourceFetcher:
    """Downloads Hub shards when first needed, and the next ones in the plan's order in the
    background, ``in_flight`` at a time, each started as soon as one in flight ends (the
    executor's threads work on two source shards at once: a prefetch that waited for a
    release would leave the link idle). With ``delete`` (``--low-disk``), at most
    ``max_live`` shards are on disk unreleased, and each is deleted once released."""

    def __init__(self, ckpt: HubCheckpoint, order: list[Path], delete: bool, max_live: int = 2,
                 on_disk_change: Callable[[], None] = lambda: None, in_flight: int = DOWNLOADS_IN_FLIGHT) -> None:
        self.ckpt = ckpt
        self.order = [p for p in order if p in ckpt.remote]
        self.delete = delete
        self.max_live = max_live
        self.in_flight = in_flight
        self.on_disk_change = on_disk_change
        self._lock = threading.Lock()
        self._futures: dict[Path, Future] = {}
        self._released: set[Path] = set()
        self._closed = False
        self._threads: list[threading.Thread] = []  # prefetches started; close() joins them

    def _download(self, path: Path, fut: Future) -> None:
        try:
            _fetch_shard(self.ckpt, path)
            self.on_disk_change()
            fut.set_result(path)
        except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
            fut.set_exception(e)
            return
        self._prefetch()  # the link is free: the next one

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
            while not self._closed:
                if sum(1 for f in self._futures.values() if not f.done()) >= self.in_flight:
                    return  # a download in flight starts the next one when it ends
                live = sum(1 for p in self._futures if p not in self._released)
                if self.delete and live >= self.max_live:
                    return
                nxt = next((p for p in self.order if p not in self._futures and p not in self._released), None)
                if nxt is None:
                    return
                fut = self._futures[nxt] = Future()
                t = threading.Thread(target=self._download, args=(nxt, fut), name="qstream-prefetch", daemon=True)
                self._threads.append(t)
                t.start()  # under the lock: close() never sees a thread it cannot join yet

    def close(self) -> None:
        """Stop prefetching and wait for every prefetch thread to end (a download in flight
        finishes or fails first: none outlives the fetcher, none writes into a folder being
        removed)."""
        with self._lock:
            self._closed = True
            threads = list(self._threads)
        for t in threads:
            t.join()
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
