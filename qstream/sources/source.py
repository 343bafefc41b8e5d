"""Open a source checkpoint: a local folder (:mod:`qstream.sources.checkpoint`) or a Hub repo
(:mod:`qstream.sources.hub_source`, shard headers by range requests, shards fetched when needed).

The checkpoint model itself lives in :mod:`qstream.sources.checkpoint`, which imports neither this
module nor the Hub code, so the Hub source can build on it without an import cycle.
"""

from __future__ import annotations

from pathlib import Path

from .checkpoint import GENERATED, INDEX_NAME, WEIGHT_SUFFIXES, Checkpoint, collect_tensors, open_local
from ..errors import QStreamError

__all__ = ["GENERATED", "INDEX_NAME", "WEIGHT_SUFFIXES", "Checkpoint", "collect_tensors", "open_checkpoint", "open_local"]


def open_checkpoint(root: str | Path, revision: str | None = None, download_dir: Path | None = None) -> Checkpoint:
    """Open a local checkpoint folder, or a Hub repo id (``org/name``) that is not a local
    path: see :func:`qstream.sources.hub_source.open_hub_checkpoint` (``revision``, ``download_dir``)."""
    if not Path(root).exists():
        from .hub_source import is_repo_id, open_hub_checkpoint

        if is_repo_id(str(root)):
            try:
                return open_hub_checkpoint(str(root), revision=revision, download_dir=download_dir)
            except QStreamError as e:
                if not any(w in str(e) for w in ("cannot reach", "not in the local Hugging Face cache",
                                                  "repository not found")):
                    raise  # the repo exists: its own error (gated, a missing file, ...) says what to do
                raise QStreamError(f"{root}: no local folder of that name exists ({Path(root).absolute()}), and "
                                   f"it is not a reachable Hub repo either ({e}); check the path or the repo id.") from e
    elif revision is not None:
        raise QStreamError(f"{root}: --revision applies to Hub repos, but {root} is a local folder; drop --revision.")
    return open_local(root)
