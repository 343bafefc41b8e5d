"""`convert --calibrate FILE`: GPTQ of every FP4 Linear, one decoder layer at a time.

The calibration text is tokenized with the source's tokenizer (no special tokens, as one
document) and cut into ``samples`` windows of ``seqlen`` tokens. The layer-by-layer engine
(:mod:`qstream.layerwise`: the family's own transformers decoder layers, built from
config.json on the meta device and filled from the shards, FP8 decoded) embeds them and,
for each decoder layer in turn, as llm-compressor's sequential pipeline does:

1. reads the layer from the shards;
2. runs every window through it with a hook on each Linear the plan quantizes to FP4,
   accumulating its Hessian (:class:`qstream.gptq.Hessian`) and its input max |x| (the
   NVFP4 W4A4 input scales: :func:`qstream.activations.set_input_amax`; the inputs with the
   layers before L quantized and layer L the source's, as llm-compressor's sequential
   pipeline observes them, GPTQ calibrating with quantization disabled);
3. GPTQs each such Linear in plan order (:func:`qstream.gptq.gptq_quantize`: the plan's FP4
   scheme, its NVFP4 global scale computed per fused set from the source weights exactly
   as the converter computes it, the plan's ``--scale-search`` per group) and puts the
   decoded result into the layer;
4. runs the windows through the now quantized layer: their outputs are the next layer's
   inputs (the error of the earlier quantized layers is what later layers calibrate on).

Mixture-of-experts layers: transformers holds the routed experts as one fused module; a
forward pre-hook on it (:mod:`qstream.calib_experts`) gives each expert the Hessians of exactly
the tokens routed to it (gate/up: their hidden states; down: act(gate) * up of them). An
expert that no token reaches is quantized data-free (not in the results: the converter
encodes it as without --calibrate) and ``on_note`` says so. Expert Hessians are held at most
``expert_budget`` bytes at a time: more experts are captured in further passes over the
windows, stopping at the experts module, before any weight upstream of the experts changes,
so the bytes do not depend on the budget.

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
from .calib_experts import ExpertCapture, ExpertTarget, expert_targets, fused_experts, hessian_bytes, write_back
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
DATA_FREE_FILE = "data_free.json"  # per layer: the routed experts no calibration token reached
EXPERT_HESSIAN_BUDGET = 8 << 30  # bytes of routed-expert Hessians held at once (float32)


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
        if op.layout in ("mxfp4", "modelopt"):
            raise QStreamError(f"{op.source.name}: --calibrate does not GPTQ weights stored as {op.layout} blocks "
                               "(gpt-oss's MXFP4 experts, a ModelOpt source) yet; convert this model without "
                               "--calibrate.")
    return ops


def op_weight(store: WeightStore, op: Op, fused: dict) -> np.ndarray:
    """The op's [out, in] source weight as floats: the tensor, or a fused 3-D expert tensor's
    view (decoded once per layer into ``fused``)."""
    v = op.view
    if v is None:
        return store.decode(op.source.name)
    if op.source.name not in fused:
        fused[op.source.name] = store.decode(op.source.name)
    slab = fused[op.source.name][v.expert]
    slab = slab.T if v.transpose else slab
    return np.ascontiguousarray(slab[v.start: v.start + v.step * v.count: v.step])


def _root(dst: Path) -> Path:
    return Path(dst) / STAGING_DIR / CALIB_DIR


def _save_npy(folder: Path, name: str, a: np.ndarray) -> None:
    with open(folder / name, "wb") as f:
        np.save(f, np.ascontiguousarray(a))
        f.flush()
        os.fsync(f.fileno())


class CalibratedWeights:
    """The calibration pass's codes and scales, by source tensor name (memory-mapped)."""

    def __init__(self, dst: Path, index: dict[str, str], absmax: dict[str, float], data_free: list[str]) -> None:
        self.root, self.index, self.absmax = _root(dst), index, absmax
        self.data_free = data_free  # routed experts no calibration token reached: quantized data-free

    def get(self, op: Op, gs) -> tuple[np.ndarray, np.ndarray] | None:
        """(packed, scale) of ``op``, or None when the pass did not calibrate it (outside the
        decoder layers: quantized data-free). ``gs``: the converter's NVFP4 global scale,
        which must be the one the pass used."""
        folder = self.index.get(op.module)
        if folder is None:
            return None
        d = self.root / folder
        stem = op.module
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


def _global_scale(plan: Plan, op: Op, store: WeightStore, cache: dict, fused: dict) -> np.float32 | None:
    """The NVFP4 global scale of the op's fused set, as the converter computes it."""
    if not SCHEMES[op.scheme].has_global_scale:
        return None
    key = op.scale_group
    if key not in cache:
        by_module = {o.module: o for o in plan.ops if o.scale_group}
        members = [by_module[n] for n in plan.scale_groups[key]]
        amax = max(reference.tensor_absmax(op_weight(store, m, fused)) for m in members)
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


class _Captured(Exception):
    """Raised by an expert capture hook once the rest of the layer's forward is not needed."""


def _resolve(layer: nn.Module, pre: str, ops: list[Op]) -> tuple[dict[str, str], dict[str, ExpertTarget]]:
    """({module: its nn.Linear's name in the layer}, {module: routed expert target}) of the
    layer's ops (``layer`` on the meta device or materialised)."""
    experts = expert_targets(layer, pre, [op.module for op in ops])
    linears = {}
    for op in ops:
        if op.module in experts:
            continue
        sub = op.module[len(pre):]
        m = layer.get_submodule(sub) if sub else None
        if not isinstance(m, nn.Linear):
            raise QStreamError(f"{op.source.name}: is not an nn.Linear nor a routed expert of {type(layer).__name__} "
                               "in transformers; --calibrate cannot hook its inputs; convert without --calibrate.")
        linears[op.module] = sub
    return linears, experts


def calibrate(plan: Plan, dst: str | Path, ids: torch.Tensor, *, resume: bool = False,
              device: torch.device | str | None = None,
              on_layer: Callable[[int, int], None] | None = None,
              on_note: Callable[[str], None] | None = None,
              expert_budget: int = EXPERT_HESSIAN_BUDGET) -> CalibratedWeights:
    """Run the GPTQ pass over the plan's FP4 Linears on token windows ``ids`` [samples, seqlen].

    ``on_note``: told of each routed expert no calibration token reached (quantized data-free).
    ``expert_budget``: bytes of routed-expert Hessians held at once (more experts than fit are
    captured in further passes over the windows; the bytes written do not depend on it)."""
    return_freed_memory()
    device = torch.device(device) if device is not None else default_device()
    ops = calibrated_ops(plan)
    store = WeightStore(plan.source)
    sk = Skeleton.build(plan.source.config, set(store.tensors))
    root = _root(Path(dst))
    n = sk.num_layers
    by_layer: dict[int, list[Op]] = {}
    for op in ops:
        pre = f"{sk.prefix}.layers."
        if op.source.name.startswith(pre):
            by_layer.setdefault(int(op.source.name[len(pre):].split(".")[0]), []).append(op)
    for L, layer_ops in by_layer.items():  # every op is hookable, before any work
        if L < n:
            _resolve(sk.decoder.layers[L], f"{sk.prefix}.layers.{L}.", layer_ops)
    first, hidden = _start(root, _identity(plan, ids), resume, n)
    try:
        with torch.inference_mode():
            if hidden is None:
                hidden = [sk.embed(w, store, device) for w in ids]
            hidden = [h.to(device) for h in hidden]
            calls = [sk.layer_inputs(h) for h in hidden]
            gscales: dict = {}
            for L in range(first, n):
                _layer_pass(plan, sk, store, L, by_layer.get(L, []), hidden, calls, root, device, gscales,
                            expert_budget, on_note)
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


def _expert_chunks(layer: nn.Module, ops: list[Op], experts: dict[str, ExpertTarget], budget: int) -> list[list]:
    """The layer's routed experts to quantize, (module name, expert) in plan order, cut into
    passes whose Hessians fit ``budget`` bytes (at least one expert a pass)."""
    order: list[tuple[str, int]] = []
    for op in ops:
        t = experts.get(op.module)
        if t is not None and (t.qual, t.expert) not in order:
            order.append((t.qual, t.expert))
    chunks: list[list] = [[]]
    used = 0
    for qual, e in order:
        b = hessian_bytes(layer.get_submodule(qual))
        if chunks[-1] and used + b > budget:
            chunks.append([])
            used = 0
        chunks[-1].append((qual, e))
        used += b
    return chunks


def _data_free(w: np.ndarray, scheme: str, gs, search: str) -> torch.Tensor:
    """The decoded data-free FP4 weight (what the converter writes without calibration)."""
    if scheme == "nvfp4":
        return torch.from_numpy(reference.dequantize_nvfp4(*reference.quantize_nvfp4(w, gs, search), gs))
    return torch.from_numpy(reference.dequantize_mxfp4(*reference.quantize_mxfp4(w, search)))


def _layer_pass(plan, sk, store, L, ops, hidden, calls, root, device, gscales, budget, on_note) -> None:
    """Calibrate decoder layer L: capture, GPTQ, save, then push the windows through it.

    Pass 0 hooks every dense Linear and the first chunk of routed experts; further passes
    (only when the experts' Hessians exceed ``budget``) capture the next chunks, stopping at
    the experts. Every capture sees the layer's source weights for what precedes the Linear
    (dense results are put into the layer only after the last pass; an expert's own result
    changes no expert input), so the chunking does not change the result."""
    layer = sk.layer(L, store, device)
    pre = f"{sk.prefix}.layers.{L}."
    linears, experts = _resolve(layer, pre, ops)
    mods = {name: layer.get_submodule(sub) for name, sub in linears.items()}
    chunks = _expert_chunks(layer, ops, experts, budget)
    stop = _Captured if len(fused_experts(layer)) == 1 else None
    tmp = root / f"layer-{L:05d}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    absmax, gs_used, fused, dense_q = {}, {}, {}, []
    data_free: dict = {}  # (experts module, expert) or a Linear's name -> its data-free modules
    search = plan.options.scale_search
    for c, chunk in enumerate(chunks):
        hess = {name: Hessian(m.in_features, device) for name, m in mods.items()} if c == 0 else {}
        handles = [m.register_forward_pre_hook(lambda _m, args, h=hess[name]: h.add(args[0]))
                   for name, m in mods.items()] if c == 0 else []
        wanted: dict[str, list[int]] = {}
        for qual, e in chunk:
            wanted.setdefault(qual, []).append(e)
        caps = {q: ExpertCapture(layer.get_submodule(q), es, device, stop if c else None) for q, es in wanted.items()}
        try:
            for k in range(len(hidden)):
                try:
                    run_layer(layer, hidden[k], calls[k][L])
                except _Captured:
                    pass
        finally:
            for h in handles:
                h.remove()
            for cap in caps.values():
                cap.remove()
        members = set(chunk)
        for op in ops:
            t = experts.get(op.module)
            if (t is None and c != 0) or (t is not None and (t.qual, t.expert) not in members):
                continue
            h = hess.pop(op.module) if t is None else caps[t.qual].hessian(t)
            gs = _global_scale(plan, op, store, gscales, fused)
            w = np.asarray(op_weight(store, op, fused), dtype=np.float32)
            if h.n == 0:  # no calibration token reached it (a routed expert): data-free
                q = _data_free(w, op.scheme, gs, search)
                data_free.setdefault((t.qual, t.expert) if t is not None else op.module, []).append(op.module)
            else:
                # a dense Linear's Hessian is its own (handed over, no name holds it here); an
                # expert's gate and up share one, so they get a scaled copy each
                packed, scale, q = gptq_quantize(torch.from_numpy(w), h.take() if t is None else h.matrix(),
                                                 op.scheme, gs, search, overwrite_hessian=True)
            if t is None:
                dense_q.append((mods[op.module], q))
            else:
                write_back(layer.get_submodule(t.qual), t, q)
            if h.n == 0:
                continue
            _save_npy(tmp, f"{op.module}.packed.npy", packed)
            _save_npy(tmp, f"{op.module}.scale.npy", scale)
            absmax[op.module] = h.absmax
            if gs is not None:
                gs_used[op.module] = float(gs)
        del caps, hess
    for m, q in dense_q:
        m.weight.data.copy_(q.to(device=device, dtype=m.weight.dtype))
    names = [n for group in data_free.values() for n in group]
    for key, group in data_free.items():
        what = f"was routed to expert {key[1]} of {pre}{key[0]} ({', '.join(x.rsplit('.', 1)[-1] for x in group)})" \
            if isinstance(key, tuple) else f"reached {key}"
        w4a4 = ("; its NVFP4 input scales are its layer's largest for the same projection"
                if isinstance(key, tuple) and plan.options.activations == "nvfp4" else "")
        if on_note is not None:
            on_note(f"calibration: no calibration token {what}; quantized data-free, without GPTQ{w4a4}")
    for name, obj in ((ABSMAX_FILE, absmax), ("global_scales.json", gs_used), (DATA_FREE_FILE, names)):
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
    data_free: list[str] = []
    for d in sorted(root.glob("layer-[0-9]*")):
        if d.suffix == ".partial":
            continue
        a = json.loads((d / ABSMAX_FILE).read_text())
        absmax.update(a)
        for module in a:
            index[module] = d.name
        if (d / DATA_FREE_FILE).is_file():
            data_free += json.loads((d / DATA_FREE_FILE).read_text())
    write_atomic(root / ABSMAX_FILE, json.dumps(dict(sorted(absmax.items())), indent=1),
                 tmp=root / (ABSMAX_FILE + ".partial"))
    return CalibratedWeights(Path(dst), index, absmax, data_free)
