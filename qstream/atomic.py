"""Durable file replacement: the one place qstream renames a finished file into place.

A file is written (or copied) to a temporary name, fsynced, renamed over its final
name, and the folder is fsynced, so that after a crash or a power cut the final name
holds either the old file or the complete new one, never a torn one, and the rename
itself is not lost. Also: the one sentence an OSError on an output path becomes.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from .errors import QStreamError


def os_error(path: Path, e: OSError) -> QStreamError:
    """An OSError while writing ``path`` as one sentence saying what to do."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return QStreamError(f"{path}: no space left on the device while writing; free space (or pick another DST) and rerun with --resume.")
    if e.errno == errno.EFBIG:
        return QStreamError(f"{path}: file too large for this file system or size limit; rerun with a smaller --max-shard-size and --overwrite, or choose another DST.")
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return QStreamError(f"{path}: cannot write ({e.strerror}); choose a writable DST.")
    return QStreamError(f"{path}: write failed ({e.strerror}).")


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (a power cut cannot bring the old name back)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def replace_durably(tmp: Path, path: Path) -> None:
    """Rename the complete, fsynced file ``tmp`` over ``path`` and fsync the folder."""
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _default_tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.partial")


def write_atomic(path: Path, data: bytes | str, tmp: Path | None = None) -> None:
    """Write ``data`` to ``path`` durably (via ``tmp``, by default a hidden name next to it).

    Raises OSError; callers turn it into their own message (:func:`os_error` for outputs)."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    tmp = tmp or _default_tmp(path)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    replace_durably(tmp, path)


def copy_atomic(src: Path, path: Path, tmp: Path | None = None) -> None:
    """Copy ``src`` to ``path`` durably (via ``tmp``). Raises OSError."""
    tmp = tmp or _default_tmp(path)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    replace_durably(tmp, path)
