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
from .ops import OutShard
from .safetensors_io import _fadvise_dontneed

STAGING_DIR = ".qstream"
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
    """An output file, written durably through DST/.qstream (:func:`qstream.atomic.write_atomic`)."""
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


def output_config(src_config: dict, quantization_config: dict | None) -> dict:
    cfg = {k: v for k, v in src_config.items() if k != "quantization_config"}
    if quantization_config is not None:
        cfg["quantization_config"] = quantization_config
    return cfg


def prepare_dst(src_root: Path, dst: Path, overwrite: bool, resume: bool) -> None:
    """Create DST, refusing unsafe or occupied destinations with a clear message."""
    src_r = src_root.resolve()
    dst_r = dst.resolve()
    if dst_r == src_r or src_r in dst_r.parents:
        raise QStreamError(f"{dst}: DST is inside SRC ({src_root}); choose a destination outside the source folder.")
    if dst.exists() and not dst.is_dir():
        raise QStreamError(f"{dst}: DST exists and is not a folder; choose a new folder.")
    if dst.exists() and any(dst.iterdir()) and not (overwrite or resume):
        if (dst / STAGING_DIR / "journal.json").exists() and not (dst / "config.json").exists():
            raise QStreamError(f"{dst}: holds an interrupted conversion; pass --resume to continue it, --overwrite to start over, or choose a new folder.")
        raise QStreamError(f"{dst}: DST exists and is not empty; pass --overwrite to replace it, --resume to continue an interrupted run, or choose a new folder.")
    try:
        dst.mkdir(parents=True, exist_ok=True)
        if overwrite and not resume:
            for p in dst.iterdir():
                if p.name == STAGING_DIR:
                    shutil.rmtree(p)
                elif p.is_file() and (p.name.endswith(".safetensors") or p.name in ("model.safetensors.index.json", "config.json", "README.md", "hf_quant_config.json")):
                    p.unlink()
        (dst / STAGING_DIR).mkdir(exist_ok=True)
        probe = dst / STAGING_DIR / "write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise _os_error(dst, e) from e
