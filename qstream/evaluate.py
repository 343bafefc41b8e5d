"""`qstream eval`: KL divergence, perplexity and per-layer drift of a converted model
against its source, both run side by side one decoder layer at a time.

The text is tokenized with the source's tokenizer (``add_special_tokens=False``: no
BOS is added, the text is taken as one document) and its first ``tokens`` tokens are
cut into non-overlapping windows of ``ctx`` tokens (a last shorter window counts when
it has at least two); each window is run on its own and scored from its second token.
For each decoder layer L the engine (:mod:`qstream.layerwise`) reads the source's and
the output's layer L from their shards, pushes every window's two hidden states
through them and frees them: two layers and two sets of hidden states are in memory,
never a model. At the end both sides apply their own final norm and lm_head (logits in
float32 from the model-dtype hidden states). Reported:

* ``kld_mean`` / ``kld_median`` / ``kld_p99``: KL(source || output) per predicted
  position, full vocabulary, in nats (percentiles as numpy's linear interpolation);
* ``ppl_source`` / ``ppl_output``: exp of the mean NLL of the next token;
* ``top1_agree``: share of positions where both argmaxes agree;
* ``layers``: after each decoder layer, ``cosine`` (mean over tokens of the cosine
  between the two hidden states) and ``rel_error`` (||h_out - h_src|| / ||h_src||
  over all tokens): where the error enters.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .errors import QStreamError
from .layerwise import (Skeleton, WeightStore, default_device, head_logits, read_config, return_freed_memory,
                        run_layer)

DEFAULT_TOKENS = 8192
DEFAULT_CTX = 1024
LOGITS_BYTES = 16 << 20  # float32 logits per block of positions, per side


@dataclass
class LayerDrift:
    layer: int
    cosine: float
    rel_error: float


@dataclass
class EvalResult:
    kld_mean: float
    kld_median: float
    kld_p99: float
    ppl_source: float
    ppl_output: float
    top1_agree: float
    tokens: int  # predicted (scored) positions
    windows: int
    ctx: int
    layers: list[LayerDrift] = field(default_factory=list)
    text: str | None = None
    text_tokens: int = 0  # tokens read from the text (scored ones plus each window's first)
    device: str = "cpu"
    seconds: float = 0.0
    kld: np.ndarray | None = field(default=None, repr=False)  # per-position KL, for tests and benchmarks

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("kld")
        return d


def read_text(path: str | Path) -> str:
    """A UTF-8 text file, or a .jsonl file's ``text`` fields joined by blank lines."""
    p = Path(path)
    try:
        raw = p.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise QStreamError(f"{p}: text file not found; pass a UTF-8 text file with --text.") from e
    except (OSError, UnicodeDecodeError) as e:
        raise QStreamError(f"{p}: cannot be read as UTF-8 text ({e}); pass a UTF-8 text file with --text.") from e
    if p.suffix == ".jsonl":
        texts = []
        for k, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                texts.append(str(json.loads(line)["text"]))
            except (ValueError, KeyError, TypeError) as e:
                raise QStreamError(f"{p}: line {k} is not a JSON object with a 'text' field ({e}).") from e
        raw = "\n\n".join(texts)
    return raw


def tokenize(src: str | Path, text: str, n_tokens: int) -> torch.Tensor:
    """The first ``n_tokens`` ids of ``text`` under the source's tokenizer (no special tokens)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(src))
    except (OSError, ValueError) as e:
        raise QStreamError(f"{src}: no tokenizer could be loaded ({e}); the source folder needs its tokenizer "
                           "files (tokenizer.json / tokenizer_config.json).") from e
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids[:n_tokens], dtype=torch.long)


def windows(ids: torch.Tensor, ctx: int) -> list[torch.Tensor]:
    ids = ids.reshape(-1)
    return [ids[s:s + ctx] for s in range(0, ids.numel(), ctx) if ids[s:s + ctx].numel() >= 2]


class _Drift:
    def __init__(self) -> None:
        self.cos_sum = 0.0
        self.n = 0
        self.err_sq = 0.0
        self.ref_sq = 0.0

    def add(self, ref: torch.Tensor, out: torch.Tensor) -> None:
        r = ref.float().reshape(-1, ref.shape[-1])
        o = out.float().reshape(-1, out.shape[-1])
        self.cos_sum += float(torch.nn.functional.cosine_similarity(r, o, dim=-1).double().sum())
        self.n += r.shape[0]
        self.err_sq += float((o - r).double().square().sum())
        self.ref_sq += float(r.double().square().sum())

    def result(self, layer: int) -> LayerDrift:
        return LayerDrift(layer, self.cos_sum / max(1, self.n),
                          math.sqrt(self.err_sq / self.ref_sq) if self.ref_sq > 0 else 0.0)


def _check_pair(src_cfg: dict, dst_cfg: dict, dst: Path, src: Path) -> None:
    def get(cfg: dict, key: str):
        return cfg.get(key, (cfg.get("text_config") or {}).get(key))

    for key in ("model_type", "num_hidden_layers", "hidden_size", "vocab_size"):
        if get(src_cfg, key) != get(dst_cfg, key):
            raise QStreamError(f"{dst}/config.json: {key} is {get(dst_cfg, key)!r} but the source's ({src}) is "
                               f"{get(src_cfg, key)!r}; pass the --source that {dst} was converted from.")


@torch.inference_mode()
def evaluate(dst: str | Path, src: str | Path, ids: torch.Tensor, ctx: int = DEFAULT_CTX,
             device: torch.device | str | None = None,
             on_layer: Callable[[int, int], None] | None = None) -> EvalResult:
    """Run DST and SRC side by side on token ``ids`` (1-D), one decoder layer at a time."""
    t0 = time.perf_counter()
    return_freed_memory()
    dst, src = Path(dst), Path(src)
    device = torch.device(device) if device is not None else default_device()
    if ctx < 2:
        raise QStreamError(f"--ctx {ctx}: a window needs at least 2 tokens.")
    wins = windows(torch.as_tensor(ids), ctx)
    if not wins:
        raise QStreamError(f"only {int(torch.as_tensor(ids).numel())} token(s) to score; pass a longer text or more "
                           "--tokens (a window needs at least 2).")
    src_cfg, dst_cfg = read_config(src), read_config(dst)
    _check_pair(src_cfg, dst_cfg, dst, src)
    stores = (WeightStore(src), WeightStore(dst))
    sk = Skeleton.build(src_cfg, set(stores[0].tensors))
    try:
        hs = [[sk.embed(w, st, device) for w in wins] for st in stores]  # [side][window]
        calls = [sk.layer_inputs(h) for h in hs[0]]  # [window][layer]
        drift: list[LayerDrift] = []
        for L in range(sk.num_layers):
            layers = [sk.layer(L, st, device) for st in stores]
            d = _Drift()
            for k in range(len(wins)):
                for side in (0, 1):
                    hs[side][k] = run_layer(layers[side], hs[side][k], calls[k][L])
                d.add(hs[0][k], hs[1][k])
            del layers
            drift.append(d.result(L))
            if on_layer is not None:
                on_layer(L, sk.num_layers)
        del calls
        for side, st in enumerate(stores):
            norm = sk.materialize(sk.decoder.norm, f"{sk.prefix}.norm", st, device)
            hs[side] = [norm(h) for h in hs[side]]
            del norm
        names = [sk.head if sk.head in st or not sk.tied else sk.tied for st in stores]
        heads = [stores[0].tensor(names[0], sk.dtype, device)]
        # a head kept byte for byte (qstream's default) is held once
        heads.append(heads[0] if stores[1].same_bytes(names[1], stores[0], names[0])
                     else stores[1].tensor(names[1], sk.dtype, device))
    finally:
        for st in stores:
            st.close()
    r = score(wins, hs[0], hs[1], heads[0], heads[1])
    r.layers, r.ctx, r.device, r.seconds = drift, ctx, str(device), time.perf_counter() - t0
    return r


def score(wins: list[torch.Tensor], src_hidden: list[torch.Tensor], out_hidden: list[torch.Tensor],
          src_head: torch.Tensor, out_head: torch.Tensor) -> EvalResult:
    """The metrics from each window's final (normed) hidden states [1, len, hidden] of both
    sides and their lm_head weights; float32 logits a block of positions at a time."""
    hs, heads = (src_hidden, out_hidden), (src_head, out_head)
    device = src_head.device
    kls, nll = [], [0.0, 0.0]
    agree = count = 0
    step = max(1, LOGITS_BYTES // (4 * heads[0].shape[0]))  # positions per block of float32 logits
    for k, w in enumerate(wins):
        targets = w[1:].to(device).unsqueeze(1)
        for p0 in range(0, targets.shape[0], step):
            p1 = min(targets.shape[0], p0 + step)
            target = targets[p0:p1]
            lp = [torch.log_softmax(head_logits(hs[s][k][0, p0:p1], heads[s]), dim=-1) for s in (0, 1)]
            for s in (0, 1):
                nll[s] += -float(lp[s].gather(1, target).double().sum())
            kls.append((lp[0].exp() * (lp[0] - lp[1])).sum(dim=-1).double().cpu().numpy())
            agree += int((lp[0].argmax(-1) == lp[1].argmax(-1)).sum())
            count += target.shape[0]
            del lp
    kl = np.concatenate(kls)
    return EvalResult(
        kld_mean=float(kl.mean()), kld_median=float(np.median(kl)), kld_p99=float(np.percentile(kl, 99)),
        ppl_source=math.exp(nll[0] / count), ppl_output=math.exp(nll[1] / count), top1_agree=agree / count,
        tokens=count, windows=len(wins), ctx=max(int(w.numel()) for w in wins),
        text_tokens=int(sum(w.numel() for w in wins)), kld=kl)


def evaluate_text(dst: str | Path, src: str | Path, text: str | Path, n_tokens: int = DEFAULT_TOKENS,
                  ctx: int = DEFAULT_CTX, device: torch.device | str | None = None,
                  on_layer: Callable[[int, int], None] | None = None) -> EvalResult:
    """:func:`evaluate` on the first ``n_tokens`` tokens of the text file ``text``."""
    if n_tokens < 2:
        raise QStreamError(f"--tokens {n_tokens}: at least 2 tokens are needed.")
    ids = tokenize(src, read_text(text), n_tokens)
    r = evaluate(dst, src, ids, ctx=ctx, device=device, on_layer=on_layer)
    r.text = Path(text).name
    return r


def print_result(r: EvalResult, console) -> None:
    from rich.table import Table

    t = Table(title=f"Output against its source: {r.text or 'tokens'}, {r.tokens} scored positions "
                    f"({r.windows} x {r.ctx}-token windows) on {r.device}, {r.seconds:.1f} s", title_justify="left")
    t.add_column("")
    t.add_column("", justify="right")
    for k, v in (("KL mean (nats)", f"{r.kld_mean:.5f}"), ("KL median", f"{r.kld_median:.5f}"),
                 ("KL p99", f"{r.kld_p99:.5f}"), ("perplexity, source", f"{r.ppl_source:.4f}"),
                 ("perplexity, output", f"{r.ppl_output:.4f}"), ("top-1 agreement", f"{r.top1_agree:.4f}")):
        t.add_row(k, v)
    console.print(t)
    d = Table(title="Hidden-state drift after each decoder layer", title_justify="left")
    for c in ("layer", "cosine", "rel error"):
        d.add_column(c, justify="right")
    for x in r.layers:
        d.add_row(str(x.layer), f"{x.cosine:.6f}", f"{x.rel_error:.5f}")
    console.print(d)


CARD_BEGIN = "<!-- qstream eval -->"
CARD_END = "<!-- /qstream eval -->"


def card_section(r: EvalResult) -> str:
    """The model card's quality section for an eval result."""
    worst = max(r.layers, key=lambda d: d.rel_error) if r.layers else None
    lines = [CARD_BEGIN, "## Quality against the source", "",
             f"Measured by `qstream eval` on {r.text or 'a text'} ({r.text_tokens} tokens, {r.tokens} scored "
             f"positions in {r.ctx}-token windows): this model and its source run side by side, one decoder layer "
             "at a time, each decoded as its loader decodes it. KL divergence of this model's next-token "
             "distribution from the source's, over the full vocabulary, in nats.", "",
             "| KL mean | KL median | KL p99 | perplexity, source | perplexity, this model | top-1 agreement |",
             "|---:|---:|---:|---:|---:|---:|",
             f"| {r.kld_mean:.4f} | {r.kld_median:.4f} | {r.kld_p99:.4f} | {r.ppl_source:.3f} | {r.ppl_output:.3f} "
             f"| {r.top1_agree:.3f} |", ""]
    if worst is not None:
        last = r.layers[-1]
        lines += [f"Hidden states after the last decoder layer: cosine {last.cosine:.4f}, relative error "
                  f"{last.rel_error:.4f} (largest after layer {worst.layer}: {worst.rel_error:.4f}).", ""]
    lines.append(CARD_END)
    return "\n".join(lines) + "\n"


def write_card_section(dst: str | Path, r: EvalResult) -> Path:
    """Put the eval section into DST/README.md (replacing an earlier one), atomically."""
    from .writer import write_atomic

    card = Path(dst) / "README.md"
    text = card.read_text(encoding="utf-8") if card.exists() else ""
    a, b = text.find(CARD_BEGIN), text.find(CARD_END)
    if a >= 0 and b > a:
        text = text[:a].rstrip("\n") + "\n\n" + text[b + len(CARD_END):].lstrip("\n")
    text = text.rstrip("\n") + "\n\n" + card_section(r)
    write_atomic(card, text)
    return card
