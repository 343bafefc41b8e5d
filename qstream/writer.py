"""The output folder: shards written at planned offsets, then the small files.

Shards are written under a hidden temporary name, fsynced and renamed when
complete. While a shard is written, the kernel is asked to start writing its dirty
pages back every WRITEBACK_BYTES (Linux ``sync_file_range(SYNC_FILE_RANGE_WRITE)``,
which does not wait), so the disk writes overlap the conversion instead of all
happening in the final fsync (by default Linux starts writing back only when dirty
pages reach 10 % of RAM or are 30 s old). The shard's SHA-256 (for the journal and the
Hub) is computed by a background thread as the written prefix of the file grows (items
finish roughly in offset order), reading the bytes back from the page cache and then
dropping them, so neither the hash nor the pages wait for the end of the shard. Side files, the index, config.json and the model card are written
last (each atomically), so a folder holding config.json is a finished
conversion.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import hashlib
import json
import os
import shutil
import sys
import threading
from pathlib import Path

import numpy as np

from . import atomic
from .atomic import os_error as _os_error
from .errors import QStreamError
from .plan.ops import OutShard
from .safetensors_io import _fadvise_dontneed
from .schemes import FP4_DTYPE

# DST's staging folder (shards being written, the journal, push state, --low-disk downloads).
# Under .cache/huggingface/, which `hf upload` / upload_folder never publish (huggingface_hub's
# DEFAULT_IGNORE_PATTERNS), so a finished output can keep its journal (resume and repair).
STAGING_DIR = ".cache/huggingface/qstream"

WRITEBACK_BYTES = 32 << 20


def _sync_file_range():
    """libc sync_file_range (Linux), or None."""
    if not sys.platform.startswith("linux") or os.environ.get("QSTREAM_NO_WRITEBACK") == "1":
        return None
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_SYNC_FILE_RANGE = _sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2


class ShardWriter:
    """One output shard: header first, then tensor bytes at their planned offsets."""

    def __init__(self, dst: Path, shard: OutShard) -> None:
        self.shard = shard
        self.final = dst / shard.filename
        self.tmp = dst / STAGING_DIR / (shard.filename + ".partial")
        self.data_start = len(shard.header)
        self._dirty = 0  # bytes written since the last writeback request
        self._lock = threading.Condition()
        self._done: dict[int, int] = {}  # written intervals past the prefix: start -> end
        self._prefix = 0  # bytes [0, prefix) are written
        self._closing = False
        self._sha = hashlib.sha256()
        self._hashed = 0
        self._hasher: threading.Thread | None = None
        self._hash_error: BaseException | None = None
        try:
            self.fd = os.open(self.tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        except OSError as e:
            raise _os_error(self.tmp, e) from e
        try:
            if hasattr(os, "posix_fallocate") and shard.file_bytes:
                # Reserve the space now: a full disk fails here, not after an hour.
                try:
                    os.posix_fallocate(self.fd, 0, shard.file_bytes)
                except OSError as e:
                    raise _os_error(self.tmp, e) from e
            self.pwrite(0, shard.header, absolute=True)
        except BaseException:
            self.abort()
            raise
        self._hasher = threading.Thread(target=self._hash_prefix, name="qstream-sha256", daemon=True)
        self._hasher.start()

    def pwrite(self, offset: int, data, absolute: bool = False) -> None:
        pos = offset if absolute else self.data_start + offset
        if isinstance(data, np.ndarray):  # ml_dtypes arrays have no buffer format: send raw bytes
            data = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
        mv = memoryview(data).cast("B")
        done = 0
        try:
            while done < len(mv):
                done += os.pwrite(self.fd, mv[done:], pos + done)
        except OSError as e:
            raise _os_error(self.tmp, e) from e
        self._written(pos, len(mv))

    def _written(self, pos: int, n: int) -> None:
        """Bytes [pos, pos + n) are written: grow the prefix for the hasher, and start the
        writeback of the shard's dirty pages every WRITEBACK_BYTES (no wait)."""
        if n <= 0:
            return
        with self._lock:
            end = pos + n
            if pos <= self._prefix:
                self._prefix = max(self._prefix, end)
                while self._prefix in self._done:
                    self._prefix = max(self._prefix, self._done.pop(self._prefix))
                self._lock.notify_all()
            else:
                self._done[pos] = max(end, self._done.get(pos, 0))
            self._dirty += n
            flush = _SYNC_FILE_RANGE is not None and self._dirty >= WRITEBACK_BYTES
            if flush:
                self._dirty = 0
        if flush:
            _SYNC_FILE_RANGE(self.fd, 0, 0, _SYNC_FILE_RANGE_WRITE)  # errors (e.g. unsupported) only lose the hint

    def _hash_prefix(self) -> None:
        """Hasher thread: SHA-256 of the written prefix as it grows; at close, of the rest."""
        chunk = 8 << 20
        try:
            while True:
                with self._lock:
                    while self._prefix - self._hashed < chunk and not self._closing:
                        self._lock.wait()
                    closing = self._closing
                    upto = self._prefix if not closing else self.shard.file_bytes
                if closing and self.fd < 0:
                    return
                while self._hashed < upto:
                    n = min(chunk, upto - self._hashed)
                    b = os.pread(self.fd, n, self._hashed)
                    if not b:
                        raise OSError(errno.EIO, "short read while hashing")
                    self._sha.update(b)
                    _fadvise_dontneed(self.fd, self._hashed, len(b))  # dirty pages stay until written back
                    self._hashed += len(b)
                if closing:
                    return
        except BaseException as e:  # reported by sha256()
            self._hash_error = e

    def sha256(self) -> str:
        """Hex SHA-256 of the whole shard; call after every write (finish() does not)."""
        with self._lock:
            self._closing = True
            self._lock.notify_all()
        if self._hasher is not None:
            self._hasher.join()
        if self._hash_error is not None:
            raise _os_error(self.tmp, self._hash_error) if isinstance(self._hash_error, OSError) else self._hash_error
        return self._sha.hexdigest()

    def copy_from(self, src_fd: int, src_offset: int, nbytes: int, offset: int) -> None:
        """Copy bytes from a source file inside the kernel when it can (no user-space buffer)."""
        pos = self.data_start + offset
        done = 0
        try:
            if hasattr(os, "copy_file_range"):
                while done < nbytes:
                    n = os.copy_file_range(src_fd, self.fd, nbytes - done, src_offset + done, pos + done)
                    if n == 0:
                        break
                    self._written(pos + done, n)
                    done += n
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS):
                raise _os_error(self.tmp, e) from e
            # EXDEV / ENOSYS / EINVAL on some filesystems: fall back to pread/pwrite.
        chunk = 16 << 20
        while done < nbytes:
            n = min(chunk, nbytes - done)
            buf = os.pread(src_fd, n, src_offset + done)
            if not buf:
                raise QStreamError(f"source ended early while copying into {self.final.name}; the source shard is truncated.")
            self.pwrite(offset + done, buf)
            done += len(buf)

    def finish(self) -> Path:
        """Hash (see sha256()), fsync, close and rename the shard into place; its
        descriptor is closed whatever fails."""
        try:
            try:
                self.sha256()
                os.fsync(self.fd)
            finally:
                self.abort()
            atomic.replace_durably(self.tmp, self.final)
        except OSError as e:
            raise _os_error(self.final, e) from e
        return self.final

    def abort(self) -> None:
        with self._lock:
            self._closing = True
            fd, self.fd = self.fd, -1
            self._lock.notify_all()
        if self._hasher is not None and self._hasher is not threading.current_thread():
            self._hasher.join()
        if fd >= 0:
            os.close(fd)


def write_atomic(path: Path, data: bytes | str) -> None:
    """An output file, written durably through the staging folder (:func:`qstream.atomic.write_atomic`)."""
    try:
        atomic.write_atomic(path, data, tmp=path.parent / STAGING_DIR / (path.name + ".partial"))
    except OSError as e:
        raise _os_error(path, e) from e


def write_json(path: Path, obj: dict) -> None:
    write_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def copy_side_file(src_root: Path, rel: Path, dst_root: Path) -> None:
    target = dst_root / rel
    tmp = dst_root / STAGING_DIR / (str(rel).replace(os.sep, "__") + ".partial")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic.copy_atomic(src_root / rel, target, tmp=tmp)
    except OSError as e:
        raise _os_error(target, e) from e




def output_config(src_config: dict, quantization_config: dict | None, fp4: bool = False) -> dict:
    """config.json of the output: the source's, with our quantization_config; with FP4 weights the
    model dtype is bfloat16 (``dtype`` / ``torch_dtype``, nested text/vision configs too), so
    that a plain ``from_pretrained`` and vLLM's ``--dtype auto`` load it."""
    cfg = {k: v for k, v in src_config.items() if k != "quantization_config"}
    if quantization_config is not None:
        cfg["quantization_config"] = quantization_config
    if fp4:
        keys = [k for k in ("dtype", "torch_dtype") if k in cfg] or ["dtype"]
        for k in keys:
            cfg[k] = FP4_DTYPE
        for sub in cfg.values():
            if isinstance(sub, dict):
                for k in ("dtype", "torch_dtype"):
                    if k in sub and sub[k] not in (None, FP4_DTYPE):
                        sub[k] = FP4_DTYPE
    return cfg


def _nearest_existing(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


OUR_FILES = ("model.safetensors.index.json", "config.json", "README.md", "hf_quant_config.json")


def is_ours(dst: Path) -> bool:
    """Whether DST was written by qstream: an interrupted run's journal, or a finished output
    (config.json with a quantization_config beside a model card that qstream wrote)."""
    if (dst / STAGING_DIR / "journal.json").is_file():
        return True
    try:
        card = (dst / "README.md").read_text(encoding="utf-8", errors="replace")
        cfg = json.loads((dst / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    front = card.split("\n---", 1)[0] if card.startswith("---") else ""
    return "\n- qstream\n" in front + "\n" and isinstance(cfg, dict)


def check_dst(src_root: Path, dst: Path, *, overwrite: bool, resume: bool, need_bytes: int = 0) -> None:
    """Everything that would stop a conversion into DST, checked before a byte is written (and by
    --dry-run): DST inside SRC, a file, occupied, not ours with --overwrite, read-only, too small."""
    src_r = src_root.resolve()
    dst_r = dst.resolve()
    if dst_r == src_r or src_r in dst_r.parents:
        raise QStreamError(f"{dst}: DST is inside SRC ({src_root}); choose a destination outside the source folder.")
    if dst.exists() and not dst.is_dir():
        raise QStreamError(f"{dst}: DST exists and is not a folder; choose a new folder.")
    occupied = dst.exists() and any(dst.iterdir())
    if occupied and not (overwrite or resume):
        if (dst / STAGING_DIR / "journal.json").exists() and not (dst / "config.json").exists():
            raise QStreamError(f"{dst}: holds an interrupted conversion; pass --resume to continue it, --overwrite to start over, or choose a new folder.")
        raise QStreamError(f"{dst}: DST exists and is not empty; pass --overwrite to replace it, --resume to continue an interrupted run, or choose a new folder.")
    if occupied and overwrite and not resume and not is_ours(dst):
        theirs = sorted(p.name for p in dst.iterdir() if p.is_file() and (
            p.name.endswith(".safetensors") or p.name in OUR_FILES))
        if theirs:
            raise QStreamError(f"{dst}: --overwrite would replace {', '.join(theirs[:3])}"
                               f"{' ...' if len(theirs) > 3 else ''}, which qstream did not write (no qstream model "
                               "card or journal there); choose a new folder, or remove them yourself.")
    base = _nearest_existing(dst)
    if not os.access(base, os.W_OK | os.X_OK):
        raise QStreamError(f"{dst}: cannot write into {base} (read-only or no permission); choose a writable DST.")
    if need_bytes:
        free = shutil.disk_usage(base).free
        if free < need_bytes:
            from .publish.card import human

            raise QStreamError(f"{dst}: the output needs {human(need_bytes)} but only {human(free)} is free on "
                               f"that device ({base}); free space or choose another DST.")


def _remove_ours(dst: Path) -> None:
    """--overwrite: remove what an earlier qstream run wrote (its shards as its index names them,
    the files it generates, its staging folder); anything else in DST stays."""
    names = set(OUR_FILES)
    try:
        index = json.loads((dst / "model.safetensors.index.json").read_text(encoding="utf-8"))
        names |= {v for v in (index.get("weight_map") or {}).values() if isinstance(v, str) and "/" not in v}
    except (OSError, ValueError, AttributeError):
        pass
    shutil.rmtree(dst / STAGING_DIR, ignore_errors=True)
    for p in dst.iterdir():
        if p.is_file() and (p.name in names or (p.name.startswith("model-") and p.name.endswith(".safetensors"))):
            p.unlink()


class DstLock:
    """An exclusive lock on DST for the whole run (flock on the folder itself: nothing to clean up,
    released by the kernel when the process ends, however it ends)."""

    def __init__(self, dst: Path) -> None:
        self.fd = os.open(dst, os.O_RDONLY)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise QStreamError(f"{dst}: another qstream conversion is writing into this folder right now; wait "
                               "for it to finish, or choose another DST.") from None

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def prepare_dst(src_root: Path, dst: Path, overwrite: bool, resume: bool, need_bytes: int = 0) -> DstLock:
    """Create and lock DST, refusing unsafe or occupied destinations with a clear message. The
    returned lock must be held until the conversion is finished."""
    if not dst.is_dir():
        check_dst(src_root, dst, overwrite=overwrite, resume=resume)  # before creating anything
    try:
        dst.mkdir(parents=True, exist_ok=True)
        lock = DstLock(dst)  # first: a folder another run is writing is refused as that, whatever it holds
    except OSError as e:
        raise _os_error(dst, e) from e
    try:
        check_dst(src_root, dst, overwrite=overwrite, resume=resume, need_bytes=need_bytes)  # now under the lock
        if overwrite and not resume:
            _remove_ours(dst)
        staging = dst / STAGING_DIR
        staging.mkdir(parents=True, exist_ok=True)
        probe = staging / "write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        lock.release()
        raise _os_error(dst, e) from e
    except BaseException:
        lock.release()
        raise
    return lock
