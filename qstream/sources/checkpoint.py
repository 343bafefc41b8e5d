"""A checkpoint as qstream sees it, and opening a local one: config, shard headers, side files.

Only headers and small JSON files are read here; tensor bytes are read later,
by the executor, through :class:`qstream.safetensors_io.ShardReader`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import QStreamError
from ..safetensors_io import ShardHeader, TensorInfo, read_header

INDEX_NAME = "model.safetensors.index.json"
# Files that hold weights in some other format: never copied as side files.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx", ".npz")
# Files qstream writes itself.
GENERATED = ("config.json", INDEX_NAME, "README.md", "qstream.json", "hf_quant_config.json")


@dataclass
class Checkpoint:
    root: Path
    config: dict
    shards: list[ShardHeader]
    tensors: dict[str, TensorInfo]  # in source order: shard by shard, by offset
    side_files: list[Path] = field(default_factory=list)  # relative paths
    skipped_files: list[Path] = field(default_factory=list)  # weight files not used
    source_card: str | None = None

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def fingerprint(self) -> str:
        """Identity of the source: names, dtypes, shapes, shard files, sizes, mtimes."""
        h = hashlib.sha256()
        for s in self.shards:
            st = s.path.stat()
            h.update(f"{s.path.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
        for t in self.tensors.values():
            h.update(f"{t.name}:{t.dtype}:{t.shape}:{t.path.name}:{t.begin}\n".encode())
        h.update(json.dumps(self.config, sort_keys=True).encode())
        return h.hexdigest()


def _load_json(path: Path, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except FileNotFoundError as e:
        raise QStreamError(f"{path}: {what} is missing; a Hugging Face checkpoint folder needs it.") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise QStreamError(f"{path}: {what} cannot be read as JSON ({e}); fix or re-download it.") from e
    if not isinstance(obj, dict):
        raise QStreamError(f"{path}: {what} is not a JSON object; fix or re-download it.")
    return obj


def collect_tensors(shards: list[ShardHeader], weight_map: dict | None) -> dict[str, TensorInfo]:
    """All tensors of the shards in source order, checked against each other and the index."""
    tensors: dict[str, TensorInfo] = {}
    for s in shards:
        for info in sorted(s.tensors.values(), key=lambda t: t.begin):
            if info.name in tensors:
                raise QStreamError(
                    f"tensor {info.name!r} appears in both {tensors[info.name].path.name} and "
                    f"{s.path.name}; remove the duplicate shard or fix the index."
                )
            if weight_map is not None and weight_map.get(info.name) != s.path.name:
                if info.name not in weight_map:
                    # Present in the shard but not in the index: the index is authoritative.
                    continue
                raise QStreamError(
                    f"tensor {info.name!r} is in {s.path.name} but {INDEX_NAME} maps it to "
                    f"{weight_map[info.name]}; fix the index or re-download."
                )
            tensors[info.name] = info
    if weight_map is not None:
        for name, fname in weight_map.items():
            if name not in tensors:
                raise QStreamError(
                    f"{INDEX_NAME} maps tensor {name!r} to {fname}, but that shard does not "
                    "contain it; the shard is incomplete or the index is stale, re-download."
                )
    return tensors


def open_local(root: str | Path) -> Checkpoint:
    """Open a local checkpoint folder: config.json, the index, shard headers, side files."""
    root = Path(root)
    if not root.exists():
        raise QStreamError(f"{root}: source folder does not exist; pass a checkpoint folder.")
    if not root.is_dir():
        raise QStreamError(f"{root}: source is not a folder; pass the folder that holds config.json and the safetensors files.")
    config = _load_json(root / "config.json", "config.json")

    index_path = root / INDEX_NAME
    if index_path.exists():
        index = _load_json(index_path, INDEX_NAME)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise QStreamError(f"{index_path}: has no weight_map; fix or re-download it.")
        for k, v in weight_map.items():
            if not isinstance(v, str) or not v or Path(v).name != v:
                raise QStreamError(f"{index_path}: weight_map maps {k!r} to {v!r}, which is not a shard file name "
                                   "in this folder; fix or re-download the index.")
        files: list[str] = []
        for fname in weight_map.values():
            if fname not in files:
                files.append(fname)
        for fname in files:
            if not (root / fname).is_file():
                raise QStreamError(
                    f"{index_path} names shard {fname}, which is missing from {root}; "
                    "download the missing shard."
                )
    else:
        weight_map = None
        files = sorted(p.name for p in root.glob("*.safetensors"))
        if "model.safetensors" in files:
            files = ["model.safetensors"]
        if not files:
            raise QStreamError(
                f"{root}: no safetensors files found (and no {INDEX_NAME}); qstream reads "
                "safetensors checkpoints only."
            )

    shards = [read_header(root / f) for f in files]
    tensors = collect_tensors(shards, weight_map)

    used = {root / f for f in files}
    side: list[Path] = []
    skipped: list[Path] = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or not p.is_file():
            continue
        if p in used or str(rel) in GENERATED:
            continue
        if p.name.endswith(WEIGHT_SUFFIXES):
            skipped.append(rel)
            continue
        side.append(rel)
    card = None
    if (root / "README.md").is_file():
        try:
            card = (root / "README.md").read_text(encoding="utf-8", errors="replace")
        except OSError:
            card = None
    return Checkpoint(root, config, shards, tensors, side, skipped, card)
