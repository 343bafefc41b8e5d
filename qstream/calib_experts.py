"""`--calibrate` for mixture-of-experts layers: each expert's Hessians from the tokens routed to it.

transformers 5 holds a MoE layer's routed experts as one fused module (``MixtralExperts``,
``Qwen3MoeExperts``, ``DeepseekV3Experts``, ...: ``gate_up_proj`` [E, 2I, H], gate rows then
up rows, and ``down_proj`` [E, H, I]), called by its sparse MoE block as
``experts(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k])`` after the router
(which the plan keeps unquantized). Its eager forward, for each expert ``e`` that a token is
routed to, runs ``x = hidden_states[tokens routed to e]``, ``gate, up = linear(x,
gate_up_proj[e]).chunk(2)``, ``down_in = act(gate) * up``, ``linear(down_in, down_proj[e])``
(the grouped_mm implementation computes the same per expert, grouped).

:class:`ExpertCapture` is a forward pre-hook on that module: from its own arguments (the
router's choice, as transformers computed it) it takes each expert's routed tokens and adds
``x`` to the expert's gate/up Hessian (gate and up share their input, hence one Hessian) and
``act(gate) * up`` (computed as the eager forward does, ``_apply_gate`` of ``linear(x,
gate_up_proj[e])``, on the layer's not yet quantized weights, as the dense path's hooks see
the not yet quantized layer) to its down Hessian. The module's output stays transformers'
own. An expert no token is routed to has no Hessian (n == 0): the caller quantizes it
data-free.

Layouts other than concatenated [gate; up], output-major, without biases (gpt-oss's
interleaved, input-major experts with biases and a clamped activation) are refused.

torch is imported here: only a run with ``--calibrate`` imports this module.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn

from .errors import QStreamError
from .gptq import Hessian
from .roles import EXPERT_LINEAR

# checkpoint names of one expert's projections (transformers' conversion mapping: Mixtral's
# w1 / w3 / w2 under block_sparse_moe, the others' gate_proj / up_proj / down_proj under mlp)
PARTS = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down", "w1": "gate", "w3": "up", "w2": "down"}


@dataclass(frozen=True)
class ExpertTarget:
    """Where a checkpoint expert Linear lives in the transformers layer."""

    qual: str  # the fused experts module's name inside the decoder layer ("mlp.experts")
    expert: int
    part: str  # "gate" | "up" | "down"


def fused_experts(layer: nn.Module) -> dict[str, nn.Module]:
    """{name in the layer: module} of the layer's fused experts (3-D ``gate_up_proj``)."""
    out = {}
    for name, m in layer.named_modules():
        p = getattr(m, "gate_up_proj", None)
        if isinstance(p, torch.Tensor) and p.dim() == 3:
            out[name] = m
    return out


def _check_layout(name: str, m: nn.Module) -> None:
    ok = (getattr(m, "is_concatenated", True) and not getattr(m, "is_transposed", False)
          and not getattr(m, "has_bias", False) and getattr(m, "has_gate", True)
          and not getattr(m, "has_post_expert_norm", False)
          and isinstance(getattr(m, "down_proj", None), torch.Tensor) and m.down_proj.dim() == 3
          and m.gate_up_proj.shape[1] % 2 == 0 and m.down_proj.shape[0] == m.gate_up_proj.shape[0])
    if not ok:
        raise QStreamError(f"{name} ({type(m).__name__}): --calibrate runs experts stored as concatenated [gate; up] "
                           "[E, 2I, H] and [E, H, I] without biases (Mixtral, Qwen-MoE, DeepSeek-V3); this family's "
                           "experts are laid out otherwise (gpt-oss: interleaved, input-major, with biases); convert "
                           "it without --calibrate, or --ignore its experts.")


def expert_targets(layer: nn.Module, prefix: str, modules: list[str]) -> dict[str, ExpertTarget]:
    """{checkpoint module name: target} for the ``modules`` (checkpoint names of Linears the plan
    quantizes, all in decoder layer ``prefix`` = "model.layers.N.") that are routed experts of
    ``layer`` (meta or materialised); the others are left out (the dense path's)."""
    experts = fused_experts(layer)
    bases: dict[str, str] = {}
    for qual in experts:
        bases[prefix + qual] = qual
        if qual.startswith("mlp."):  # Mixtral's checkpoints: block_sparse_moe.experts.N.w1
            bases[prefix + "block_sparse_moe." + qual[len("mlp."):]] = qual
    out = {}
    for name in modules:
        mt = EXPERT_LINEAR.match(name)
        mt = mt if mt is not None and mt["proj"] in PARTS else None
        stacked = name.rsplit(".", 1)[0]
        if mt is None and stacked in bases:  # all experts in one tensor (gpt-oss's OpenAI MXFP4 layout)
            _check_layout(prefix + bases[stacked], experts[bases[stacked]])
            raise QStreamError(f"{name}: the experts are written stacked in one tensor, which --calibrate does not "
                               "quantize; convert it without --calibrate.")
        if mt is None or mt["base"] not in bases:
            continue
        qual = bases[mt["base"]]
        e, count = int(mt["e"]), experts[qual].gate_up_proj.shape[0]
        if e >= count:
            raise QStreamError(f"{name}: expert {e} but config.json gives {count} experts; the checkpoint does not "
                               "match its config.")
        _check_layout(prefix + qual, experts[qual])
        out[name] = ExpertTarget(qual, e, PARTS[mt["proj"]])
    return out


def _routing(module: nn.Module, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden_states [T, H], top_k_index [T, k]) of a call of the experts module."""
    fwd = inspect.unwrap(type(module).forward)
    try:
        bound = inspect.signature(fwd).bind(module, *args, **kwargs)
    except TypeError as e:
        raise QStreamError(f"{type(module).__name__}.forward was called as ({len(args)} arguments, {sorted(kwargs)}) "
                           f"({e}); --calibrate expects (hidden_states, top_k_index, top_k_weights).") from e
    a = bound.arguments
    names = list(a)[1:]  # after self
    hs = a["hidden_states"] if "hidden_states" in a else a[names[0]]
    idx = a["top_k_index"] if "top_k_index" in a else a[names[1]]
    hs = hs.reshape(-1, hs.shape[-1])
    return hs, idx.reshape(hs.shape[0], -1)


class ExpertCapture:
    """Gate/up and down Hessians of some experts of one fused experts module, accumulated by a
    forward pre-hook from the tokens routed to each; ``stop``: raise ``stop`` after capturing
    (the rest of the layer's forward is not needed)."""

    def __init__(self, module: nn.Module, experts: list[int], device: torch.device,
                 stop: type[BaseException] | None = None) -> None:
        hidden, inter = module.gate_up_proj.shape[2], module.gate_up_proj.shape[1] // 2
        self.module, self.stop = module, stop
        self.gate_up = {e: Hessian(hidden, device) for e in experts}
        self.down = {e: Hessian(inter, device) for e in experts}
        self.handle = module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        hs, idx = _routing(module, args, kwargs)
        for e, h in self.gate_up.items():
            tokens = (idx == e).any(-1).nonzero().squeeze(1)  # ascending token order
            if tokens.numel() == 0:
                continue
            x = hs[tokens]
            h.add(x)
            self.down[e].add(module._apply_gate(nn.functional.linear(x, module.gate_up_proj[e])))
        if self.stop is not None:
            raise self.stop

    def hessian(self, t: ExpertTarget) -> Hessian:
        return self.down[t.expert] if t.part == "down" else self.gate_up[t.expert]

    def remove(self) -> None:
        self.handle.remove()


def hessian_bytes(module: nn.Module) -> int:
    """float32 bytes of one expert's two Hessians."""
    hidden, inter = module.gate_up_proj.shape[2], module.gate_up_proj.shape[1] // 2
    return 4 * (hidden * hidden + inter * inter)


def write_back(module: nn.Module, t: ExpertTarget, q: torch.Tensor) -> None:
    """Put an expert projection's decoded FP4 weight [out, in] into the fused parameters."""
    if t.part == "down":
        dst = module.down_proj.data[t.expert]
    else:
        half = module.gate_up_proj.shape[1] // 2
        dst = module.gate_up_proj.data[t.expert, :half] if t.part == "gate" else \
            module.gate_up_proj.data[t.expert, half:]
    if tuple(dst.shape) != tuple(q.shape):
        raise QStreamError(f"{type(module).__name__} expert {t.expert} {t.part}: the checkpoint's weight has shape "
                           f"{list(q.shape)} but the layer holds {list(dst.shape)}; the checkpoint does not match "
                           "its config.")
    dst.copy_(q.to(device=dst.device, dtype=dst.dtype))
