"""Plan a conversion from headers and config alone (no tensor data is read).

A :class:`Plan` lists every output tensor with its action, source, output
shard and byte offset, so the output size and every shard header are known
before a byte is written. ``inspect`` and ``--dry-run`` print it; ``convert``
executes it; resume compares a stored plan fingerprint with a new one.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__
from .errors import QStreamError
from .roles import ROLES, Classifier, Recipe, load_families, select_family
from .safetensors_io import FLOAT_SOURCE_DTYPES, TensorInfo, build_header, dtype_size
from .schemes import SCHEMES, Scheme
from .source import Checkpoint

SHARD_METADATA = {"format": "pt"}


@dataclass(frozen=True)
class Options:
    mlp: str = "mxfp4"
    ignore: tuple[str, ...] = ()
    recipe: str | None = None
    max_shard_size: int = 5 * 10**9
    scale_search: str = "none"

    def key(self) -> dict:
        return {
            "mlp": self.mlp,
            "ignore": list(self.ignore),
            "recipe": Path(self.recipe).read_text(encoding="utf-8") if self.recipe else None,
            "max_shard_size": self.max_shard_size,
            "scale_search": self.scale_search,
        }


@dataclass
class OutTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    shard: int = -1
    offset: int = -1  # within the shard's data section

    @property
    def nbytes(self) -> int:
        n = dtype_size(self.dtype)
        for d in self.shape:
            n *= d
        return n


@dataclass
class Op:
    kind: str  # "copy" | "quantize"
    role: str
    source: TensorInfo
    outputs: list[OutTensor]
    scheme: str | None = None
    scale_group: str | None = None  # NVFP4: tensors sharing one global scale
    note: str = ""

    @property
    def module(self) -> str:
        return self.source.name.removesuffix(".weight")

    @property
    def bytes_out(self) -> int:
        return sum(o.nbytes for o in self.outputs)


@dataclass
class OutShard:
    filename: str
    tensors: list[OutTensor] = field(default_factory=list)
    header: bytes = b""

    @property
    def data_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def file_bytes(self) -> int:
        return len(self.header) + self.data_bytes


@dataclass
class RoleSummary:
    tensors: int = 0
    quantized: int = 0
    bytes_in: int = 0
    bytes_out: int = 0


@dataclass
class Plan:
    source: Checkpoint
    options: Options
    family: str
    ops: list[Op]
    shards: list[OutShard]
    scale_groups: dict[str, list[str]]
    quantization_config: dict | None
    warnings: list[str]
    command: str = ""  # the command line, for the model card

    @property
    def bytes_in(self) -> int:
        return sum(op.source.nbytes for op in self.ops)

    @property
    def bytes_out(self) -> int:
        return sum(op.bytes_out for op in self.ops)

    def by_role(self) -> dict[str, RoleSummary]:
        out = {r: RoleSummary() for r in ROLES}
        for op in self.ops:
            s = out[op.role]
            s.tensors += 1
            s.quantized += op.kind == "quantize"
            s.bytes_in += op.source.nbytes
            s.bytes_out += op.bytes_out
        return {r: s for r, s in out.items() if s.tensors}

    def fingerprint(self) -> str:
        """Identity of the output this plan produces: source identity, options, version."""
        h = hashlib.sha256()
        h.update(self.source.fingerprint().encode())
        h.update(json.dumps(self.options.key(), sort_keys=True).encode())
        h.update(__version__.encode())
        for s in self.shards:
            h.update(s.header)
        return h.hexdigest()

    def index(self) -> dict:
        return {
            "metadata": {"total_size": sum(s.data_bytes for s in self.shards)},
            "weight_map": {t.name: s.filename for s in self.shards for t in s.tensors},
        }


def parse_size(text: str | int) -> int:
    """'5GB' -> 5e9, '500MiB' -> 500*2**20, '1000' -> 1000 (as Hugging Face does)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*", text, re.I)
    if not m:
        raise QStreamError(f"max shard size {text!r} is not a size like 5GB or 500MB.")
    num = float(m.group(1))
    unit = (m.group(2) or "").upper()
    mult = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
            "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    if unit not in mult:
        raise QStreamError(f"max shard size {text!r} has an unknown unit; use B, KB, MB, GB, KiB, MiB or GiB.")
    return int(num * mult[unit])


def _scheme_for(role: str, opts: Options, recipe: Recipe | None) -> Scheme | None:
    name = None
    if role == "mlp":
        name = opts.mlp
    if recipe and role in recipe.schemes:
        name = recipe.schemes[role]
    if name in (None, "none", "keep"):
        return None
    if name not in SCHEMES:
        raise QStreamError(f"unknown scheme {name!r} for role {role}; choose one of {', '.join(SCHEMES)} or none.")
    return SCHEMES[name]


def make_plan(src: Checkpoint, opts: Options) -> Plan:
    families = load_families()
    family = select_family(src.config, families)
    recipe = Recipe.load(Path(opts.recipe)) if opts.recipe else None
    classifier = Classifier(family, families["generic"], recipe)
    ignore_res = []
    for pat in list(opts.ignore) + (recipe.ignore if recipe else []):
        try:
            ignore_res.append(re.compile(pat))
        except re.error as e:
            raise QStreamError(f"--ignore {pat!r} is not a valid regex ({e}).") from e
    warnings: list[str] = []

    ops: list[Op] = []
    for info in src.tensors.values():
        role = classifier.role(info.name)
        scheme = _scheme_for(role, opts, recipe)
        op = _plan_tensor(info, role, scheme, ignore_res, warnings)
        ops.append(op)

    # NVFP4 global-scale groups: fused partners that are all quantized with a global scale.
    scale_groups: dict[str, list[str]] = {}
    for op in ops:
        if op.kind == "quantize" and SCHEMES[op.scheme].has_global_scale:
            key = classifier.fused_key(op.source.name) or op.source.name
            op.scale_group = key
            scale_groups.setdefault(key, []).append(op.source.name)

    shards = _assign_shards(ops, opts.max_shard_size)
    qconfig = _quantization_config(ops, src.config)
    return Plan(src, opts, family.name, ops, shards, scale_groups, qconfig, warnings)


def _plan_tensor(info: TensorInfo, role: str, scheme: Scheme | None, ignore_res: list[re.Pattern[str]], warnings: list[str]) -> Op:
    copy = Op("copy", role, info, [OutTensor(info.name, info.dtype, info.shape)])
    if scheme is None or not info.name.endswith(".weight") or len(info.shape) != 2:
        return copy
    if any(r.search(info.name) for r in ignore_res):
        copy.note = "ignored by --ignore/recipe"
        return copy
    if info.dtype not in FLOAT_SOURCE_DTYPES:
        raise QStreamError(
            f"tensor {info.name!r} ({info.path.name}) has dtype {info.dtype}, which qstream cannot "
            f"quantize from (it reads {', '.join(FLOAT_SOURCE_DTYPES)}); exclude it with --ignore or convert it first."
        )
    out_f, in_f = info.shape
    if in_f % scheme.group_size != 0 or in_f == 0 or out_f == 0:
        msg = (
            f"{info.name}: input dimension {in_f} is not a multiple of {scheme.name}'s group size "
            f"{scheme.group_size}; left unquantized and listed in the ignore list"
        )
        warnings.append(msg)
        copy.note = f"in_features {in_f} not a multiple of {scheme.group_size}"
        return copy
    module = info.name.removesuffix(".weight")
    outs = [OutTensor(n, d, s) for n, d, s in scheme.outputs(module, (out_f, in_f))]
    return Op("quantize", role, info, outs, scheme=scheme.name)


def _assign_shards(ops: list[Op], max_size: int) -> list[OutShard]:
    groups: list[list[Op]] = [[]]
    size = 0
    for op in ops:
        b = op.bytes_out
        if groups[-1] and size + b > max_size:
            groups.append([])
            size = 0
        groups[-1].append(op)
        size += b
    n = len(groups)
    shards = []
    for i, g in enumerate(groups):
        shard = OutShard(f"model-{i + 1:05d}-of-{n:05d}.safetensors")
        off = 0
        entries = []
        for op in g:
            for t in op.outputs:
                t.shard = i
                t.offset = off
                entries.append((t.name, t.dtype, t.shape, off, off + t.nbytes))
                off += t.nbytes
                shard.tensors.append(t)
        shard.header = build_header(entries, SHARD_METADATA)
        shards.append(shard)
    return shards


# --------------------------------------------------------------------------- config

def _generalize(names: list[str], forbidden: list[str]) -> list[str]:
    """Compact module names into anchored `re:` patterns that match no forbidden name.

    Layer indices become \\d+, then names differing only in their last component
    are merged into one alternation. Any pattern that would also match a
    forbidden (quantized) module falls back to the exact names it covers.
    """
    def split(n: str) -> tuple[str, str]:
        head, _, last = n.rpartition(".")
        return head, last

    by_head: dict[str, dict[str, list[str]]] = {}
    for n in names:
        head, last = split(n)
        ghead = re.sub(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.)", "<N>", head)
        by_head.setdefault(ghead, {}).setdefault(last, []).append(n)
    out: list[str] = []
    for ghead, lasts in by_head.items():
        members = [n for ns in lasts.values() for n in ns]
        if len(members) == 1 and "<N>" not in ghead:
            out.append(members[0])
            continue
        esc = re.escape(ghead).replace(re.escape("<N>"), r"\d+")
        alts = sorted(lasts)
        last_re = re.escape(alts[0]) if len(alts) == 1 else "(" + "|".join(re.escape(a) for a in alts) + ")"
        pat = f"^{esc}\\.{last_re}$" if ghead else f"^{last_re}$"
        rx = re.compile(pat)
        if any(rx.match(f) for f in forbidden) or not all(rx.match(m) for m in members):
            out.extend(members)
        else:
            out.append("re:" + pat)
    return out


def _quantization_config(ops: list[Op], config: dict) -> dict | None:
    quantized = [op for op in ops if op.kind == "quantize"]
    if not quantized:
        return None
    schemes = sorted({op.scheme for op in quantized})
    q_modules = [op.module for op in quantized]
    unq = [
        op.module
        for op in ops
        if op.kind != "quantize"
        and op.source.name.endswith(".weight")
        and len(op.source.shape) == 2
        and op.role not in ("embedding", "norm")
    ]
    # A tied lm_head has no tensor of its own but is still a Linear module.
    if "lm_head" not in q_modules and "lm_head" not in unq:
        unq.append("lm_head")
    ignore = _generalize(unq, q_modules)
    groups = {}
    for i, name in enumerate(schemes):
        sch = SCHEMES[name]
        if len(schemes) == 1:
            targets = ["Linear"]
        else:
            targets = _generalize([op.module for op in quantized if op.scheme == name],
                                  [op.module for op in quantized if op.scheme != name] + unq)
        groups[f"group_{i}"] = {
            "targets": targets,
            "weights": dict(sch.weights_args),
            "input_activations": None,
            "output_activations": None,
            "format": sch.format,
        }
    fmt = SCHEMES[schemes[0]].format if len(schemes) == 1 else "mixed-precision"
    return {
        "config_groups": groups,
        "format": fmt,
        "global_compression_ratio": None,
        "ignore": ignore,
        "kv_cache_scheme": None,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
        "sparsity_config": {},
        "transform_config": {},
        "version": "0.20.0",
    }
