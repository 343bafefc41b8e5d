"""Progress display: a rich bar on a terminal, plain lines otherwise."""

from __future__ import annotations

import time
from typing import Callable

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress as RichProgress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from .publish.card import human
from .convert import Progress


def make_progress(console: Console, quiet: bool) -> tuple[Progress, Callable[[], None]]:
    if quiet:
        return Progress(), lambda: None
    if console.is_terminal:
        bar = RichProgress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[tensors]}"),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        state = {"task": None, "n": 0, "total": 0}

        def on_start(plan):
            state["total"] = len(plan.ops)
            bar.start()
            state["task"] = bar.add_task("converting", total=plan.bytes_in, tensors=f"0/{len(plan.ops)} tensors")

        def on_tensor(op, nbytes):
            state["n"] += 1
            bar.update(state["task"], advance=nbytes, tensors=f"{state['n']}/{state['total']} tensors")

        def on_shard(path):
            bar.console.print(f"wrote {path.name}")

        return Progress(on_start, on_tensor, on_shard, lambda msg: bar.console.print(msg)), bar.stop

    st = {"t0": 0.0, "done": 0, "total": 1, "n": 0, "ntot": 0, "last": 0.0}

    def p_start(plan):
        now = time.perf_counter()
        # the first line after 5 s, not after the first (tiny) tensor: no rate or ETA from one sample
        st.update(t0=now, last=now, total=max(1, plan.bytes_in), ntot=len(plan.ops))
        console.print(f"converting {len(plan.ops)} tensors, {human(plan.bytes_in)} -> {human(plan.bytes_out)}")

    def p_tensor(op, nbytes):
        st["done"] += nbytes
        st["n"] += 1
        now = time.perf_counter()
        if now - st["last"] >= 5 or st["n"] == st["ntot"]:
            st["last"] = now
            el = now - st["t0"]
            rate = st["done"] / el if el > 0 else 0
            eta = (st["total"] - st["done"]) / rate if rate > 0 else 0
            console.print(f"{st['n']}/{st['ntot']} tensors, {human(st['done'])}/{human(st['total'])}, "
                          f"{human(rate)}/s, ETA {eta:.0f} s")

    def p_shard(path):
        console.print(f"wrote {path.name}")

    return Progress(p_start, p_tensor, p_shard, lambda msg: console.print(msg)), lambda: None
