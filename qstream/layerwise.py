"""Run a model one decoder layer at a time, straight from its safetensors shards.

The engine behind ``qstream eval`` (and, later, the calibrated mode): transformers'
own modules of the family are built from config.json on the ``meta`` device (no
memory, no init), and each piece -- a decoder layer, the final norm, the lm_head --
is materialised from the shards only when it runs, then dropped. The tensors are
decoded as the checkpoint's loaders decode them:

* BF16 / F16 / F32: as stored;
* FP8 E4M3 with a per-tensor, per-channel or block scale (Mistral / DeepSeek
  ``weight_scale_inv``, compressed-tensors ``weight_scale``): ``fp8 * scale`` in
  float32, as qstream's convert reads a source;
* compressed-tensors NVFP4 / MXFP4 (``weight_packed``, ``weight_scale``,
  ``weight_global_scale``) and ModelOpt NVFP4 (``weight`` U8, ``weight_scale``,
  ``weight_scale_2``): qstream's byte-exact copies of compressed-tensors' and
  ModelOpt's decoders (:mod:`qstream.schemes.decode`), bf16 values; a W4A4 output's
  FP4 Linears also quantize their inputs as its runtime does
  (:mod:`qstream.act_emulation`, compressed-tensors' own ``forward_quantize``).

Every decoded tensor is then cast to the model's dtype (config.json's
``torch_dtype``, bfloat16 by default), the dtype a loader would give it.

Hidden states are kept for every sample (window) at once and pushed through one layer
before the next layer is read, as llm-compressor's sequential pipeline does: each
layer's weights are read once whatever the number of samples. The per-layer forward
arguments (attention mask, rotary position embeddings, ...) are the ones the family's
own model forward builds: they are captured by running that forward with stand-in
layers that record their inputs and pass the hidden states through.

torch and transformers are imported here: only ``qstream eval`` (and the calibrated
mode) import this module (the ``calibrate`` extra).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .act_emulation import InputQdq
from .errors import QStreamError
from .sources.fp8 import find_fp8_weights
from .safetensors_io import FLOAT_SOURCE_DTYPES, ShardReader, TensorInfo
from .schemes import fp8
from .sources.source import Checkpoint, open_checkpoint
from .schemes.decode import decode_modelopt_nvfp4, decode_mxfp4, decode_nvfp4

TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def default_device() -> torch.device:
    """CUDA when present, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def return_freed_memory() -> None:
    """Have glibc serve allocations of 1 MB and more by mmap, so that a freed layer or
    logits block goes back to the OS at once. By default glibc raises that threshold to
    32 MB as big blocks are freed and then keeps them in its heap: a run that frees one
    layer per step would grow by fragments of each. Also hands back what is free now (the
    tokenizer's vocabulary and merges, about 40 MB for SmolLM2, stay in the heap otherwise).
    A no-op off glibc."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        if libc is not None and hasattr(libc, "mallopt"):
            libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
        if libc is not None and hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)
    except OSError:
        pass


def _to_torch(a: np.ndarray) -> torch.Tensor:
    """A numpy array (bf16 from ml_dtypes included) as a torch tensor, without a copy."""
    a = np.ascontiguousarray(a)
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


# --------------------------------------------------------------------------- weights

class WeightStore:
    """The tensors of one checkpoint folder, each decoded as its loader decodes it."""

    def __init__(self, root: str | Path | Checkpoint) -> None:
        self.ckpt = root if isinstance(root, Checkpoint) else open_checkpoint(root)
        self.root = self.ckpt.root
        self.tensors = self.ckpt.tensors
        self.reader = ShardReader()
        self.fp8 = find_fp8_weights(self.tensors, self.ckpt.config)
        self._input_qdq: InputQdq | None = None

    @property
    def input_qdq(self) -> InputQdq:
        """The activation quantize-dequantize a W4A4 output's runtime applies (empty otherwise)."""
        if self._input_qdq is None:
            self._input_qdq = InputQdq(self.ckpt.config, self.tensors, lambda n: self._read(self._info(n)))
        return self._input_qdq

    def close(self) -> None:
        self.reader.close()

    def __contains__(self, name: str) -> bool:
        if name in self.tensors:
            return True
        mod = name.removesuffix(".weight")
        return name.endswith(".weight") and mod + ".weight_packed" in self.tensors

    def _info(self, name: str) -> TensorInfo:
        info = self.tensors.get(name)
        if info is None:
            raise QStreamError(f"{self.root}: has no tensor {name!r} (nor a quantized {name.removesuffix('.weight')}); "
                               "the checkpoint does not match its config.json, or its family is not supported by "
                               "qstream eval yet.")
        return info

    def _read(self, info: TensorInfo) -> np.ndarray:
        return self.reader.read(info)

    def decode(self, name: str) -> np.ndarray:
        """Tensor ``name`` (a module's ``.weight`` possibly stored quantized) as numpy floats."""
        mod = name.removesuffix(".weight")
        t = self.tensors
        if name.endswith(".weight") and name not in t and mod + ".weight_packed" in t:
            packed = self._read(t[mod + ".weight_packed"])
            scale = self._read(self._info(mod + ".weight_scale"))
            if len(packed.shape) != 2:
                raise QStreamError(f"{self.root}: {mod}.weight_packed has shape {list(packed.shape)}; qstream eval "
                                   "decodes 2-D packed weights only.")
            gs = t.get(mod + ".weight_global_scale")
            if gs is not None:  # compressed-tensors NVFP4
                return decode_nvfp4(packed, scale, np.float32(self._read(gs).reshape(-1)[0]))
            return decode_mxfp4(packed, scale)
        info = self._info(name)
        if name.endswith(".weight") and info.dtype == "U8" and mod + ".weight_scale_2" in t:  # ModelOpt NVFP4
            return decode_modelopt_nvfp4(self._read(info), self._read(self._info(mod + ".weight_scale")),
                                         np.float32(self._read(t[mod + ".weight_scale_2"]).reshape(-1)[0]))
        f = self.fp8.get(name)
        if f is not None:
            return fp8.apply_scale(fp8.decode_fp8(self._read(info)), self._read(f.scale).astype(np.float32),
                                   f.layout, 0, f.block)
        if info.dtype not in FLOAT_SOURCE_DTYPES:
            raise QStreamError(f"{info.path.name}: tensor {name!r} is {info.dtype}, which qstream eval cannot decode "
                               "(it reads float, FP8 with scales, compressed-tensors NVFP4/MXFP4 and ModelOpt NVFP4).")
        return self._read(info)

    def same_bytes(self, name: str, other: "WeightStore", other_name: str, block: int = 16 << 20) -> bool:
        """Whether ``name`` is stored unquantized with the same dtype, shape and bytes as
        ``other_name`` in ``other`` (read a block at a time)."""
        a, b = self.tensors.get(name), other.tensors.get(other_name)
        if a is None or b is None or (a.dtype, a.shape) != (b.dtype, b.shape) or name in self.fp8 \
                or a.dtype not in FLOAT_SOURCE_DTYPES:
            return False
        for off in range(0, a.nbytes, block):
            n = min(block, a.nbytes - off)
            if self.reader.read_bytes(a.path, a.begin + off, n) != other.reader.read_bytes(b.path, b.begin + off, n):
                return False
        return True

    def tensor(self, name: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return _to_torch(self.decode(name)).to(device=device, dtype=dtype)

    def rows(self, name: str, ids: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Rows ``ids`` of a float 2-D tensor (an embedding table), reading only those rows."""
        info = self._info(name)
        if info.dtype not in FLOAT_SOURCE_DTYPES or len(info.shape) != 2:
            return self.tensor(name, dtype, device)[ids.to(device)]
        uniq, inv = torch.unique(ids.cpu(), return_inverse=True)
        out = torch.empty((len(uniq), info.shape[1]), dtype=dtype)
        for k, i in enumerate(uniq.tolist()):
            if not 0 <= i < info.shape[0]:
                raise QStreamError(f"token id {i} is outside {name!r} ({info.shape[0]} rows in {info.path.name}); "
                                   "the tokenizer does not belong to this model.")
            out[k] = _to_torch(self.reader.read_rows(info, i, i + 1)[0]).to(dtype)
        return out.to(device)[inv.to(device)]


# --------------------------------------------------------------------------- the model skeleton

class _Stop(Exception):
    pass


class _Recorder(nn.Module):
    """Stands in for decoder layer ``index``: records its inputs, passes the hidden states on."""

    def __init__(self, layer: nn.Module, index: int, calls: list, last: bool) -> None:
        super().__init__()
        for attr in ("attention_type", "layer_idx", "is_sliding", "sliding_window", "layer_type"):
            if hasattr(layer, attr):
                object.__setattr__(self, attr, getattr(layer, attr))
        self.index, self.calls, self.last = index, calls, last

    def forward(self, *args, **kwargs):
        if args:
            hidden, rest = args[0], args[1:]
        else:
            hidden, rest = kwargs.pop("hidden_states"), ()
        self.calls.append((rest, kwargs))
        if self.last:
            raise _Stop
        return hidden


def _model_config(config: dict):
    """transformers' config object for a config.json dict (without its quantization_config)."""
    from transformers import AutoConfig

    cfg = {k: v for k, v in config.items() if k != "quantization_config"}
    model_type = cfg.pop("model_type", None)
    if not model_type:
        raise QStreamError("config.json has no model_type; qstream eval builds the model from it.")
    try:
        return AutoConfig.for_model(model_type, **cfg)
    except (ValueError, KeyError) as e:
        raise QStreamError(f"config.json: transformers does not know model_type {model_type!r} ({e}); "
                           "upgrade transformers or convert a supported family.") from e


@dataclass
class Skeleton:
    """A causal LM of the family on the meta device, and the checkpoint names of its parts."""

    model: nn.Module
    decoder: nn.Module  # the text model: embed_tokens, layers, norm
    dtype: torch.dtype
    prefix: str  # checkpoint name of the decoder ("model")
    head: str  # checkpoint name of the lm_head weight
    tied: str | None  # name to read when ``head`` is not stored (tied embeddings)

    @classmethod
    def build(cls, config: dict, names: set[str] | None = None) -> "Skeleton":
        """The causal LM of ``config`` (a multimodal model's text model alone, e.g. Mistral3's
        language model) on the meta device; ``names`` (the checkpoint's tensor names) tell
        where its decoder sits in the checkpoint."""
        from transformers import AutoModelForCausalLM

        cfg = _model_config(config)
        text = getattr(cfg, "text_config", None)
        multimodal = text is not None and getattr(cfg, "vision_config", None) is not None
        if multimodal:
            if "tie_word_embeddings" in config:
                text.tie_word_embeddings = config["tie_word_embeddings"]
            cfg = text
        name = str(config.get("torch_dtype") or config.get("dtype") or "bfloat16").removeprefix("torch.")
        dtype = TORCH_DTYPES.get(name, torch.bfloat16)
        try:
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        except ValueError as e:
            raise QStreamError(f"config.json: transformers has no causal LM for {cfg.model_type} ({e}).") from e
        model.eval()
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
        for mod in ("embed_tokens", "layers", "norm"):
            if not hasattr(decoder, mod):
                raise QStreamError(f"config.json: {type(decoder).__name__} has no {mod}; qstream eval does not know "
                                   "how to run this family layer by layer.")
        prefix = next(n for n, m in model.named_modules() if m is decoder)
        head = next(n for n, m in model.named_modules() if m is model.get_output_embeddings()) + ".weight"
        if multimodal:  # transformers 5 names (model.language_model.*, lm_head) or the older ones
            for p, h in (("model.language_model", head), ("language_model.model", "language_model." + head)):
                if names is None or f"{p}.embed_tokens.weight" in names:
                    prefix, head = p, h
                    break
            else:
                raise QStreamError(f"config.json: {config.get('model_type')} is multimodal, but the checkpoint holds "
                                   "neither model.language_model.embed_tokens.weight nor "
                                   "language_model.model.embed_tokens.weight; qstream eval cannot find its text model.")
        tied = f"{prefix}.embed_tokens.weight" if getattr(cfg, "tie_word_embeddings", False) else None
        return cls(model, decoder, dtype, prefix, head, tied)

    @property
    def num_layers(self) -> int:
        return len(self.decoder.layers)

    def materialize(self, module: nn.Module, name: str, store: WeightStore, device: torch.device) -> nn.Module:
        """A copy of ``module`` (checkpoint name ``name``) holding ``store``'s decoded tensors on ``device``."""
        m = copy.deepcopy(module)
        state = {}
        for key, t in m.state_dict(keep_vars=True).items():
            full = f"{name}.{key}"
            if full not in store and full == self.head and self.tied:
                full = self.tied
            x = store.tensor(full, t.dtype, device) if full in store else _experts(store, full, t.dtype, device)
            if tuple(x.shape) != tuple(t.shape):
                raise QStreamError(f"{store.root}: {full} has shape {list(x.shape)} but config.json gives "
                                   f"{list(t.shape)}; the checkpoint does not match its config.")
            state[key] = x
        m.load_state_dict(state, strict=True, assign=True)
        left = [n for n, b in m.named_buffers() if b.is_meta]
        if left:
            raise QStreamError(f"{name}: buffers {left} are not stored in the checkpoint; qstream eval cannot run "
                               f"{type(m).__name__} layer by layer yet.")
        return m

    def layer(self, index: int, store: WeightStore, device: torch.device) -> nn.Module:
        """Decoder layer ``index`` from ``store``, its W4A4 Linears quantizing their inputs."""
        name = f"{self.prefix}.layers.{index}"
        m = self.materialize(self.decoder.layers[index], name, store, device)
        store.input_qdq.attach(m, name)
        return m

    def embed(self, ids: torch.Tensor, store: WeightStore, device: torch.device) -> torch.Tensor:
        """Input embeddings [1, len, hidden] of one window."""
        emb = self.decoder.embed_tokens
        name = f"{self.prefix}.embed_tokens.weight"
        if type(emb) is nn.Embedding:
            return store.rows(name, ids, self.dtype, device).unsqueeze(0)
        m = self.materialize(emb, f"{self.prefix}.embed_tokens", store, device)
        return m(ids.to(device).unsqueeze(0))

    def layer_inputs(self, hidden: torch.Tensor) -> list[tuple[tuple, dict]]:
        """The (args, kwargs) the family's forward passes to each decoder layer for a window
        whose input embeddings are ``hidden`` [1, len, hidden]: mask, positions, rotary
        embeddings, built by the model's own forward (its rotary module rebuilt on the device)."""
        dec = self.decoder
        device = hidden.device
        saved = {}
        for cname, child in dec.named_children():
            if cname in ("layers", "embed_tokens", "norm"):
                continue
            if any(b.is_meta for b in child.buffers()) and not any(True for _ in child.parameters()):
                try:
                    with torch.device(device):
                        fresh = type(child)(getattr(child, "config", dec.config))
                except TypeError as e:
                    raise QStreamError(f"{type(dec).__name__}.{cname} ({type(child).__name__}) cannot be rebuilt "
                                       f"off the meta device ({e}); qstream eval does not support this family yet.") from e
                saved[cname] = child
                setattr(dec, cname, fresh)
        calls: list = []
        layers = dec.layers
        n = len(layers)
        dec.layers = nn.ModuleList([_Recorder(l, i, calls, i == n - 1) for i, l in enumerate(layers)])
        try:
            dec(inputs_embeds=hidden, use_cache=False)
        except _Stop:
            pass
        finally:
            dec.layers = layers
            for cname, child in saved.items():
                setattr(dec, cname, child)
        if len(calls) != n:
            raise QStreamError(f"{type(dec).__name__}: its forward called {len(calls)} of {n} decoder layers; "
                               "qstream eval cannot run this family layer by layer.")
        return calls


# transformers 5 holds a MoE layer's experts as 3-D parameters [E, 2I, H] and [E, H, I]; the
# checkpoints hold them per expert (its conversion_mapping: qwen2_moe / qwen3_moe, mixtral).
EXPERT_NAMES = ((".mlp.", "gate_proj", "up_proj", "down_proj"), (".block_sparse_moe.", "w1", "w3", "w2"))
# gpt-oss: [E, H, 2I] with gate and up interleaved on the last axis (gate = [..., ::2]), down
# [E, I, H], biases [E, 2I] / [E, H]; qstream writes its experts per expert as [out, in] Linears
GPT_OSS_PARAMS = {"gate_up_proj": ("weight", True), "down_proj": ("weight", False),
                  "gate_up_proj_bias": ("bias", True), "down_proj_bias": ("bias", False)}


def _experts(store: WeightStore, full: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A fused 3-D expert parameter (``....experts.gate_up_proj`` / ``.down_proj``) built from
    the checkpoint's per-expert weights (gate and up concatenated on the output axis; gpt-oss:
    interleaved, in-major, with biases), or decoded from gpt-oss's own MXFP4 blocks."""
    pre, _, param = full.rpartition(".experts.")
    if f"{full}_blocks" in store.tensors:  # gpt-oss MXFP4 release layout: [E, out, G, 16] + [E, out, G]
        blocks, scales = store._read(store.tensors[f"{full}_blocks"]), store._read(store._info(f"{full}_scales"))
        e, out = blocks.shape[:2]
        w = decode_mxfp4(blocks.reshape(e * out, -1), scales.reshape(e * out, -1)).reshape(e, out, -1)
        return _to_torch(w).transpose(1, 2).to(device=device, dtype=dtype)
    if param in GPT_OSS_PARAMS and f"{pre}.experts.0.gate_proj.bias" in store:
        kind, fused = GPT_OSS_PARAMS[param]
        out, e = [], 0
        while f"{pre}.experts.{e}.down_proj.{kind}" in store:
            parts = [store.tensor(f"{pre}.experts.{e}.{x}.{kind}", dtype, device)
                     for x in (("gate_proj", "up_proj") if fused else ("down_proj",))]
            t = torch.stack(parts, 1).flatten(0, 1) if fused else parts[0]  # rows g0 u0 g1 u1 ...
            out.append(t.T if kind == "weight" else t)
            e += 1
        return torch.stack(out)
    if param in ("gate_up_proj", "down_proj") and ".mlp" in pre:
        for mlp, gate, up, down in EXPERT_NAMES:
            base = pre.replace(".mlp", mlp.rstrip("."), 1) + ".experts"
            parts = (gate, up) if param == "gate_up_proj" else (down,)
            if f"{base}.0.{parts[0]}.weight" not in store:
                continue
            out = []
            e = 0
            while f"{base}.{e}.{parts[0]}.weight" in store:
                out.append(torch.cat([store.tensor(f"{base}.{e}.{x}.weight", dtype, device) for x in parts], 0))
                e += 1
            return torch.stack(out)
    if ".mlp." in full:  # Mixtral's router and the rest: block_sparse_moe in the checkpoint
        alt = full.replace(".mlp.", ".block_sparse_moe.", 1)
        if alt in store:
            return store.tensor(alt, dtype, device)
    return store.tensor(full, dtype, device)  # raises: names the missing tensor


def run_layer(layer: nn.Module, hidden: torch.Tensor, call: tuple[tuple, dict]) -> torch.Tensor:
    args, kwargs = call
    out = layer(hidden, *args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def head_logits(hidden: torch.Tensor, weight: torch.Tensor, chunk_bytes: int = 32 << 20) -> torch.Tensor:
    """float32 logits ``hidden.float() @ weight.float().T``, the head cast to float32 a
    block of vocabulary rows at a time (a bf16 head of a large vocabulary would otherwise
    double in memory)."""
    h = hidden.float()
    step = max(1, chunk_bytes // (4 * weight.shape[1]))
    if step >= weight.shape[0]:
        return h @ weight.float().T
    return torch.cat([h @ weight[r:r + step].float().T for r in range(0, weight.shape[0], step)], dim=-1)


def read_config(root: str | Path) -> dict:
    p = Path(root) / "config.json"
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise QStreamError(f"{p}: cannot be read ({e}); pass a checkpoint folder.") from e
