"""The journal in DST/.qstream: which plan is being written and which shards are done.

Written atomically after every finished shard, so a run killed at any point
(SIGKILL and power loss included) leaves a journal that names exactly the
shards that are complete on disk, each with its size and SHA-256.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from .atomic import os_error, write_atomic
from .errors import QStreamError

JOURNAL = "journal.json"


def sha256_file(path: Path, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


@dataclass
class Journal:
    path: Path
    fingerprint: str
    shards: dict[str, dict] = field(default_factory=dict)  # filename -> {size, sha256}
    complete: bool = False

    @classmethod
    def load(cls, staging: Path) -> "Journal | None":
        p = staging / JOURNAL
        if not p.exists():
            return None
        try:
            obj = json.loads(p.read_text())
            fingerprint, shards = obj["fingerprint"], dict(obj.get("shards", {}))
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
            return None  # a torn or foreign journal is treated as no journal: redo everything
        if not isinstance(fingerprint, str) or not all(
            isinstance(r, dict) and isinstance(r.get("size"), int) and isinstance(r.get("sha256"), str)
            for r in shards.values()
        ):
            return None  # damaged records: same
        return cls(p, fingerprint, shards, bool(obj.get("complete")))

    def save(self) -> None:
        data = json.dumps({"fingerprint": self.fingerprint, "complete": self.complete, "shards": self.shards}, indent=1)
        try:
            write_atomic(self.path, data, tmp=self.path.with_suffix(".tmp"))
        except OSError as e:  # a full or read-only disk: one clear sentence, not a traceback
            raise os_error(self.path, e) from e

    def record(self, filename: str, size: int, sha256: str) -> None:
        self.shards[filename] = {"size": size, "sha256": sha256}
        self.save()


def open_journal(dst: Path, staging: Path, fingerprint: str, resume: bool) -> tuple[Journal, list[str]]:
    """The journal for this run; with resume, keep the shards that check out.

    Returns the journal and notes for the user (shards redone and why).
    """
    notes: list[str] = []
    old = Journal.load(staging)
    if old is not None and resume:
        if old.fingerprint != fingerprint:
            raise QStreamError(
                f"{dst} holds a conversion of a different source or with different options "
                "(plan fingerprint changed); rerun with --overwrite to start over, or choose a new DST."
            )
        kept = {}
        for name, rec in old.shards.items():
            p = dst / name
            if not p.exists() or p.stat().st_size != rec.get("size"):
                notes.append(f"{name}: missing or wrong size, redoing it")
                continue
            if sha256_file(p) != rec.get("sha256"):
                notes.append(f"{name}: checksum mismatch (corrupted), redoing it")
                continue
            kept[name] = rec
        j = Journal(staging / JOURNAL, fingerprint, kept, False)
    else:
        j = Journal(staging / JOURNAL, fingerprint)
    j.save()
    return j, notes
