"""Tensor roles and fused partner sets, from the data files in ``formats/``.

A format file (TOML) names the architectures / model types it covers, an ordered
list of ``[[rules]]`` (regex searched in the tensor name -> role; first match
wins) and ``[[fused]]`` patterns whose named group ``set`` groups the partners
that vLLM fuses into one GEMM (they share one NVFP4 global scale). The family's
rules are tried first, then ``generic.toml``'s; a recipe's rules go before both.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from .errors import QStreamError

# one routed expert's Linear, as checkpoints name it (``<...>.experts.<e>.<proj>``: Mixtral's
# block_sparse_moe.experts.N.w1, the others' mlp.experts.N.gate_proj); shared by the
# calibration (per-expert Hessians) and the W4A4 input scales, which must stay torch-free
EXPERT_LINEAR = re.compile(r"^(?P<base>.+\.experts)\.(?P<e>\d+)\.(?P<proj>[^.]+)$")

ROLES = ("mlp", "attention", "router", "vision", "projector", "embedding", "lm_head", "norm", "other")


@dataclass(frozen=True)
class Rule:
    role: str
    pattern: re.Pattern[str]


@dataclass
class Family:
    name: str
    architectures: list[str]
    model_types: list[str]
    rules: list[Rule]
    fused: list[re.Pattern[str]]
    source: str = ""
    experts_layout: str = "out_in"  # fused 3-D experts: [E, out, in] ("out_in") or [E, in, out] ("in_out")
    experts_interleaved: bool = False  # gate/up interleaved in the out axis (gpt-oss)
    # vLLM's hf_to_vllm_mapper for the architecture, as far as it renames modules
    # ([vllm_names] prefix / substr): config names must match under both namings.
    vllm_prefix: dict[str, str] = field(default_factory=dict)
    vllm_substr: dict[str, str] = field(default_factory=dict)

    def vllm_module(self, module: str) -> str:
        """The name vLLM gives module ``module`` (its weights' names, mapped by the
        architecture's ``hf_to_vllm_mapper``, less the parameter name)."""
        return self._vllm_map(module + ".")[:-1]

    def vllm_plain_entry(self, entry: str) -> str:
        """What vLLM turns a plain (non-``re:``) config entry into: it maps entries
        that contain a dot with the same mapper, and leaves the others as they are
        (vllm compressed_tensors.py ``apply_vllm_mapper``)."""
        return self._vllm_map(entry) if "." in entry else entry

    def _vllm_map(self, key: str) -> str:
        for sub, new in self.vllm_substr.items():
            if sub in key:
                key = key.replace(sub, new, 1)
        for pre, new in self.vllm_prefix.items():
            if key.startswith(pre):
                key = key.replace(pre, new, 1)
        return key


def _parse_family(text: str, source: str) -> Family:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise QStreamError(f"{source}: not valid TOML ({e}).") from e
    rules = []
    for i, r in enumerate(data.get("rules", [])):
        role = r.get("role")
        if role not in ROLES:
            raise QStreamError(f"{source}: rule {i} has role {role!r}; use one of {', '.join(ROLES)}.")
        try:
            rules.append(Rule(role, re.compile(r["pattern"])))
        except (KeyError, re.error) as e:
            raise QStreamError(f"{source}: rule {i} has a bad pattern ({e}).") from e
    fused = []
    for i, f in enumerate(data.get("fused", [])):
        try:
            pat = re.compile(f["pattern"])
        except (KeyError, re.error) as e:
            raise QStreamError(f"{source}: fused pattern {i} is bad ({e}).") from e
        if "set" not in pat.groupindex:
            raise QStreamError(f"{source}: fused pattern {i} needs a named group (?P<set>...).")
        fused.append(pat)
    return Family(
        name=str(data.get("name", Path(source).stem)),
        architectures=list(data.get("architectures", [])),
        model_types=list(data.get("model_types", [])),
        rules=rules,
        fused=fused,
        source=source,
        experts_layout=str(data.get("experts_layout", "out_in")),
        experts_interleaved=bool(data.get("experts_interleaved", False)),
        vllm_prefix=dict(data.get("vllm_names", {}).get("prefix", {})),
        vllm_substr=dict(data.get("vllm_names", {}).get("substr", {})),
    )


def _formats_dir():
    """The family data files: the ``qstream.formats`` resources of an installed qstream (pyproject
    maps formats/ there), else the formats/ folder next to the package in a source checkout."""
    try:
        return resources.files("qstream.formats")
    except ModuleNotFoundError:
        pass
    checkout = Path(__file__).resolve().parent.parent / "formats"
    if not checkout.is_dir():
        raise QStreamError(f"qstream's model-family files are missing (no qstream.formats package and no {checkout}); "
                           "reinstall qstream (pip install qstream) or run it from a complete source checkout.")
    return checkout


def load_families() -> dict[str, Family]:
    out = {}
    for entry in sorted(_formats_dir().iterdir(), key=lambda p: p.name):
        if entry.name.endswith(".toml"):
            fam = _parse_family(entry.read_text(encoding="utf-8"), f"formats/{entry.name}")
            out[fam.name] = fam
    return out


def _model_identity(config: dict) -> tuple[list[str], list[str]]:
    archs = list(config.get("architectures") or [])
    types = [config.get("model_type")]
    for sub in ("text_config", "language_config"):
        if isinstance(config.get(sub), dict):
            types.append(config[sub].get("model_type"))
    return archs, [t for t in types if t]


def select_family(config: dict, families: dict[str, Family] | None = None) -> Family:
    """The family for this config: by architectures first, then model_type; else generic."""
    families = families or load_families()
    archs, types = _model_identity(config)
    for a in archs:
        for fam in families.values():
            if a in fam.architectures:
                return fam
    for t in types:
        for fam in families.values():
            if t in fam.model_types:
                return fam
    return families["generic"]


@dataclass
class Recipe:
    """User overrides: extra rules (tried first), schemes per role, ignore regexes."""

    rules: list[Rule] = field(default_factory=list)
    schemes: dict[str, str] = field(default_factory=dict)
    ignore: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, path: Path) -> "Recipe":
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as e:
            raise QStreamError(f"{path}: cannot read the recipe ({e.strerror}).") from e
        fam = _parse_family(text, str(path))
        data = tomllib.loads(text)
        schemes = data.get("schemes", {})
        if not isinstance(schemes, dict) or any(k not in ROLES for k in schemes):
            raise QStreamError(f"{path}: [schemes] must map roles ({', '.join(ROLES)}) to a scheme name.")
        ignore = data.get("ignore", [])
        if not isinstance(ignore, list) or not all(isinstance(x, str) for x in ignore):
            raise QStreamError(f"{path}: ignore must be a list of regex strings.")
        return cls(rules=fam.rules, schemes={k: str(v) for k, v in schemes.items()}, ignore=ignore)


class Classifier:
    """Maps tensor names to roles and fused-set keys."""

    def __init__(self, family: Family, generic: Family, recipe: Recipe | None = None) -> None:
        self.family = family
        self.rules = (recipe.rules if recipe else []) + family.rules + (generic.rules if generic is not family else [])
        self.fused = family.fused if family.fused else generic.fused

    def role(self, name: str) -> str:
        for rule in self.rules:
            if rule.pattern.search(name):
                return rule.role
        return "other"

    def fused_key(self, name: str) -> str | None:
        for i, pat in enumerate(self.fused):
            m = pat.search(name)
            if m:
                return f"{i}:{m.group('set')}"
        return None
