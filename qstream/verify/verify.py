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

Where each job lives: this module loads the folder, resolves and checks modules and
scans values (:class:`Verifier`, :func:`verify`); :mod:`qstream.verify.rules` the
module/group model and compressed-tensors resolution; :mod:`qstream.verify.modelopt` the
ModelOpt rules; :mod:`qstream.verify.measure` the source comparison;
:mod:`qstream.schemes.decode` the FP4 decoders; :mod:`qstream.verify.report` the results
and their printing.
"""

from __future__ import annotations

import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..errors import QStreamError
from ..layouts.modelopt import HF_QUANT_CONFIG
from ..safetensors_io import DTYPES, ShardReader, TensorInfo, read_header
from ..sources.source import INDEX_NAME
from .measure import SourceMeasure
from .modelopt import ModeloptChecks
from .report import Report, TensorMetrics, aggregate, print_report  # noqa: F401 - verify's public API
from .rules import (DECODE_BLOCK, FLOAT_SCALE_DTYPES, QUANT_SUFFIXES, SCAN_BLOCK, Module, Resolver,
                    read_json_member)

# verify --source fails a tensor past this relative error unless --max-rel-error says otherwise:
# FP4 measures about 0.08-0.12 (0.2 on outlier-heavy rows), a wrong source about 1.4.
DEFAULT_MAX_REL_ERROR = 0.5


# --------------------------------------------------------------------------- the checker

class Verifier(ModeloptChecks, SourceMeasure):
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
                index, weight_map = read_json_member(index_path, "weight_map")
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
        from ..roles import Classifier, load_families, select_family

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
        if isinstance(qc, dict) and qc.get("quant_method") == "mxfp4":  # gpt-oss in OpenAI's layout
            self._resolve_openai(qc)
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

    def _resolve_openai(self, qc: dict) -> None:
        """gpt-oss MXFP4 in OpenAI's layout (qstream/layouts/openai_mxfp4.py): every stacked
        ``*_blocks`` U8 [E, rows, G, 16] has its ``*_scales`` U8 [E, rows, G] (and a ``*_bias``
        [E, rows] if any); everything else is unquantized. Structure only: ``--source`` does not
        measure this layout yet."""
        if not isinstance(qc.get("modules_to_not_convert"), list):
            self.error("config.json", "quantization_config (quant_method mxfp4) has no modules_to_not_convert list")
        if self.config.get("model_type") != "gpt_oss":
            self.error("config.json", f"quant_method mxfp4 is gpt-oss's layout, but model_type is "
                                      f"{self.config.get('model_type')!r}")
        for name, t in self.tensors.items():
            if not name.endswith("_blocks"):
                continue
            base = name.removesuffix("_blocks")
            if t.dtype != "U8" or len(t.shape) != 4 or t.shape[3] != 16:
                self.error(t.path.name, f"{name} is {t.dtype} {list(t.shape)}, expected U8 [experts, rows, groups, 16]")
                continue
            self.report.modules["mxfp4"] = self.report.modules.get("mxfp4", 0) + 1
            for suffix, shape in (("_scales", tuple(t.shape[:3])), ("_bias", tuple(t.shape[:2]))):
                o = self.tensors.get(base + suffix)
                if o is None:
                    if suffix == "_scales":
                        self.error(t.path.name, f"{base}_scales is missing (the E8M0 scales of {name})")
                elif tuple(o.shape) != shape or (suffix == "_scales" and o.dtype != "U8"):
                    self.error(o.path.name, f"{o.name} is {o.dtype} {list(o.shape)}, expected "
                                            f"{'U8 ' if suffix == '_scales' else ''}{list(shape)} for {name}")
        if not self.report.modules:
            self.error("config.json", "quant_method mxfp4 but no experts *_blocks tensor was found")
        for m in self.modules.values():
            self._check_unquantized(m)

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
