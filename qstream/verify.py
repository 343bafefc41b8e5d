"""`qstream verify`: check a converted folder against its own config, and measure it
against its source, without loading a model.

Structural checks (no source needed) read every shard header, the index and
config.json, then stream the bytes of float tensors and of the scales in bounded
blocks:

* index: every tensor is mapped to the shard that holds it, every mapped tensor
  exists there, no shard is left out of the index, ``total_size`` is the sum of
  the tensor bytes;
* config: every module is resolved to a ``quantization_config`` group the way
  compressed-tensors does it (``ignore`` first; then exact names, ``re:`` regexes
  with ``re.match``, then class targets; a module counts as a ``Linear`` when it
  has a 2-D ``weight`` / ``weight_packed`` and its role is not embedding or norm);
  a resolved module has exactly the tensors its format needs, with the right
  dtypes and shapes, and no unquantized ``weight``; an unresolved (ignored) module
  has a plain weight and no quantization tensors;
* values: no NaN/Inf in any float tensor, no NaN E4M3 scale, no MXFP4 exponent 255,
  NVFP4 global scales finite and positive (fused partners sharing one is checked
  and a difference reported as a warning).

A ModelOpt output (``--format modelopt``: config.json ``quant_method: modelopt``) is
checked against its own rules instead: config.json's ``quantization_config`` and
``hf_quant_config.json`` agree (quant_algo, group_size 16, the exclude list); every
module is resolved against ``exclude_modules`` the way vLLM (exact, substring,
fnmatch, ``x*`` also as ``x`` / ``x.*``) and TensorRT-LLM (fnmatch) match it, under
its own name and its runtime layer names (modelopt.check_excludes); a quantized
Linear, excluded by neither, holds exactly ``weight`` U8 [o, i/2], ``weight_scale``
F8_E4M3 [o, i/16] and ``weight_scale_2`` F32 0-d or [1] (finite, positive) and no
compressed-tensors names; an unquantized Linear must be excluded by both. With a
source it is decoded with ModelOpt's formula, ``fp4 * float32(s * weight_scale_2)``.

With a source, every quantized module is matched to its source weight by name:
the plan qstream would make for that source (so FP8 sources are decoded with
their scales, and fused 3-D experts are cut into the same per-expert views), and
both are decoded row block by row block: relative error ``||w - w_hat|| / ||w||``,
relative MSE, SNR in dB and max abs error per tensor, aggregated per role and per
scheme. Memory stays bounded by ``threads x block`` whatever the model size.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import re
import tempfile
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import QStreamError
from .modelopt import GROUP_SIZE as MO_GROUP_SIZE, HF_QUANT_CONFIG, READ_ALGOS as MO_ALGOS
from .safetensors_io import DTYPES, ShardReader, TensorInfo, read_header
from .schemes.decode import decode_modelopt_nvfp4, decode_mxfp4, decode_nvfp4  # noqa: F401 (re-exported)
from .source import INDEX_NAME

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
MAX_PRINTED_ERRORS = 50
# verify --source fails a tensor past this relative error unless --max-rel-error says otherwise:
# FP4 measures about 0.08-0.12 (0.2 on outlier-heavy rows), a wrong source about 1.4.
DEFAULT_MAX_REL_ERROR = 0.5


# --------------------------------------------------------------------------- results

@dataclass
class TensorMetrics:
    """Error of one decoded quantized weight against its source, accumulated block by block."""

    module: str
    role: str
    scheme: str  # nvfp4 | mxfp4 | fp8
    shape: tuple[int, int]
    source: str  # where the source weight came from
    numel: int = 0
    sum_sq: float = 0.0  # sum w^2
    err_sq: float = 0.0  # sum (w - w_hat)^2
    max_abs: float = 0.0

    def add(self, w: np.ndarray, w_hat: np.ndarray) -> None:
        w = np.asarray(w, dtype=np.float32)
        d = w - np.asarray(w_hat, dtype=np.float32)  # float32: the errors measured are >> its rounding
        self.numel += d.size
        self.sum_sq += float(np.sum(np.square(w), dtype=np.float64))
        self.err_sq += float(np.sum(np.square(d), dtype=np.float64))
        if d.size:
            m = float(np.max(np.abs(d)))
            self.max_abs = m if math.isnan(m) else max(self.max_abs, m)

    @property
    def rel_mse(self) -> float:
        return _ratio(self.err_sq, self.sum_sq)

    @property
    def rel_error(self) -> float:
        return math.sqrt(self.rel_mse) if self.rel_mse >= 0 else self.rel_mse

    @property
    def snr_db(self) -> float:
        return _snr(self.sum_sq, self.err_sq)

    def to_json(self) -> dict:
        return {"module": self.module, "tensor": self.module + ".weight", "role": self.role, "scheme": self.scheme,
                "shape": list(self.shape), "source": self.source, "numel": self.numel,
                "rel_error": _num(self.rel_error), "rel_mse": _num(self.rel_mse), "snr_db": _num(self.snr_db),
                "max_abs_error": _num(self.max_abs)}


def _ratio(a: float, b: float) -> float:
    if math.isnan(a) or math.isnan(b):
        return math.nan
    if b > 0:
        return a / b
    return 0.0 if a == 0 else math.inf


def _snr(signal: float, noise: float) -> float:
    if math.isnan(signal) or math.isnan(noise):
        return math.nan
    if noise == 0:
        return math.inf
    if signal == 0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def _num(x: float) -> float | None:
    """JSON has no inf/nan: those become null."""
    return float(x) if math.isfinite(x) else None


def _sort_key(m: TensorMetrics) -> tuple:
    r = m.rel_error
    return (0 if math.isnan(r) else 1, -r if not math.isnan(r) else 0.0, m.module)


def aggregate(metrics: list[TensorMetrics]) -> dict:
    """Energy-weighted totals over tensors (rel error of the concatenation) and per-tensor stats."""
    sum_sq = sum(m.sum_sq for m in metrics)
    err_sq = sum(m.err_sq for m in metrics)
    rels = [m.rel_error for m in metrics]
    worst = sorted(metrics, key=_sort_key)[0] if metrics else None
    rel_mse = _ratio(err_sq, sum_sq)
    return {
        "tensors": len(metrics),
        "numel": sum(m.numel for m in metrics),
        "rel_error": _num(math.sqrt(rel_mse) if rel_mse >= 0 else rel_mse),
        "rel_mse": _num(rel_mse),
        "snr_db": _num(_snr(sum_sq, err_sq)),
        "max_abs_error": _num(max((m.max_abs for m in metrics), default=0.0)),
        "mean_rel_error": _num(sum(rels) / len(rels)) if rels else None,
        "max_rel_error": _num(worst.rel_error) if worst else None,
        "worst": worst.module if worst else None,
    }


@dataclass
class Report:
    dst: Path
    source: str | None = None
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    shards: int = 0
    tensors: int = 0
    bytes: int = 0
    scanned_bytes: int = 0
    modules: dict[str, int] = field(default_factory=dict)  # format -> quantized modules
    ignored_modules: int = 0
    metrics: list[TensorMetrics] | None = None  # worst first
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.errors

    def check_threshold(self, max_rel_error: float, default: bool = False) -> None:
        """Add an error for every tensor whose relative error exceeds ``max_rel_error``."""
        bad = [m for m in self.metrics or [] if math.isnan(m.rel_error) or m.rel_error > max_rel_error]
        for m in bad:
            r = m.rel_error
            self.errors.append(f"{m.module}: relative error {r:.4g} exceeds --max-rel-error {max_rel_error:g}"
                               + (" (the default)" if default else ""))
        if default and bad and len(bad) * 2 > len(self.metrics or []):
            self.errors.append(f"{self.source}: {len(bad)} of {len(self.metrics)} quantized tensors are far from "
                               "their source weights (FP4 gives about 0.1): is --source the checkpoint DST was "
                               "converted from?")

    def by(self, key: Callable[[TensorMetrics], str]) -> dict[str, dict]:
        groups: dict[str, list[TensorMetrics]] = {}
        for m in self.metrics or []:
            groups.setdefault(key(m), []).append(m)
        return {k: aggregate(v) for k, v in sorted(groups.items())}

    def to_json(self, top: int | None = None) -> dict:
        out = {
            "dst": str(self.dst),
            "source": self.source,
            "ok": self.ok,
            "errors": list(self.errors),
            "warnings": list(self.warnings),
            "summary": {"shards": self.shards, "tensors": self.tensors, "bytes": self.bytes,
                        "scanned_bytes": self.scanned_bytes, "quantized_modules": dict(self.modules),
                        "unquantized_linears": self.ignored_modules, "seconds": round(self.seconds, 3)},
            "metrics": None,
        }
        if self.metrics is not None:
            ms = self.metrics if top is None else self.metrics[:top]
            out["metrics"] = {
                "total": aggregate(self.metrics),
                "roles": self.by(lambda m: m.role),
                "schemes": self.by(lambda m: m.scheme),
                "tensors": [m.to_json() for m in ms],
            }
        return out


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


# --------------------------------------------------------------------------- the checker

class Verifier:
    def __init__(self, dst: Path, *, threads: int | None = None, scan_block: int = SCAN_BLOCK,
                 decode_block: int = DECODE_BLOCK) -> None:
        self.dst = Path(dst)
        self.threads = max(1, threads or min(8, os.cpu_count() or 1))
        self.scan_block = scan_block
        self.decode_block = decode_block
        self.report = Report(self.dst)
        self.reader = ShardReader()
        self.tensors: dict[str, TensorInfo] = {}
        self.modules: dict[str, Module] = {}
        self.config: dict = {}
        self.config_ok = False

    def error(self, where: str, msg: str) -> None:
        self.report.errors.append(f"{where}: {msg}")

    def warn(self, msg: str) -> None:
        self.report.warnings.append(msg)

    # ---------------------------------------------------------------- files, index
    def load(self) -> None:
        dst = self.dst
        if not dst.is_dir():
            raise QStreamError(f"{dst}: not a folder; pass the output folder of a conversion.")
        cfg_path = dst / "config.json"
        try:
            self.config = json.loads(cfg_path.read_text(encoding="utf-8"))
            if not isinstance(self.config, dict):
                raise ValueError("not a JSON object")
            self.config_ok = True
        except FileNotFoundError:
            self.error("config.json", "missing; a finished conversion writes it last (interrupted run?)")
            self.config = {}
        except (OSError, ValueError, UnicodeDecodeError) as e:
            self.error("config.json", f"cannot be read as a JSON object ({e})")
            self.config = {}

        files = sorted(p.name for p in dst.glob("*.safetensors") if p.is_file())
        index_path = dst / INDEX_NAME
        weight_map: dict | None = None
        if index_path.exists():
            try:
                index = json.loads(index_path.read_text(encoding="utf-8"))
                weight_map = index.get("weight_map") if isinstance(index, dict) else None
                if not isinstance(weight_map, dict):
                    raise ValueError("no weight_map object")
            except (OSError, ValueError, UnicodeDecodeError) as e:
                self.error(INDEX_NAME, f"cannot be read ({e})")
                index, weight_map = {}, None
        elif len(files) > 1:
            self.error(INDEX_NAME, f"missing, but {dst} holds {len(files)} safetensors files")
        if not files:
            self.error(str(dst), "holds no safetensors files")

        named = set(weight_map.values()) if weight_map is not None else set(files)
        for f in files:
            if f not in named:
                self.error(f, f"is not named by {INDEX_NAME} (a stray shard: loaders ignore it)")
        headers = {}
        for f in files:
            if f not in named:
                continue
            try:
                headers[f] = read_header(dst / f)
            except QStreamError as e:
                self.report.errors.append(str(e).replace(str(dst / f), f, 1))
        self.report.shards = len(headers)

        for f, h in headers.items():
            for info in sorted(h.tensors.values(), key=lambda t: t.begin):
                if info.name in self.tensors:
                    self.error(f, f"{info.name} is also in {self.tensors[info.name].path.name}")
                    continue
                self.tensors[info.name] = info
                if weight_map is not None:
                    mapped = weight_map.get(info.name)
                    if mapped is None:
                        self.error(f, f"{info.name} is not in {INDEX_NAME}")
                    elif mapped != f:
                        self.error(f, f"{info.name} is in this shard but {INDEX_NAME} maps it to {mapped}")
        self.report.tensors = len(self.tensors)
        self.report.bytes = sum(t.nbytes for t in self.tensors.values())

        if weight_map is not None:
            missing: dict[str, list[str]] = {}
            for name, fname in weight_map.items():
                if fname not in files:
                    missing.setdefault(str(fname), []).append(name)
                elif fname in headers and name not in headers[fname].tensors and name not in self.tensors:
                    self.error(INDEX_NAME, f"maps {name} to {fname}, but no shard holds it")
                # (a tensor held by another shard is reported from that shard's side)
            for fname, names in missing.items():
                self.error(INDEX_NAME, f"maps {len(names)} tensor(s) ({names[0]}, ...) to {fname}, which does not exist")
            total = (index.get("metadata") or {}).get("total_size") if isinstance(index, dict) else None
            if total is None:
                self.warn(f"{INDEX_NAME}: no metadata.total_size")
            elif total != self.report.bytes:
                self.error(INDEX_NAME, f"metadata.total_size is {total}, but the shards hold {self.report.bytes} "
                                       "tensor bytes")

    # ---------------------------------------------------------------- modules, config
    def resolve(self) -> None:
        from .roles import Classifier, load_families, select_family

        families = load_families()
        classifier = Classifier(select_family(self.config, families), families["generic"])
        self.classifier = classifier
        for name, info in self.tensors.items():
            mod, _, suffix = name.rpartition(".")
            if suffix in ("weight",) + QUANT_SUFFIXES and mod:
                self.modules.setdefault(mod, Module(mod)).parts[suffix] = info
        for mod in list(self.modules):
            m = self.modules[mod]
            if not ({"weight", "weight_packed", "weight_scale", "weight_global_scale", "weight_scale_2"} & set(m.parts)):
                del self.modules[mod]  # only activation scales: not a weight-bearing module
                continue
            m.role = classifier.role(mod + ".weight")

        qc = self.config.get("quantization_config")
        if (isinstance(qc, dict) and str(qc.get("quant_method", "")).lower().startswith("modelopt")) or \
                (qc is None and (self.dst / HF_QUANT_CONFIG).exists()):
            self._resolve_modelopt(qc)
            return
        if (self.dst / HF_QUANT_CONFIG).exists():
            self.warn(f"{HF_QUANT_CONFIG}: left beside a compressed-tensors config.json; TensorRT-LLM would read "
                      "it as a ModelOpt checkpoint (delete it)")
        if qc is None:
            resolver = None
        elif not isinstance(qc, dict):
            self.error("config.json", "quantization_config is not an object")
            resolver = None
        else:
            if qc.get("quant_method") != "compressed-tensors":
                self.error("config.json", f"quantization_config.quant_method is {qc.get('quant_method')!r}; "
                                          "qstream writes (and verify checks) compressed-tensors")
            if qc.get("quantization_status") != "compressed":
                self.error("config.json", f"quantization_config.quantization_status is "
                                          f"{qc.get('quantization_status')!r}, expected 'compressed' for packed weights")
            try:
                resolver = Resolver(qc, self.warn)
            except QStreamError as e:
                self.report.errors.append(str(e))
                resolver = None
        if not self.config_ok:
            return  # nothing to check the modules against (already reported)
        for m in self.modules.values():
            m.group = resolver.resolve(m) if resolver else None
            if m.group is None:
                self._check_unquantized(m)
            elif m.group.kind is not None:
                self.report.modules[m.group.format] = self.report.modules.get(m.group.format, 0) + 1
                self._check_quantized(m)
        if resolver:
            for t in resolver.target_to_group:
                if t not in resolver.used:
                    self.warn(f"config.json: target {t!r} ({resolver.target_to_group[t].name}) matches no module")

    def _check_unquantized(self, m: Module) -> None:
        w = m.parts.get("weight")
        if m.ndim == 2 and m.role not in ("embedding", "norm"):
            self.report.ignored_modules += 1
        for s in ("weight_packed", "weight_scale", "weight_global_scale", "weight_scale_2"):
            t = m.parts.get(s)
            if t is not None:
                self.error(t.path.name, f"{t.name} exists but {m.name} resolves to no quantization_config group "
                                        "(ignored or untargeted): loaders would not read it")
                return
        if w is None:
            self.error(m.file, f"{m.name}.weight is missing")
        elif w.dtype.startswith("F8_"):
            self.error(w.path.name, f"{w.name} is {w.dtype} but {m.name} resolves to no quantization_config group")

    def _expect(self, m: Module, suffix: str, dtypes: tuple[str, ...], shape: tuple[int, ...] | None) -> TensorInfo | None:
        name = f"{m.name}.{suffix}"
        t = m.parts.get(suffix)
        if t is None:
            self.error(m.file, f"{name} is missing ({m.name} resolves to {m.group.desc})")
            return None
        if t.dtype not in dtypes:
            self.error(t.path.name, f"{name} has dtype {t.dtype}, expected {' or '.join(dtypes)}")
            return None
        if shape is not None and tuple(t.shape) != tuple(shape):
            self.error(t.path.name, f"{name} has shape {list(t.shape)}, expected {list(shape)}")
            return None
        return t

    def _expect_packed(self, m: Module, suffix: str, gsize: int) -> tuple[TensorInfo | None, int | None, int | None]:
        """The packed FP4 tensor of ``m`` (U8 [out, in/2]) with its logical rows and columns;
        (None, rows, cols) after reporting a wrong shape or group size."""
        packed = self._expect(m, suffix, ("U8",), None)
        if packed is not None and len(packed.shape) != 2:
            self.error(packed.path.name, f"{packed.name} has shape {list(packed.shape)}, expected 2-D [out, in/2]")
            return None, None, None
        if packed is None:
            return None, None, None
        rows, cols = packed.shape[0], packed.shape[1] * 2
        if cols % gsize:
            self.error(packed.path.name, f"{packed.name} has {cols} input columns, not a multiple of {gsize}")
            return None, rows, cols
        return packed, rows, cols

    def _check_quantized(self, m: Module) -> None:
        g = m.group
        ok = True
        if g.kind in ("nvfp4", "mxfp4"):
            gs_default = 16 if g.kind == "nvfp4" else 32
            gsize = g.weights.get("group_size") or gs_default
            if gsize != gs_default:
                self.error("config.json", f"{g.name} ({g.format}) has group_size {gsize}; the format uses {gs_default}")
                return
            expected = {"weight_packed", "weight_scale"} | ({"weight_global_scale"} if g.kind == "nvfp4" else set())
            if g.kind == "nvfp4" and g.input_activations:
                expected.add("input_global_scale")
            packed, rows, cols = self._expect_packed(m, "weight_packed", gsize)
            scale_dtype = "F8_E4M3" if g.kind == "nvfp4" else "U8"
            scale = self._expect(m, "weight_scale", (scale_dtype,),
                                 (rows, cols // gsize) if packed is not None else None)
            ok = packed is not None and scale is not None
            if g.kind == "nvfp4":
                ok &= self._expect(m, "weight_global_scale", ("F32",), (1,)) is not None
                if "input_global_scale" in expected:
                    ok &= self._expect(m, "input_global_scale", ("F32",), (1,)) is not None
        elif g.kind == "fp8":
            w = self._expect(m, "weight", ("F8_E4M3",), None)
            expected = {"weight", "weight_scale"}
            if w is not None and len(w.shape) != 2:
                self.error(w.path.name, f"{w.name} has shape {list(w.shape)}, expected 2-D")
                w = None
            strategy = g.weights.get("strategy")
            sshape = None
            if w is not None:
                o, i = w.shape
                if strategy == "tensor":
                    sshape = (1,)
                elif strategy == "channel":
                    sshape = (o, 1)
                elif strategy == "block":
                    b0, b1 = g.weights.get("block_structure") or (128, 128)
                    sshape = (-(-o // b0), -(-i // b1))
                elif strategy == "group":
                    sshape = (o, -(-i // (g.weights.get("group_size") or 128)))
                else:
                    self.error("config.json", f"{g.name} has FP8 weight strategy {strategy!r}, which verify does not know")
            scale = self._expect(m, "weight_scale", FLOAT_SCALE_DTYPES, sshape)
            ok = w is not None and scale is not None and sshape is not None
            ia = g.input_activations
            if ia and not ia.get("dynamic", False):
                expected.add("input_scale")
                ok &= self._expect(m, "input_scale", FLOAT_SCALE_DTYPES, (1,)) is not None
        else:
            return
        for suffix, t in m.parts.items():
            if suffix not in expected:
                what = "an unquantized weight left beside the quantized one" if suffix == "weight" else "unexpected"
                self.error(t.path.name, f"{t.name} is {what} ({m.name} resolves to {g.desc})")
                ok = False
        m.ok = ok

    # ---------------------------------------------------------------- ModelOpt NVFP4
    def _modelopt_config(self, qc: dict | None) -> tuple[str, list[str]] | None:
        """(quant_algo, exclude_modules) of a ModelOpt checkpoint, after checking that config.json's
        quantization_config and hf_quant_config.json agree; None when there is nothing to resolve
        modules against (already reported)."""
        hf: dict | None = None
        path = self.dst / HF_QUANT_CONFIG
        if not path.exists():
            self.error(HF_QUANT_CONFIG, "missing, but config.json says ModelOpt; TensorRT-LLM reads quant_algo and "
                                        "exclude_modules from it")
        else:
            try:
                obj = json.loads(path.read_text(encoding="utf-8"))
                hf = obj.get("quantization") if isinstance(obj, dict) else None
                if not isinstance(hf, dict):
                    raise ValueError("no 'quantization' object")
            except (OSError, ValueError, UnicodeDecodeError) as e:
                self.error(HF_QUANT_CONFIG, f"cannot be read ({e})")
                hf = None
        if qc is None and self.config_ok:
            self.error("config.json", f"has no quantization_config, but {HF_QUANT_CONFIG} describes a ModelOpt "
                                      "checkpoint; transformers and vLLM read config.json's (qstream writes both)")

        def excludes(where: str, key: str, value) -> list[str] | None:
            if value is None:
                return []
            if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
                self.error(where, f"{key} is not a list of module names / wildcards")
                return None
            return value

        def group_sizes(where: str, values) -> None:
            for key, v in values:
                if v is not None and v != MO_GROUP_SIZE:
                    self.error(where, f"{key} is {v!r}; NVFP4 blocks are {MO_GROUP_SIZE} weights")

        algo_cfg = algo_hf = excl_cfg = excl_hf = None
        if isinstance(qc, dict):
            algo_cfg = str(qc.get("quant_algo") or "").upper()
            excl_cfg = excludes("config.json", "quantization_config.ignore", qc.get("ignore"))
            groups = qc.get("config_groups") if isinstance(qc.get("config_groups"), dict) else {}
            group_sizes("config.json", [("quantization_config.group_size", qc.get("group_size"))] + [
                (f"quantization_config.config_groups.{k}.weights.group_size", (g.get("weights") or {}).get("group_size"))
                for k, g in groups.items() if isinstance(g, dict) and isinstance(g.get("weights"), dict)])
        if hf is not None:
            algo_hf = str(hf.get("quant_algo") or "").upper()
            excl_hf = excludes(HF_QUANT_CONFIG, "quantization.exclude_modules", hf.get("exclude_modules"))
            group_sizes(HF_QUANT_CONFIG, [("quantization.group_size", hf.get("group_size"))])
        if algo_cfg is not None and algo_hf is not None and algo_cfg != algo_hf:
            self.error(HF_QUANT_CONFIG, f"quantization.quant_algo is {algo_hf or None!r} but config.json's "
                                        f"quantization_config.quant_algo is {algo_cfg or None!r}; runtimes read one "
                                        "or the other")
        if excl_cfg is not None and excl_hf is not None and set(excl_cfg) != set(excl_hf):
            only_hf = sorted(set(excl_hf) - set(excl_cfg))
            only_cfg = sorted(set(excl_cfg) - set(excl_hf))
            self.error(HF_QUANT_CONFIG, f"quantization.exclude_modules differs from config.json's "
                                        f"quantization_config.ignore (only here: {only_hf}; only in config.json: "
                                        f"{only_cfg}); TensorRT-LLM reads this one, vLLM config.json's")
        algo = algo_cfg if algo_cfg is not None else algo_hf
        excl = excl_cfg if qc is not None else excl_hf  # what vLLM / transformers resolve against
        if algo is None or excl is None:
            return None
        if algo not in MO_ALGOS:
            where = "config.json" if algo_cfg is not None else HF_QUANT_CONFIG
            self.error(where, f"ModelOpt quant_algo {algo or None!r}; verify checks ModelOpt NVFP4 "
                              f"({', '.join(MO_ALGOS)})")
            return None
        return algo, excl

    def _resolve_modelopt(self, qc: dict | None) -> None:
        """Modules against ModelOpt's ``exclude_modules``, matched the way the runtimes do it
        (modelopt.check_excludes): each module under its own name and the names vLLM /
        TensorRT-LLM give its layer (``qkv_proj``, ``gate_up_proj``, the ``experts`` of a MoE).
        TensorRT-LLM: ``fnmatchcase``. vLLM: exact, substring and ``fnmatch`` over the entries,
        ``x*`` also read as ``x`` and ``x.*`` (its ``apply_vllm_mapper``). A quantized module must
        be excluded by neither; an unquantized Linear must be excluded by both."""
        from .modelopt import _runtime_names

        cfg = self._modelopt_config(qc)
        if not self.config_ok or cfg is None:
            return
        algo, excl = cfg
        group = Group("modelopt", algo, "nvfp4", {"group_size": MO_GROUP_SIZE}, None, layout="modelopt")
        for m in self.modules.values():
            w = m.parts.get("weight")
            quant = [m.parts[s] for s in ("weight_scale_2", "weight_scale") + CT_ONLY_SUFFIXES if s in m.parts]
            if w is not None and w.dtype == "U8":
                quant.append(w)
            linear = m.ndim == 2 and m.role not in ("embedding", "norm")
            names = _runtime_names(m.name) if linear else [m.name]
            vllm = [(e, n) for n in names for e in excl if _vllm_excludes(e, n)]
            trt = [(e, n) for n in names for e in excl if fnmatch.fnmatchcase(n, e)]
            if quant:
                t = quant[0]
                if not linear:
                    self.error(t.path.name, f"{t.name} exists but {m.name} is not a Linear ({m.role}); ModelOpt "
                                            "loaders never quantize it")
                elif vllm or trt:
                    e, n = (vllm or trt)[0]
                    who = "vLLM and TensorRT-LLM" if vllm and trt else ("vLLM" if vllm else "TensorRT-LLM")
                    layer = "" if n == m.name else f" (as layer {n})"
                    self.error(t.path.name, f"{t.name} exists but exclude_modules entry {e!r} excludes "
                                            f"{m.name}{layer} in {who}, which would load it unquantized")
                else:
                    m.group = group
                    self.report.modules[algo] = self.report.modules.get(algo, 0) + 1
                    self._check_modelopt_quantized(m)
                continue
            if linear and w is not None and not trt:
                who = "vLLM or TensorRT-LLM" if not vllm else "TensorRT-LLM (fnmatch)"
                self.error(w.path.name, f"{w.name} is {w.dtype}, unquantized, but no exclude_modules entry excludes "
                                        f"{m.name} in {who}, which would load it as {algo} (expecting U8 "
                                        f"{m.name}.weight, weight_scale and weight_scale_2)")
                continue
            self._check_unquantized(m)

    def _check_modelopt_quantized(self, m: Module) -> None:
        g = m.group
        ct = [m.parts[s] for s in CT_ONLY_SUFFIXES if s in m.parts]
        if ct and "weight" not in m.parts:
            self.error(ct[0].path.name, f"{m.name} holds compressed-tensors tensors ({', '.join(t.name for t in ct)}) "
                                        f"in a ModelOpt {g.format} checkpoint, which stores {m.name}.weight (U8), "
                                        f"weight_scale and weight_scale_2")
            return
        weight, rows, cols = self._expect_packed(m, "weight", MO_GROUP_SIZE)
        scale = self._expect(m, "weight_scale", ("F8_E4M3",), (rows, cols // MO_GROUP_SIZE) if weight else None)
        ok = weight is not None and scale is not None
        expected = {"weight", "weight_scale", "weight_scale_2"} | ({"input_scale"} if g.format == "NVFP4" else set())
        for suffix in sorted(expected - {"weight", "weight_scale"}):
            t = self._expect(m, suffix, ("F32",), None)
            if t is not None and tuple(t.shape) not in ((), (1,)):
                self.error(t.path.name, f"{t.name} has shape {list(t.shape)}, expected a scalar ([] or [1])")
                t = None
            ok &= t is not None
        for suffix, t in m.parts.items():
            if suffix not in expected:
                if suffix in CT_ONLY_SUFFIXES:
                    what = f"a compressed-tensors tensor in a ModelOpt {g.format} checkpoint"
                elif suffix == "input_scale":
                    what = f"unexpected: {g.format} is weight-only"
                else:
                    what = "unexpected"
                self.error(t.path.name, f"{t.name} is {what} ({m.name} resolves to {g.desc})")
                ok = False
        m.ok = ok

    # ---------------------------------------------------------------- values
    def _scan_one(self, info: TensorInfo, kind: str) -> tuple[TensorInfo, str, int]:
        item = DTYPES[info.dtype].itemsize
        step = max(item, self.scan_block // item * item)
        bad = 0
        for off in range(0, info.nbytes, step):
            n = min(step, info.nbytes - off)
            buf = np.empty(n, np.uint8)
            self.reader.read_bytes(info.path, info.begin + off, n, memoryview(buf))
            bad += _count_bad(buf, info.dtype, kind)
        return info, kind, bad

    def scan(self, pool: ThreadPoolExecutor) -> None:
        jobs: list[tuple[TensorInfo, str]] = []
        mx_scales = {m.parts["weight_scale"].name for m in self.modules.values()
                     if m.group is not None and m.group.kind == "mxfp4" and "weight_scale" in m.parts}
        for info in self.tensors.values():
            if info.dtype in ("F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2", "F8_E8M0"):
                jobs.append((info, info.dtype))
            elif info.name in mx_scales and info.dtype == "U8":
                jobs.append((info, "E8M0_U8"))
        for info, kind, bad in pool.map(lambda j: self._scan_one(*j), jobs):
            self.report.scanned_bytes += info.nbytes
            if not bad:
                continue
            if kind == "E8M0_U8":
                what = f"holds {bad} exponent(s) 255, which decode to NaN/Inf scales"
            elif kind == "F8_E4M3" and info.name.endswith("_scale"):
                what = f"holds {bad} NaN E4M3 scale(s) (byte 0x7F/0xFF)"
            else:
                what = f"holds {bad} NaN/Inf value(s)"
            self.error(info.path.name, f"{info.name} {what}")
        # NVFP4 global scales: a divisor, so finite and > 0; fused partners should share one
        sets: dict[str, list[tuple[str, float]]] = {}
        what = "global scales"
        for m in self.modules.values():
            if m.group is None or m.group.kind != "nvfp4":
                continue
            modelopt = m.group.layout == "modelopt"
            t = m.parts.get("weight_scale_2" if modelopt else "weight_global_scale")
            if t is None or t.dtype != "F32" or t.numel != 1:
                continue
            v = float(self.reader.read(t).reshape(-1)[0])
            if math.isfinite(v) and v <= 0:
                self.error(t.path.name, f"{t.name} is {v}; " + ("weight_scale_2 (a multiplier) must be positive"
                                                                if modelopt else "a global scale must be positive"))
            if modelopt:
                what = "weight_scale_2 values"
            key = self.classifier.fused_key(m.name + ".weight")
            if key is not None:
                sets.setdefault(key, []).append((m.name, v))
        for members in sets.values():
            if len({v for _, v in members}) > 1:
                self.warn(f"NVFP4 fused partners {', '.join(n for n, _ in members)} have different {what} "
                          f"({', '.join(f'{v:g}' for _, v in members)}); vLLM takes one for the fused GEMM")

    # ---------------------------------------------------------------- against the source
    def measure(self, src_root: str, pool: ThreadPoolExecutor) -> None:
        from .convert import Executor
        from .plan import Op, Options, Plan, find_fp8_weights, make_plan
        from .safetensors_io import FLOAT_SOURCE_DTYPES
        from .source import open_checkpoint

        self.report.source = str(src_root)
        src = open_checkpoint(src_root)
        quantized = [m for m in self.modules.values() if m.group is not None and m.group.kind is not None]
        counts: dict[str, int] = {}
        for m in quantized:
            if m.group.kind in ("nvfp4", "mxfp4"):
                counts[m.group.kind] = counts.get(m.group.kind, 0) + 1
        mlp = max(counts, key=lambda k: counts[k]) if counts else "none"
        try:
            plan = make_plan(src, Options(mlp=mlp))
        except QStreamError as e:
            self.warn(f"{src_root}: cannot plan a conversion of the source ({e}); matching by name only")
            plan = Plan(src, Options(mlp=mlp), "", [], [], {}, None, [])
        try:
            fp8map = find_fp8_weights(src.tensors, src.config)
        except QStreamError as e:
            self.report.errors.append(f"{src_root}: {e}")
            fp8map = {}
        by_module = {op.module: op for op in plan.ops if op.kind in ("quantize", "repack")}
        roles = {op.module: op.role for op in plan.ops}

        def source_op(module: str):
            op = by_module.get(module)
            if op is not None:
                return op
            info = src.tensors.get(module + ".weight")
            if info is None or len(info.shape) != 2:
                return None
            role = roles.get(module) or self.classifier.role(info.name)
            f = fp8map.get(info.name)
            if f is not None:
                return Op("quantize", role, info, [], src_scale=f.scale, layout=f.layout, block=f.block)
            if info.dtype in FLOAT_SOURCE_DTYPES:
                return Op("copy", role, info, [])
            return None

        jobs = []
        for m in quantized:
            if not m.ok:
                continue  # its structural error is already reported
            op = source_op(m.name)
            if op is None:
                self.error(m.file, f"{m.name}: no source weight for it in {src_root} "
                                   f"(looked for {m.name}.weight, FP8 with scales, and fused 3-D experts)")
                continue
            shape = self._dst_shape(m)
            if tuple(op.shape) != shape:
                self.error(m.file, f"{m.name} has shape {list(shape)} but its source {op.source.name} reads as "
                                   f"{list(op.shape)}")
                continue
            jobs.append((m, op))

        with tempfile.TemporaryDirectory(prefix="qstream-verify-") as tmp:
            ex = Executor(plan, Path(tmp), threads=1)
            try:
                results = list(pool.map(lambda j: self._measure_one(ex, *j), jobs))
            finally:
                ex.reader.close()
        self.report.metrics = sorted(results, key=_sort_key)

    def _dst_shape(self, m: Module) -> tuple[int, int]:
        packed = "weight" if m.group is not None and m.group.layout == "modelopt" else "weight_packed"
        if packed in m.parts:
            o, c = m.parts[packed].shape
            return (o, 2 * c)
        return tuple(m.parts["weight"].shape)  # type: ignore[return-value]

    def _measure_one(self, ex, m: Module, op) -> TensorMetrics:
        from .schemes import fp8

        g = m.group
        rows, cols = self._dst_shape(m)
        desc = op.source.name
        if op.view is not None:
            v = op.view
            desc += f"[expert {v.expert}, rows {v.start}::{v.step} x{v.count}{', transposed' if v.transpose else ''}]"
        elif op.src_scale is not None:
            desc += f" x {op.src_scale.name} ({op.layout})"
        met = TensorMetrics(m.name, op.role, g.kind, (rows, cols), desc)
        gs = scale = None
        modelopt = g.layout == "modelopt"
        if g.kind == "nvfp4":
            gs = np.float32(self.reader.read(m.parts["weight_scale_2" if modelopt else "weight_global_scale"])
                            .reshape(-1)[0])
        elif g.kind == "fp8":
            scale = self.reader.read(m.parts["weight_scale"]).astype(np.float32)
        if op.view is not None and op.view.transpose:
            step = rows  # the executor reads a transposed expert slab whole anyway
        else:
            step = max(1, self.decode_block // (4 * max(1, cols)))
            if g.kind == "fp8" and g.weights.get("strategy") == "block":
                b0 = (g.weights.get("block_structure") or (128, 128))[0]
                step = max(b0, step // b0 * b0)
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            w = np.asarray(ex.read_float(op, r0, r1), dtype=np.float32)
            if modelopt:
                w_hat = decode_modelopt_nvfp4(self.reader.read_rows(m.parts["weight"], r0, r1),
                                              self.reader.read_rows(m.parts["weight_scale"], r0, r1), gs)
            elif g.kind == "nvfp4":
                w_hat = decode_nvfp4(self.reader.read_rows(m.parts["weight_packed"], r0, r1),
                                     self.reader.read_rows(m.parts["weight_scale"], r0, r1), gs)
            elif g.kind == "mxfp4":
                w_hat = decode_mxfp4(self.reader.read_rows(m.parts["weight_packed"], r0, r1),
                                     self.reader.read_rows(m.parts["weight_scale"], r0, r1))
            else:
                x = fp8.decode_fp8(self.reader.read_rows(m.parts["weight"], r0, r1))
                strategy = g.weights.get("strategy")
                if strategy == "group":
                    gsz = g.weights.get("group_size") or 128
                    x *= np.repeat(scale[r0:r1], gsz, axis=1)[:, :cols]
                    w_hat = x
                else:
                    block = tuple(g.weights.get("block_structure") or (128, 128)) if strategy == "block" else None
                    w_hat = fp8.apply_scale(x, scale, strategy, r0, block)
            met.add(w, w_hat)
        return met


def _vllm_excludes(entry: str, layer: str) -> bool:
    """vLLM ModelOptQuantConfigBase.is_layer_excluded for one entry: exact, substring, fnmatch;
    with apply_vllm_mapper an entry ``x*`` (not ``x.*``) also reads as ``x`` and ``x.*``."""
    if entry == layer or entry in layer or fnmatch.fnmatchcase(layer, entry):
        return True
    if len(entry) >= 2 and entry.endswith("*") and entry[-2] != ".":
        return entry[:-1] in layer or fnmatch.fnmatchcase(layer, entry[:-1] + ".*")
    return False


def _count_bad(buf: np.ndarray, dtype: str, kind: str) -> int:
    if kind == "E8M0_U8" or dtype == "F8_E8M0":
        return int(np.count_nonzero(buf == 0xFF))
    if dtype == "F8_E4M3":
        return int(np.count_nonzero((buf & 0x7F) == 0x7F))
    if dtype == "F8_E5M2":
        return int(np.count_nonzero((buf & 0x7C) == 0x7C))
    if dtype == "BF16":
        return int(np.count_nonzero((buf.view(np.uint16) & 0x7F80) == 0x7F80))
    return int(np.count_nonzero(~np.isfinite(buf.view(DTYPES[dtype]))))


def verify(dst: str | Path, source: str | Path | None = None, *, threads: int | None = None,
           max_rel_error: float | None = None, scan_block: int = SCAN_BLOCK, decode_block: int = DECODE_BLOCK) -> Report:
    """Check DST (and measure it against SOURCE when given); every problem found is in
    ``report.errors`` as one line ``<file>: <what is wrong>``."""
    import time

    t0 = time.perf_counter()
    v = Verifier(Path(dst), threads=threads, scan_block=scan_block, decode_block=decode_block)
    try:
        v.load()
        v.resolve()
        with ThreadPoolExecutor(v.threads, thread_name_prefix="qstream-verify") as pool:
            v.scan(pool)
            if source is not None:
                v.measure(str(source), pool)
    finally:
        v.reader.close()
    if not v.report.modules and not v.report.errors:
        v.report.errors.append(f"{dst}: no quantized module found (config.json has "
                               + ("a quantization_config that matches no module" if v.config.get("quantization_config")
                                  else "no quantization_config")
                               + "): this is an unquantized checkpoint, not a quantized output; verify checks "
                               "the output of `qstream convert`.")
    if source is not None and max_rel_error is None:
        v.report.check_threshold(DEFAULT_MAX_REL_ERROR, default=True)
    elif max_rel_error is not None:
        v.report.check_threshold(max_rel_error)
    v.report.seconds = time.perf_counter() - t0
    return v.report


# --------------------------------------------------------------------------- printing

def _fmt(x: float | None, spec: str) -> str:
    if x is None:
        return "-"
    return format(x, spec)


def print_report(report: Report, console, err, top: int | None = None) -> None:
    """Tables on ``console`` (stdout), errors and warnings as one line each on ``err``."""
    from rich.markup import escape
    from rich.table import Table

    from .card import human

    mods = ", ".join(f"{k} {n}" for k, n in sorted(report.modules.items())) or "none"
    console.print(f"[bold]{escape(str(report.dst))}[/]: {report.shards} shard(s), {report.tensors} tensors, "
                  f"{human(report.bytes)}; quantized modules: {mods}; unquantized linears: {report.ignored_modules}; "
                  f"{human(report.scanned_bytes)} scanned for NaN/Inf")
    if report.metrics is not None and not report.metrics:
        console.print(f"no quantized module could be measured against {escape(str(report.source))}")
    elif report.metrics is not None:
        for title, rows in (("Error by role", report.by(lambda m: m.role)),
                            ("Error by scheme", report.by(lambda m: m.scheme))):
            t = Table(title=title + f" (against {report.source})", title_justify="left")
            for c, j in (("", "left"), ("tensors", "right"), ("rel error", "right"), ("rel MSE", "right"),
                         ("SNR dB", "right"), ("max abs err", "right"), ("worst rel error", "right"), ("worst", "left")):
                t.add_column(c, justify=j)
            for k, a in rows.items():
                t.add_row(k, str(a["tensors"]), _fmt(a["rel_error"], ".4f"), _fmt(a["rel_mse"], ".3e"),
                          _fmt(a["snr_db"], ".2f"), _fmt(a["max_abs_error"], ".3e"), _fmt(a["max_rel_error"], ".4f"),
                          a["worst"] or "")
            console.print(t)
        n = 20 if top is None else top
        if n:
            t = Table(title=f"Worst tensors (top {min(n, len(report.metrics))} of {len(report.metrics)})",
                      title_justify="left")
            for c, j in (("module", "left"), ("role", "left"), ("scheme", "left"), ("shape", "left"),
                         ("rel error", "right"), ("SNR dB", "right"), ("max abs err", "right")):
                t.add_column(c, justify=j)
            for m in report.metrics[:n]:
                t.add_row(m.module, m.role, m.scheme, "x".join(map(str, m.shape)), _fmt(_num(m.rel_error), ".4f"),
                          _fmt(_num(m.snr_db), ".2f"), _fmt(_num(m.max_abs), ".3e"))
            console.print(t)
    for w in report.warnings:
        err.print(f"[yellow]warning:[/] {escape(w)}", highlight=False, soft_wrap=True)
    for e in report.errors[:MAX_PRINTED_ERRORS]:
        err.print(f"[red]error:[/] {escape(e)}", highlight=False, soft_wrap=True)
    if len(report.errors) > MAX_PRINTED_ERRORS:
        err.print(f"[red]error:[/] ... and {len(report.errors) - MAX_PRINTED_ERRORS} more (--json lists all)",
                  highlight=False, soft_wrap=True)
    if report.ok:
        console.print(f"verify: OK ({report.seconds:.1f} s)")
    else:
        console.print(f"verify: FAILED, {len(report.errors)} error(s) ({report.seconds:.1f} s)")
