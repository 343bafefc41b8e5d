"""`convert --calibrate FILE`: GPTQ of every FP4 Linear, one decoder layer at a time.

The calibration text is tokenized with the source's tokenizer (no special tokens, as one
document) and cut into ``samples`` windows of ``seqlen`` tokens. The layer-by-layer engine
(:mod:`qstream.layerwise`: the family's own transformers decoder layers, built from
config.json on the meta device and filled from the shards, FP8 decoded) embeds them and,
for each decoder layer in turn, as llm-compressor's sequential pipeline does:

1. reads the layer from the shards;
2. runs every window through it with a hook on each Linear the plan quantizes to FP4,
   accumulating its Hessian (:class:`qstream.gptq.Hessian`) and its input max |x|;
3. GPTQs each such Linear in plan order (:func:`qstream.gptq.gptq_quantize`: the plan's FP4
   scheme, its NVFP4 global scale computed per fused set from the source weights exactly
   as the converter computes it, the plan's ``--scale-search`` per group) and puts the
   decoded result into the layer;
4. runs the windows through the now quantized layer: their outputs are the next layer's
   inputs (the error of the earlier quantized layers is what later layers calibrate on).

Only one layer's weights and the windows' hidden states are in memory. Each layer's codes and
scales (one ``.npy`` per array) and its input max |x| go into a folder
``DST/.cache/huggingface/qstream/calibration/layer-NNNNN`` made atomically (written under a
temporary name, fsynced, renamed), followed by the hidden states after that layer (only the
latest are kept), so an interrupted pass resumes (``--resume``) at the next layer with the
same bytes. The converter then writes these codes and scales (:class:`CalibratedWeights`,
memory-mapped) instead of encoding the source weights.

Determinism: the calibration arithmetic runs on torch with its own thread count (never
``--threads``), in a fixed order, so the output bytes do not depend on ``--threads``.

torch and transformers are imported here: only a run with ``--calibrate`` imports this module.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from .atomic import fsync_dir, replace_durably, write_atomic
from .errors import QStreamError
from .gptq import Hessian, gptq_quantize
from .layerwise import Skeleton, WeightStore, default_device, return_freed_memory, run_layer
from .plan.plan import Op, Plan
from .safetensors_io import DTYPES
from .schemes import SCHEMES, reference
from .writer import STAGING_DIR

DEFAULT_SAMPLES = 128
DEFAULT_SEQLEN = 512
CALIB_DIR = "calibration"  # under the staging dir
ABSMAX_FILE = "input_absmax.json"


def read_calibration_text(path: str | Path) -> str:
    """A UTF-8 text file, or a .jsonl file's ``text`` fields joined by blank lines."""
    p = Path(path)
    try:
        raw = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise QStreamError(f"{p}: cannot be read as UTF-8 text ({e.__class__.__name__}: {e}); pass a UTF-8 text "
                           "file (or a .jsonl file with a 'text' field) with --calibrate.") from e
    if p.suffix != ".jsonl":
        return raw
    texts = []
    for k, line in enumerate(raw.splitlines(), 1):
        if line.strip():
            try:
                texts.append(str(json.loads(line)["text"]))
            except (ValueError, KeyError, TypeError) as e:
                raise QStreamError(f"{p}: line {k} is not a JSON object with a 'text' field ({e}); fix the line "
                                   "or pass a plain text file with --calibrate.") from e
    return "\n\n".join(texts)


def calibration_ids(src: str | Path, path: str | Path, samples: int, seqlen: int) -> torch.Tensor:
    """[samples, seqlen] token ids: the first samples x seqlen tokens of FILE under SRC's tokenizer."""
    from transformers import AutoTokenizer

    text = read_calibration_text(path)
    try:
        tok = AutoTokenizer.from_pretrained(str(src))
    except (OSError, ValueError) as e:
        raise QStreamError(f"{src}: no tokenizer could be loaded ({e}); --calibrate tokenizes FILE with the source's "
                           "tokenizer, so the source folder needs its tokenizer files (tokenizer.json / "
                           "tokenizer_config.json).") from e
    ids = tok(text, add_special_tokens=False)["input_ids"]
    need = samples * seqlen
    if len(ids) < need:
        raise QStreamError(f"{path}: {len(ids)} tokens under the source's tokenizer, but --calib-samples {samples} x "
                           f"--calib-seqlen {seqlen} needs {need}; pass a longer text or fewer/shorter samples.")
    return torch.tensor(ids[:need], dtype=torch.long).reshape(samples, seqlen)


def calibration_key(ids: torch.Tensor) -> str:
    """Identity of the calibration tokens (what the plan's fingerprint records)."""
    a = np.ascontiguousarray(ids.cpu().numpy().astype(np.int64))
    return f"{a.shape[0]}x{a.shape[1]}:" + hashlib.sha256(a.tobytes()).hexdigest()[:32]


def calibrated_ops(plan: Plan) -> list[Op]:
    """The ops GPTQ replaces: every FP4 quantize op (refusing those it cannot do yet)."""
    ops = [op for op in plan.ops if op.kind == "quantize" and op.scheme in SCHEMES]
    for op in ops:
        if op.view is not None or op.layout in ("mxfp4", "modelopt"):
            raise QStreamError(f"{op.source.name}: --calibrate does not support fused or repacked expert weights "
                               "(MoE) yet; convert this model without --calibrate.")
    return ops


def _root(dst: Path) -> Path:
    return Path(dst) / STAGING_DIR / CALIB_DIR


def _save_npy(folder: Path, name: str, a: np.ndarray) -> None:
    with open(folder / name, "wb") as f:
        np.save(f, np.ascontiguousarray(a))
        f.flush()
        os.fsync(f.fileno())


class CalibratedWeights:
    """The calibration pass's codes and scales, by source tensor name (memory-mapped)."""

    def __init__(self, dst: Path, index: dict[str, str], absmax: dict[str, float]) -> None:
        self.root, self.index, self.absmax = _root(dst), index, absmax

    def get(self, op: Op, gs) -> tuple[np.ndarray, np.ndarray] | None:
        """(packed, scale) of ``op``, or None when the pass did not calibrate it (outside the
        decoder layers: quantized data-free). ``gs``: the converter's NVFP4 global scale,
        which must be the one the pass used."""
        folder = self.index.get(op.source.name)
        if folder is None:
            return None
        d = self.root / folder
        stem = op.source.name.removesuffix(".weight")
        if gs is not None:
            used = json.loads((d / "global_scales.json").read_text())[stem]
            if np.float32(used) != np.float32(gs):
                raise QStreamError(f"{op.source.name}: the calibration pass used NVFP4 global scale {used} but the "
                                   f"converter computes {float(gs)}; rerun with --overwrite (stale calibration).")
        return (np.load(d / f"{stem}.packed.npy", mmap_mode="r"), np.load(d / f"{stem}.scale.npy", mmap_mode="r"))

    def input_absmax(self) -> dict[str, float]:
        """{HF module name: max |x| of its input over the calibration tokens} of every calibrated Linear."""
        return dict(self.absmax)

    def cleanup(self) -> None:
        """After a finished conversion: drop the per-layer folders, keep the input statistics."""
        for p in self.root.glob("layer-*"):
            shutil.rmtree(p, ignore_errors=True)
        for p in self.root.glob("hidden-*"):
            p.unlink(missing_ok=True)


def _global_scale(plan: Plan, op: Op, store: WeightStore, cache: dict) -> np.float32 | None:
    """The NVFP4 global scale of the op's fused set, as the converter computes it."""
    if not SCHEMES[op.scheme].has_global_scale:
        return None
    key = op.scale_group
    if key not in cache:
        by_module = {o.module: o for o in plan.ops if o.scale_group}
        members = [by_module[n] for n in plan.scale_groups[key]]
        amax = max(reference.tensor_absmax(store.decode(m.source.name)) for m in members)
        dtype = np.float32 if op.src_scale is not None or op.layout else DTYPES[op.source.dtype].type
        cache[key] = reference.nvfp4_global_scale(amax, dtype)
    return cache[key]


def _identity(plan: Plan, ids: torch.Tensor) -> dict:
    from . import __version__

    return {"plan": plan.fingerprint(), "tokens": calibration_key(ids), "version": __version__,
            "search": plan.options.scale_search}


def _start(root: Path, ident: dict, resume: bool, n_layers: int) -> tuple[int, list | None]:
    """(first layer to do, hidden states after the last done one) for this run."""
    meta = root / "meta.json"
    if resume and meta.is_file():
        try:
            same = json.loads(meta.read_text()) == ident
        except ValueError:
            same = False
        if same:
            for L in range(n_layers - 1, -1, -1):
                h = root / f"hidden-{L:05d}.pt"
                if (root / f"layer-{L:05d}").is_dir() and h.is_file():
                    return L + 1, torch.load(h, weights_only=True)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    write_atomic(meta, json.dumps(ident, indent=1), tmp=root / "meta.json.partial")
    return 0, None


def calibrate(plan: Plan, dst: str | Path, ids: torch.Tensor, *, resume: bool = False,
              device: torch.device | str | None = None,
              on_layer: Callable[[int, int], None] | None = None) -> CalibratedWeights:
    """Run the GPTQ pass over the plan's FP4 Linears on token windows ``ids`` [samples, seqlen]."""
    return_freed_memory()
    device = torch.device(device) if device is not None else default_device()
    ops = calibrated_ops(plan)
    store = WeightStore(plan.source)
    sk = Skeleton.build(plan.source.config, set(store.tensors))
    if any(isinstance(m, nn.Module) and type(m).__name__.endswith(("Experts", "SparseMoeBlock", "MoE"))
           for m in sk.decoder.layers[0].modules()):
        raise QStreamError(f"{plan.source.root}: a mixture-of-experts model; --calibrate does not run MoE layers "
                           "yet (experts would need their routed tokens); convert it without --calibrate.")
    root = _root(Path(dst))
    n = sk.num_layers
    by_layer: dict[int, list[Op]] = {}
    for op in ops:
        pre = f"{sk.prefix}.layers."
        if op.source.name.startswith(pre):
            by_layer.setdefault(int(op.source.name[len(pre):].split(".")[0]), []).append(op)
    first, hidden = _start(root, _identity(plan, ids), resume, n)
    try:
        with torch.inference_mode():
            if hidden is None:
                hidden = [sk.embed(w, store, device) for w in ids]
            hidden = [h.to(device) for h in hidden]
            calls = [sk.layer_inputs(h) for h in hidden]
            gscales: dict = {}
            for L in range(first, n):
                _layer_pass(plan, sk, store, L, by_layer.get(L, []), hidden, calls, root, device, gscales)
                h_path = root / f"hidden-{L:05d}.pt"
                torch.save([h.cpu() for h in hidden], root / "hidden.partial")
                with open(root / "hidden.partial", "rb+") as f:
                    os.fsync(f.fileno())
                replace_durably(root / "hidden.partial", h_path)
                (root / f"hidden-{L - 1:05d}.pt").unlink(missing_ok=True)
                if on_layer is not None:
                    on_layer(L, n)
    finally:
        store.close()
    return load(dst, plan)


def _layer_pass(plan, sk, store, L, ops, hidden, calls, root, device, gscales) -> None:
    layer = sk.layer(L, store, device)
    pre = f"{sk.prefix}.layers.{L}."
    mods: dict[str, nn.Linear] = {}
    for op in ops:
        sub = op.source.name[len(pre):].removesuffix(".weight")
        m = layer.get_submodule(sub) if sub else None
        if not isinstance(m, nn.Linear):
            raise QStreamError(f"{op.source.name}: is not an nn.Linear of {type(layer).__name__} in transformers; "
                               "--calibrate cannot hook its inputs; convert without --calibrate.")
        mods[op.source.name] = m
    hess = {name: Hessian(m.in_features, device) for name, m in mods.items()}
    handles = [m.register_forward_pre_hook(lambda _m, args, h=hess[name]: h.add(args[0])) for name, m in mods.items()]
    try:
        for k in range(len(hidden)):
            run_layer(layer, hidden[k], calls[k][L])
    finally:
        for h in handles:
            h.remove()
    tmp = root / f"layer-{L:05d}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    absmax, gs_used = {}, {}
    for op in ops:
        m, stem = mods[op.source.name], op.source.name.removesuffix(".weight")
        gs = _global_scale(plan, op, store, gscales)
        w = torch.from_numpy(np.asarray(store.decode(op.source.name), dtype=np.float32))
        packed, scale, q = gptq_quantize(w, hess[op.source.name].matrix(), op.scheme, gs, plan.options.scale_search)
        m.weight.data.copy_(q.to(device=device, dtype=m.weight.dtype))
        _save_npy(tmp, f"{stem}.packed.npy", packed)
        _save_npy(tmp, f"{stem}.scale.npy", scale)
        absmax[stem] = hess[op.source.name].absmax
        if gs is not None:
            gs_used[stem] = float(gs)
        del hess[op.source.name]
    for name, obj in ((ABSMAX_FILE, absmax), ("global_scales.json", gs_used)):
        with open(tmp / name, "w") as f:
            json.dump(obj, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
    fsync_dir(tmp)
    replace_durably(tmp, root / f"layer-{L:05d}")
    for k in range(len(hidden)):
        hidden[k] = run_layer(layer, hidden[k], calls[k][L])
    del layer


def load(dst: str | Path, plan: Plan | None = None) -> CalibratedWeights:
    """The calibration results in DST's staging dir (after :func:`calibrate`)."""
    root = _root(Path(dst))
    index: dict[str, str] = {}
    absmax: dict[str, float] = {}
    for d in sorted(root.glob("layer-[0-9]*")):
        if d.suffix == ".partial":
            continue
        a = json.loads((d / ABSMAX_FILE).read_text())
        absmax.update(a)
        for stem in a:
            index[stem + ".weight"] = d.name
    write_atomic(root / ABSMAX_FILE, json.dumps(dict(sorted(absmax.items())), indent=1),
                 tmp=root / (ABSMAX_FILE + ".partial"))
    return CalibratedWeights(Path(dst), index, absmax)
