"""Reading safetensors headers and tensor bytes, with every check a user needs.

A safetensors file is: 8 bytes little-endian header length N, N bytes of JSON
(``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {}}``),
then the data section; offsets are relative to the start of the data section.
Nothing here reads tensor data except :func:`read_rows` / :class:`ShardReader`.
"""

from __future__ import annotations

import json
import math
import os
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import ml_dtypes
import numpy as np

from .errors import QStreamError

# safetensors dtype string -> numpy dtype
DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype(np.uint8),
    "I8": np.dtype(np.int8),
    "U16": np.dtype(np.uint16),
    "I16": np.dtype(np.int16),
    "U32": np.dtype(np.uint32),
    "I32": np.dtype(np.int32),
    "U64": np.dtype(np.uint64),
    "I64": np.dtype(np.int64),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "F8_E8M0": np.dtype(ml_dtypes.float8_e8m0fnu),
}
# Float dtypes qstream can quantize from.
FLOAT_SOURCE_DTYPES = ("BF16", "F16", "F32")

MAX_HEADER_BYTES = 100 * 1024 * 1024


def dtype_size(dtype: str) -> int:
    return DTYPES[dtype].itemsize


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes live: absolute byte range in ``path``."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    path: Path
    begin: int  # absolute file offset
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class ShardHeader:
    path: Path
    data_start: int
    tensors: dict[str, TensorInfo] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)


def read_header(path: Path) -> ShardHeader:
    """Parse and validate the header of one safetensors file.

    Raises QStreamError naming the file (and tensor) for every malformed case:
    truncated file, header length past the end, non-JSON header, bad entries,
    offsets outside the file, overlapping tensors, size not matching shape x dtype.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            n = header_length(f.read(8), size, path)
            raw = f.read(n)
    except OSError as e:
        raise QStreamError(f"{path}: cannot read ({e.strerror}); check the path and permissions.") from e
    return parse_header(raw, size, path)


def header_length(head: bytes, size: int, where: object) -> int:
    """The header length N from a file's first 8 bytes, checked against the file size.
    ``where`` names the file in errors (a path, or repo/file for a remote shard)."""
    if len(head) < 8:
        raise QStreamError(
            f"{where}: file is only {size} bytes, too short to be safetensors; "
            "re-download it."
        )
    (n,) = struct.unpack("<Q", head[:8])
    if n > size - 8 or n > MAX_HEADER_BYTES:
        raise QStreamError(
            f"{where}: header length {n} is larger than the file ({size} bytes); "
            "the file is truncated or not safetensors, re-download it."
        )
    return n


def parse_header(raw: bytes, size: int, path: Path, label: object = None) -> ShardHeader:
    """Validate the JSON header ``raw`` (the N bytes after the length) of a safetensors
    file of ``size`` bytes. Tensors get ``path`` (where the bytes are, or will be once
    downloaded); ``label`` names the file in errors and defaults to ``path``."""
    path = Path(path)
    where_file = path if label is None else label
    n = len(raw)
    try:
        obj = json.loads(raw.decode("utf-8"))
    # ValueError: JSONDecodeError, and ints past Python's digit limit; RecursionError: deep nesting.
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise QStreamError(
            f"{where_file}: header is not valid JSON ({e.__class__.__name__}); the file is "
            "corrupt, re-download it."
        ) from e
    if not isinstance(obj, dict):
        raise QStreamError(f"{where_file}: header is not a JSON object; the file is corrupt, re-download it.")
    data_start = 8 + n
    data_len = size - data_start
    hdr = ShardHeader(path=path, data_start=data_start)
    meta = obj.pop("__metadata__", None)
    if meta is not None:
        if not isinstance(meta, dict):
            raise QStreamError(f"{where_file}: __metadata__ is not a JSON object; the file is corrupt.")
        hdr.metadata = {str(k): str(v) for k, v in meta.items()}
    spans = []
    for name, ent in obj.items():
        where = f"{where_file}: tensor {name!r}"
        if not isinstance(ent, dict):
            raise QStreamError(f"{where}: header entry is not an object; the file is corrupt.")
        dtype = ent.get("dtype")
        shape = ent.get("shape")
        offs = ent.get("data_offsets")
        if not isinstance(dtype, str):
            raise QStreamError(f"{where}: missing dtype; the file is corrupt.")
        if dtype not in DTYPES:
            raise QStreamError(
                f"{where} has dtype {dtype}, which qstream cannot read "
                f"(supported: {', '.join(DTYPES)}); convert that tensor first or report it."
            )
        if (
            not isinstance(shape, list)
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
        ):
            raise QStreamError(f"{where}: shape {shape!r} is not a list of non-negative integers.")
        if (
            not isinstance(offs, list)
            or len(offs) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)
        ):
            raise QStreamError(f"{where}: data_offsets {offs!r} is not [begin, end].")
        b, e = offs
        if b < 0 or e < b or e > data_len:
            raise QStreamError(
                f"{where}: data_offsets [{b}, {e}] lie outside the file's {data_len} data "
                "bytes; the file is truncated or corrupt, re-download it."
            )
        expect = math.prod(shape) * DTYPES[dtype].itemsize
        if e - b != expect:
            raise QStreamError(
                f"{where}: holds {e - b} bytes but shape {shape} x {dtype} needs {expect}; "
                "the file is corrupt."
            )
        hdr.tensors[name] = TensorInfo(name, dtype, tuple(shape), path, data_start + b, data_start + e)
        if e > b:
            spans.append((b, e, name))
    spans.sort()
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise QStreamError(
                f"{where_file}: tensors {n0!r} and {n1!r} overlap in the file; the file is corrupt."
            )
    return hdr


class ShardReader:
    """pread-based reader for tensor rows; one file descriptor per path, thread safe."""

    def __init__(self, on_open: Callable[[Path], None] | None = None) -> None:
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()
        self._on_open = on_open
        self._opening: dict[Path, threading.Event] = {}  # on_open running for these paths

    def fd(self, path: Path) -> int:
        """The descriptor of ``path``, opened on first use after ``on_open(path)`` (which may
        download it). ``on_open`` runs without the lock: other files are read meanwhile, and
        readers of the same file wait for that one call."""
        while True:
            with self._lock:
                fd = self._fds.get(path)
                if fd is not None:
                    return fd
                pending = self._opening.get(path)
                if pending is None:
                    pending = self._opening[path] = threading.Event()
                    break
            pending.wait()  # another thread is opening it; then look again (its failure: try it here)
        try:
            if self._on_open is not None:
                self._on_open(path)
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError as e:
                raise QStreamError(f"{path}: cannot open ({e.strerror}).") from e
            with self._lock:
                self._fds[path] = fd
            return fd
        finally:
            with self._lock:
                del self._opening[path]
            pending.set()

    def read_bytes(self, path: Path, begin: int, nbytes: int, out: memoryview | None = None) -> memoryview:
        buf = out if out is not None else memoryview(bytearray(nbytes))
        fd = self.fd(path)
        got = 0
        while got < nbytes:
            n = os.preadv(fd, [buf[got:nbytes]], begin + got)
            if n <= 0:
                raise QStreamError(
                    f"{path}: unexpected end of file at byte {begin + got}; the file is "
                    "truncated, re-download it."
                )
            got += n
        return buf[:nbytes]

    def read_rows(self, info: TensorInfo, row0: int, row1: int) -> np.ndarray:
        """Rows [row0, row1) of a tensor (first axis), as a numpy array of its dtype."""
        dt = DTYPES[info.dtype]
        if len(info.shape) == 0:
            row_elems, rows = 1, 1
        else:
            rows = info.shape[0]
            row_elems = math.prod(info.shape[1:])
        assert 0 <= row0 <= row1 <= rows
        row_bytes = row_elems * dt.itemsize
        nbytes = (row1 - row0) * row_bytes
        arr = np.empty(nbytes, dtype=np.uint8)
        if nbytes:
            self.read_bytes(info.path, info.begin + row0 * row_bytes, nbytes, memoryview(arr))
        shape = ((row1 - row0),) + tuple(info.shape[1:]) if info.shape else ()
        return arr.view(dt).reshape(shape)

    def read(self, info: TensorInfo) -> np.ndarray:
        rows = info.shape[0] if info.shape else 1
        return self.read_rows(info, 0, rows)

    def drop(self, path: Path) -> None:
        """Done with a file: drop its pages from the page cache (they compete with the
        GPU on unified-memory machines) and close it."""
        with self._lock:
            fd = self._fds.pop(path, None)
        if fd is None:
            return
        _fadvise_dontneed(fd, 0, 0)
        os.close(fd)

    def drop_range(self, path: Path, begin: int, length: int) -> None:
        """Done with a byte range of an open file: drop its pages from the page cache."""
        with self._lock:
            fd = self._fds.get(path)
            if fd is not None:
                _fadvise_dontneed(fd, begin, length)

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __enter__(self) -> "ShardReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _fadvise_dontneed(fd: int, begin: int, length: int) -> None:
    """posix_fadvise(DONTNEED), unless QSTREAM_KEEP_PAGE_CACHE=1 (for the page-cache benchmark)."""
    if not hasattr(os, "posix_fadvise") or os.environ.get("QSTREAM_KEEP_PAGE_CACHE") == "1":
        return
    try:
        os.posix_fadvise(fd, begin, length, os.POSIX_FADV_DONTNEED)
    except OSError:
        pass


def drop_pages(path: Path) -> None:
    """Drop a file's pages from the page cache (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        _fadvise_dontneed(fd, 0, 0)
    finally:
        os.close(fd)


def build_header(entries: list[tuple[str, str, tuple[int, ...], int, int]], metadata: dict[str, str] | None) -> bytes:
    """Serialize a safetensors header (8-byte length + JSON padded with spaces to 8)."""
    obj: dict[str, object] = {}
    if metadata:
        obj["__metadata__"] = metadata
    for name, dtype, shape, b, e in entries:
        obj[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [b, e]}
    js = json.dumps(obj, separators=(",", ":")).encode("utf-8")
    js += b" " * ((-len(js)) % 8)
    return struct.pack("<Q", len(js)) + js
