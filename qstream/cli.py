"""Command line: `qstream inspect`, `qstream convert`, `qstream demo`.

The commands only parse options and call source -> plan -> convert; rich draws
the tables and progress on a terminal, plain lines are printed otherwise.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from . import __version__
from .card import human
from .errors import QStreamError
from .plan import Options, Plan, make_plan, parse_size
from .schemes import SCHEMES
from .source import open_checkpoint

err = Console(stderr=True)


def _console(quiet: bool) -> Console:
    return Console(quiet=quiet, highlight=False)


def plan_options(f):
    f = click.option("--mlp", type=click.Choice(sorted(SCHEMES) + ["none"]), default="mxfp4", show_default=True,
                     help="Scheme for the MLP linears (gate/up/down, experts). mxfp4: E2M1 + E8M0 scale per 32 "
                          "(4.25 bits/weight); nvfp4: E2M1 + FP8 scale per 16 + FP32 global scale (4.5 bits); "
                          "none: copy everything.")(f)
    f = click.option("--ignore", "ignore", multiple=True, metavar="REGEX",
                     help="Leave tensors whose name matches REGEX (Python re.search) unquantized. Repeatable.")(f)
    f = click.option("--recipe", type=click.Path(exists=True, dir_okay=False), default=None,
                     help="TOML file with [[rules]] (regex -> role, tried before the model family's), "
                          "[schemes] (role -> scheme) and ignore = [regex, ...].")(f)
    f = click.option("--max-shard-size", default="5GB", show_default=True,
                     help="Largest output shard, e.g. 5GB, 500MB, 4GiB.")(f)
    return f


def _make_plan(src: str, mlp: str, ignore: tuple[str, ...], recipe: str | None, max_shard_size: str) -> Plan:
    ckpt = open_checkpoint(Path(src))
    opts = Options(mlp=mlp, ignore=tuple(ignore), recipe=recipe, max_shard_size=parse_size(max_shard_size))
    plan = make_plan(ckpt, opts)
    plan.command = "qstream " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else ""
    return plan


def print_plan(plan: Plan, console: Console, tensors: bool = False) -> None:
    src = plan.source
    console.print(f"[bold]{src.root}[/]  family: [cyan]{plan.family}[/]  "
                  f"{len(plan.ops)} tensors in {len(src.shards)} shard(s)")
    t = Table(title="Plan by role", title_justify="left")
    for c, j in [("role", "left"), ("tensors", "right"), ("quantized", "right"), ("action", "left"),
                 ("bytes in", "right"), ("bytes out", "right"), ("ratio", "right")]:
        t.add_column(c, justify=j)
    for role, s in plan.by_role().items():
        schemes = sorted({op.scheme for op in plan.ops if op.role == role and op.kind == "quantize"})
        action = (", ".join(schemes) + (" + passthrough" if s.quantized < s.tensors else "")) if schemes else "passthrough"
        t.add_row(role, str(s.tensors), str(s.quantized), action, human(s.bytes_in), human(s.bytes_out),
                  f"{s.bytes_in / s.bytes_out:.2f}x" if s.bytes_out else "-")
    t.add_section()
    t.add_row("total", str(len(plan.ops)), str(sum(op.kind == "quantize" for op in plan.ops)), "",
              human(plan.bytes_in), human(plan.bytes_out),
              f"{plan.bytes_in / plan.bytes_out:.2f}x" if plan.bytes_out else "-")
    console.print(t)
    console.print(f"output: {len(plan.shards)} shard(s): " + ", ".join(
        f"{s.filename} ({human(s.file_bytes)})" for s in plan.shards))
    if tensors:
        tt = Table(title="Tensors", title_justify="left")
        for c in ("tensor", "role", "action", "in", "out", "shard"):
            tt.add_column(c)
        for op in plan.ops:
            ins = f"{op.source.dtype} {list(op.source.shape)}"
            outs = "\n".join(f"{o.name.rsplit('.', 1)[-1]} {o.dtype} {list(o.shape)}" for o in op.outputs) \
                if op.kind == "quantize" else "same"
            action = op.scheme if op.kind == "quantize" else ("copy" + (f" ({op.note})" if op.note else ""))
            tt.add_row(op.source.name, op.role, action, ins, outs, str(op.outputs[0].shard + 1))
        console.print(tt)
    for w in plan.warnings:
        err.print(f"[yellow]warning:[/] {w}")


def plan_json(plan: Plan) -> dict:
    return {
        "source": str(plan.source.root),
        "family": plan.family,
        "bytes_in": plan.bytes_in,
        "bytes_out": plan.bytes_out,
        "roles": {r: vars(s) for r, s in plan.by_role().items()},
        "shards": [{"file": s.filename, "bytes": s.file_bytes} for s in plan.shards],
        "tensors": [
            {"source": op.source.name, "role": op.role, "action": op.kind, "scheme": op.scheme,
             "outputs": [{"name": o.name, "dtype": o.dtype, "shape": list(o.shape), "bytes": o.nbytes,
                          "shard": plan.shards[o.shard].filename} for o in op.outputs]}
            for op in plan.ops
        ],
        "quantization_config": plan.quantization_config,
        "warnings": plan.warnings,
    }


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="qstream")
def main() -> None:
    """Stream a Hugging Face safetensors checkpoint into MXFP4 / NVFP4 (compressed-tensors),
    tensor by tensor, without loading the model."""


@main.command()
@click.argument("src")
@plan_options
@click.option("--tensors", is_flag=True, help="Also list every tensor with its action, shapes and output shard.")
@click.option("--json", "as_json", is_flag=True, help="Print the whole plan as JSON.")
def inspect(src, mlp, ignore, recipe, max_shard_size, tensors, as_json):
    """Show the plan for SRC: what happens to every tensor and the output size. Reads no tensor data."""
    plan = _make_plan(src, mlp, ignore, recipe, max_shard_size)
    if as_json:
        click.echo(json.dumps(plan_json(plan), indent=1))
    else:
        print_plan(plan, _console(False), tensors)


@main.command()
@click.argument("src")
@click.argument("dst", type=click.Path(file_okay=False))
@plan_options
@click.option("--dry-run", is_flag=True, help="Print the plan and write nothing.")
@click.option("--overwrite", is_flag=True, help="Replace the weights, index, config and card in a non-empty DST.")
@click.option("--resume", is_flag=True, help="Continue an interrupted conversion into DST: finished shards are "
              "checked against the journal (size and SHA-256) and kept, the rest is redone. Refuses if the "
              "source or options changed.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Worker threads for reading, quantizing and writing (default: all cores).")
@click.option("--quiet", "-q", is_flag=True, help="Print only errors and warnings.")
def convert(src, dst, mlp, ignore, recipe, max_shard_size, dry_run, overwrite, resume, threads, quiet):
    """Convert SRC (a checkpoint folder) into DST (a new folder)."""
    from .convert import Executor
    from .progress import make_progress
    from .writer import prepare_dst

    console = _console(quiet)
    plan = _make_plan(src, mlp, ignore, recipe, max_shard_size)
    if dry_run:
        print_plan(plan, console)
        console.print("dry run: nothing written")
        return
    for w in plan.warnings:
        err.print(f"[yellow]warning:[/] {w}")
    dstp = Path(dst)
    prepare_dst(plan.source.root, dstp, overwrite=overwrite, resume=resume)
    progress, done = make_progress(console, quiet)
    try:
        result = Executor(plan, dstp, threads=threads, resume=resume).run(progress)
    except KeyboardInterrupt:
        done()
        err.print(f"[yellow]interrupted:[/] finished shards are kept; run the same command with --resume to continue.")
        sys.exit(130)
    finally:
        done()
    if not quiet:
        t = Table(title=f"Converted {plan.source.root} -> {dstp}", title_justify="left")
        t.add_column("")
        t.add_column("", justify="right")
        t.add_row("time", f"{result.seconds:.1f} s")
        t.add_row("bytes in", human(result.bytes_in))
        t.add_row("bytes out", human(result.bytes_out))
        t.add_row("ratio", f"{result.bytes_in / max(1, result.bytes_out):.2f}x")
        t.add_row("throughput", f"{human(result.bytes_in / max(result.seconds, 1e-9))}/s")
        t.add_row("tensors quantized", str(result.quantized))
        t.add_row("tensors passed through", str(result.passed))
        t.add_row("output shards", str(len(result.shards)))
        console.print(t)


def _sigterm(signum, frame):  # pragma: no cover - exercised by the resume tests
    raise KeyboardInterrupt


def run() -> None:
    """Entry point that turns qstream errors into one line and an exit code."""
    import signal

    signal.signal(signal.SIGTERM, _sigterm)
    try:
        main(standalone_mode=False)
    except QStreamError as e:
        err.print(f"[red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except click.exceptions.Abort:
        err.print("interrupted")
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/]")
        sys.exit(130)
