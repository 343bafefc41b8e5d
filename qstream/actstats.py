"""Input statistics of every Linear, from a calibration text, one decoder layer at a time.

The collector behind ``--activations nvfp4 --calibrate FILE`` (the static activation global
scales of NVFP4 W4A4): the source runs through :mod:`qstream.layerwise` (one decoder layer's
weights and every sample's hidden states in memory, never the model), with a forward
pre-hook on each ``nn.Linear`` of the layer recording the largest |input|. A Linear's input
is the same whether its own weight is quantized or not; the hidden states that reach layer
L are the source's (BF16 weights: the activations a W4A16 pass would see, as llm-compressor's
``QuantizationModifier`` observes them before any weight of the layer is quantized).

Experts that transformers holds fused as 3-D parameters (no ``nn.Linear`` per expert) are not
recorded: an NVFP4 W4A4 MoE output is refused by the plan with the module named.

torch and transformers are imported here (the ``calibrate`` extra).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .errors import QStreamError
from .evaluate import read_text, tokenize, windows
from .layerwise import Skeleton, WeightStore, default_device, read_config, return_freed_memory, run_layer

# llm-compressor's examples: NUM_CALIBRATION_SAMPLES = 512, MAX_SEQUENCE_LENGTH = 2048
DEFAULT_SAMPLES = 512
DEFAULT_SEQLEN = 2048


def token_batches(src: str | Path, text_file: str | Path, samples: int = DEFAULT_SAMPLES,
                  seqlen: int = DEFAULT_SEQLEN) -> list[torch.Tensor]:
    """Up to ``samples`` windows of ``seqlen`` tokens (the last may be shorter) of the text file
    (UTF-8, or .jsonl with a ``text`` field) under the source's tokenizer, no special tokens."""
    ids = tokenize(src, read_text(text_file), samples * seqlen)
    out = windows(ids, seqlen)[:samples]
    if not out:
        raise QStreamError(f"{text_file}: fewer than 2 tokens; pass a longer calibration text.")
    return out


@torch.inference_mode()
def collect_input_amax(src: str | Path, token_batches: list[torch.Tensor],
                       device: torch.device | str | None = None) -> dict[str, float]:
    """{checkpoint module name (``model.layers.0.mlp.gate_proj``): largest |input| over every
    token of every batch} for each ``nn.Linear`` of each decoder layer of the source."""
    return_freed_memory()
    device = torch.device(device) if device is not None else default_device()
    store = WeightStore(src)
    sk = Skeleton.build(read_config(src), set(store.tensors))
    amax: dict[str, float] = {}
    try:
        hs = [sk.embed(torch.as_tensor(b).reshape(-1), store, device) for b in token_batches]
        calls = [sk.layer_inputs(h) for h in hs]
        for L in range(sk.num_layers):
            layer = sk.layer(L, store, device)
            hooks = []
            for sub, mod in layer.named_modules():
                if isinstance(mod, nn.Linear):
                    name = f"{sk.prefix}.layers.{L}.{sub}"

                    def hook(_m, args, name=name):
                        a = float(args[0].detach().abs().max().float())
                        amax[name] = max(amax.get(name, 0.0), a)
                    hooks.append(mod.register_forward_pre_hook(hook))
            for k in range(len(hs)):
                hs[k] = run_layer(layer, hs[k], calls[k][L])
            for h in hooks:
                h.remove()
            del layer
    finally:
        store.close()
    return amax
