"""`qstream verify`'s results: per-tensor error metrics, their aggregates per role and
scheme, the report (errors, warnings, modules found) and how it is printed."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

MAX_PRINTED_ERRORS = 50  # error lines printed; --json lists all

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
            self.errors.append(f"{m.module}: relative error {m.rel_error:.4g} exceeds --max-rel-error "
                               f"{max_rel_error:g}" + (" (the default)" if default else ""))
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


# --------------------------------------------------------------------------- printing

def _fmt(x: float | None, spec: str) -> str:
    if x is None:
        return "-"
    return format(x, spec)


def print_report(report: Report, console, err, top: int | None = None) -> None:
    """Tables on ``console`` (stdout), errors and warnings as one line each on ``err``."""
    from rich.markup import escape
    from rich.table import Table

    from ..publish.card import human

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
