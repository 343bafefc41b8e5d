"""What `qstream verify` checks a folder against: the tensor names a quantized module may
hold, the compressed-tensors formats it knows, and how a module is resolved to a
``quantization_config`` group (:class:`Resolver`, the way compressed-tensors does it)."""

from __future__ import annotations

import json

import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

from ..errors import QStreamError
from ..safetensors_io import TensorInfo

SCAN_BLOCK = 32 << 20  # bytes per read while scanning for NaN/Inf
DECODE_BLOCK = 8 << 20  # float32 bytes per row block while measuring errors
FLOAT_SCALE_DTYPES = ("F32", "BF16", "F16")
# tensor name suffixes that belong to a quantized module (besides `weight`)
QUANT_SUFFIXES = ("weight_packed", "weight_scale", "weight_global_scale", "weight_zero_point", "weight_shape",
                  "weight_g_idx", "input_scale", "input_global_scale", "input_zero_point", "output_scale",
                  "weight_scale_2")
# compressed-tensors tensor names that a ModelOpt checkpoint never holds
CT_ONLY_SUFFIXES = ("weight_packed", "weight_global_scale", "weight_zero_point", "weight_shape", "weight_g_idx",
                    "input_global_scale", "input_zero_point")
FORMAT_KIND = {"nvfp4-pack-quantized": "nvfp4", "mxfp4-pack-quantized": "mxfp4",
               "float-quantized": "fp8", "naive-quantized": "fp8"}


# --------------------------------------------------------------------------- config resolution

@dataclass
class Group:
    name: str
    format: str
    kind: str | None  # nvfp4 | mxfp4 | fp8 | None (a format verify does not check)
    weights: dict
    input_activations: dict | None
    layout: str = "compressed-tensors"  # or "modelopt" (X.weight U8, X.weight_scale, X.weight_scale_2)

    @property
    def desc(self) -> str:
        """What a module resolving to this group is, for error lines."""
        if self.layout == "modelopt":
            return f"ModelOpt {self.format}: no exclude_modules entry matches it"
        return f"{self.name}, {self.format}"


@dataclass
class Module:
    name: str
    parts: dict[str, TensorInfo] = field(default_factory=dict)  # suffix -> tensor
    role: str = "other"
    group: Group | None = None
    ok: bool = False  # structurally sound (its metrics can be measured)

    @property
    def ndim(self) -> int:
        t = self.parts.get("weight_packed") or self.parts.get("weight")
        return len(t.shape) if t is not None else 2

    @property
    def file(self) -> str:
        t = next(iter(self.parts.values()))
        return t.path.name


class Resolver:
    """compressed-tensors' module -> config group resolution, from names alone
    (compressed_tensors/utils/match.py ``match_targets``, quantization/lifecycle/apply.py:
    later groups override earlier ones for the same target; exact names first, then
    regexes, each sorted, then class names; the first match wins)."""

    def __init__(self, qc: dict, warn: Callable[[str], None]) -> None:
        self.warn = warn
        fmt_default = qc.get("format")
        self.target_to_group: OrderedDict[str, Group] = OrderedDict()
        self.groups: list[Group] = []
        groups = qc.get("config_groups") or {}
        if not isinstance(groups, dict):
            raise QStreamError("config.json: quantization_config.config_groups is not an object.")
        for gname, g in groups.items():
            if not isinstance(g, dict):
                raise QStreamError(f"config.json: quantization_config.config_groups.{gname} is not an object.")
            fmt = g.get("format") or fmt_default
            weights = g.get("weights") or {}
            group = Group(gname, str(fmt), FORMAT_KIND.get(fmt), weights, g.get("input_activations"))
            if group.kind is None:
                warn(f"config.json: {gname} has format {fmt!r}, which qstream verify does not check; its modules "
                     "are only checked for NaN/Inf")
            self.groups.append(group)
            targets = g.get("targets") or []
            if isinstance(targets, str):
                targets = [targets]
            for t in targets:
                self.target_to_group[str(t)] = group
        self.ignore = [str(x) for x in (qc.get("ignore") or [])]
        self.targets = sorted(self.target_to_group, key=lambda x: ("re:" in x, x))
        self._regex: dict[str, re.Pattern[str] | None] = {}
        self._warned_classes: set[str] = set()
        self.used: set[str] = set()

    def _match_name(self, name: str, target: str) -> bool:
        if target.startswith("re:"):
            if target not in self._regex:
                try:
                    self._regex[target] = re.compile(target[3:])
                except re.error as e:
                    self.warn(f"config.json: target {target!r} is not a valid regex ({e})")
                    self._regex[target] = None
            rx = self._regex[target]
            return rx is not None and rx.match(name) is not None
        return target == name

    def _match_class(self, m: Module, target: str) -> bool:
        if target.startswith("re:") or "." in target:
            return False
        if target in ("Linear", "LinearBase"):
            return m.ndim == 2 and m.role not in ("embedding", "norm")
        if target == "Embedding":
            return m.ndim == 2 and m.role == "embedding"
        if target[:1].isupper() and target not in self._warned_classes:
            self._warned_classes.add(target)
            self.warn(f"config.json: target {target!r} is a module class qstream verify cannot resolve from tensor "
                      "names; modules it would cover are treated as unmatched")
        return False

    def resolve(self, m: Module) -> Group | None:
        if any(self._match_name(m.name, i) or self._match_class(m, i) for i in self.ignore):
            return None
        by_name = [t for t in self.targets if self._match_name(m.name, t)]
        by_class = [t for t in self.targets if t not in by_name and self._match_class(m, t)]
        self.used.update(by_name, by_class)
        matched = by_name + by_class
        return self.target_to_group[matched[0]] if matched else None


def read_json_member(path, key: str) -> tuple[dict, dict]:
    """The JSON object in ``path`` and its ``key`` object (OSError / ValueError when either is missing)."""
    obj = json.loads(path.read_text(encoding="utf-8"))
    part = obj.get(key) if isinstance(obj, dict) else None
    if not isinstance(part, dict):
        raise ValueError(f"no {key!r} object")
    return obj, part
