"""Command line: `qstream inspect`, `qstream convert`, `qstream demo`.

The commands only parse options and call source -> plan -> convert; rich draws
the tables and progress on a terminal, plain lines are printed otherwise.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import __version__
from .publish.card import human
from .errors import QStreamError
from .plan.plan import Options, Plan, make_plan, parse_size
from .schemes import ATTN_SCHEMES, SCHEMES
from .sources.source import open_checkpoint

err = Console(stderr=True)


def _console(quiet: bool) -> Console:
    c = Console(quiet=quiet, highlight=False)
    if not c.is_terminal:  # logs and pipes: wide enough that tables do not wrap names
        c = Console(quiet=quiet, highlight=False, width=max(c.width, 160))
    return c


def plan_options(f):
    f = click.option("--mlp", type=click.Choice(sorted(SCHEMES) + ["none"]), default="mxfp4", show_default=True,
                     help="Scheme for the MLP linears (gate/up/down, experts). mxfp4: E2M1 + E8M0 scale per 32 "
                          "(4.25 bits/weight); nvfp4: E2M1 + FP8 scale per 16 + FP32 global scale (4.5 bits); "
                          "none: copy everything.")(f)
    f = click.option("--attn", type=click.Choice(["keep", "bf16", *ATTN_SCHEMES]), default="keep", show_default=True,
                     help="Attention linears. keep: as the source has them (BF16 passes through; FP8 keeps its "
                          "bytes, scales renamed for compressed-tensors); bf16: dequantize FP8 attention to BF16; "
                          + "; ".join(f"{n}: {e.description}" for n, e in ATTN_SCHEMES.items()) + ".")(f)
    f = click.option("--ignore", "ignore", multiple=True, metavar="REGEX",
                     help="Leave tensors whose name matches REGEX (Python re.search) unquantized. Repeatable.")(f)
    f = click.option("--recipe", type=click.Path(exists=True, dir_okay=False), default=None,
                     help="TOML file with [[rules]] (regex -> role, tried before the model family's), "
                          "[schemes] (role -> scheme) and ignore = [regex, ...].")(f)
    f = click.option("--max-shard-size", default="5GB", show_default=True,
                     help="Largest output shard, e.g. 5GB, 500MB, 4GiB.")(f)
    f = click.option("--scale-search", type=click.Choice(["none", "4over6", "mse"]), default=Options.scale_search,
                     show_default=True,
                     help="How each FP4 block's scale is chosen (the output format is the same). none: "
                          "compressed-tensors' round-to-nearest, byte for byte; 4over6 (nvfp4 only): block max "
                          "scaled to 6 or to 4, whichever decodes with the lower squared error; mse: also the "
                          "neighbouring E4M3 scale codes (nvfp4) or E8M0 exponents (mxfp4), lowest squared "
                          "error of the decoded block wins.")(f)
    f = click.option("--format", "fmt", type=click.Choice(["compressed-tensors", "modelopt"]),
                     default="compressed-tensors", show_default=True,
                     help="Output layout. compressed-tensors: vLLM and transformers; modelopt: NVIDIA ModelOpt "
                          "weight-only NVFP4 (W4A16_NVFP4: weight / weight_scale / weight_scale_2 and "
                          "hf_quant_config.json) for TensorRT-LLM and vLLM's modelopt_fp4; needs --mlp nvfp4.")(f)
    f = click.option("--activations", type=click.Choice(["none", "mxfp4", "nvfp4"]), default="none",
                     show_default=True,
                     help="Quantize the FP4 Linears' activations too (W4A4). none: weight-only; mxfp4 (with --mlp "
                          "mxfp4): dynamic E8M0 scales per 32 inputs, no data needed; nvfp4 (with --mlp nvfp4): "
                          "static per-layer input global scales from --calibrate.")(f)
    f = click.option("--calibrate", "calibrate", type=click.Path(dir_okay=False), default=None, metavar="FILE",
                     help="GPTQ every FP4 Linear, calibrated on this UTF-8 text (or .jsonl with a 'text' field) "
                          "tokenized with the source's tokenizer, one decoder layer at a time (CUDA when present); "
                          "each group's scale by --scale-search on the error-updated weights (mse: the candidate with the least GPTQ loss). With --activations "
                          "nvfp4 it also gives the static input scales. Needs the calibrate extra; a Hub SRC is "
                          "downloaded whole before the calibration pass (not with --low-disk).")(f)
    f = click.option("--allow-unloadable", is_flag=True,
                     help="Write an output that vLLM and transformers are known not to load (gpt-oss experts "
                          "quantized one by one in compressed-tensors) instead of refusing it.")(f)
    f = click.option("--calib-samples", type=click.IntRange(min=1), default=None,
                     help="--calibrate: number of token windows (default 128).")(f)
    f = click.option("--calib-seqlen", type=click.IntRange(min=2), default=None,
                     help="--calibrate: tokens per window (default 512).")(f)
    return f


def _make_plan(src: str, mlp: str, ignore: tuple[str, ...], recipe: str | None, max_shard_size: str,
               attn: str = "keep", fmt: str = "compressed-tensors",
               revision: str | None = None, download_dir: Path | None = None,
               scale_search: str = Options.scale_search, activations: str = "none", calibrate: str | None = None,
               calibration: str | None = None, allow_unloadable: bool = False) -> Plan:
    ckpt = open_checkpoint(src, revision=revision, download_dir=download_dir)
    opts = Options(mlp=mlp, attn=attn, ignore=tuple(ignore), recipe=recipe, max_shard_size=parse_size(max_shard_size),
                   format=fmt, scale_search=scale_search, activations=activations,
                   calibrate_label=Path(calibrate).name if calibrate else None, calibration=calibration,
                   allow_unloadable=allow_unloadable)
    plan = make_plan(ckpt, opts)  # every check before the calibration pass; W4A4 scale values from it
    plan.command = card_command(sys.argv[1:], getattr(ckpt, "repo_id", None) or None)
    return plan


# Options that do not change the output: left out of the command recorded in the model
# card, so that a resumed run, another --threads or a push writes the same card.
_RUN_ONLY_FLAGS = {"--resume", "--overwrite", "-q", "--quiet", "--dry-run", "--low-disk", "--private", "--skip-space-check"}
_RUN_ONLY_VALUES = {"--threads", "--push-to-hub", "--push-revision", "--commit-message", "--eval"}


def card_command(argv: list[str], src_name: str | None = None) -> str:
    """The command line for the model card, without the run-only options and without local
    paths: a local SRC reads ``SRC`` (a Hub SRC keeps its id), DST reads ``OUT``, a recipe file
    its file name."""
    out: list[str] = []
    skip = False
    positional = 0
    path_value = False
    for a in argv:
        if skip:
            skip = False
            continue
        name = a.split("=", 1)[0]
        if name in _RUN_ONLY_FLAGS:
            continue
        if name in _RUN_ONLY_VALUES:
            skip = "=" not in a
            continue
        if path_value:
            path_value = False
            out.append(Path(a).name)
            continue
        if name in ("--recipe", "--calibrate"):  # a local file: its name only
            if "=" in a:
                out.append(name + "=" + Path(a.split("=", 1)[1]).name)
            else:
                out.append(a)
                path_value = True
            continue
        if not a.startswith("-") and out and out[-1].startswith("--") and "=" not in out[-1] and \
                out[-1] not in _FLAGS:
            out.append(a)  # an option's value
            continue
        if not a.startswith("-") and len(out) >= 1 and out[0] in ("convert", "inspect") and positional < 2:
            positional += 1
            out.append((src_name or "SRC") if positional == 1 else "OUT")
            continue
        out.append(a)
    return "qstream " + " ".join(shlex.quote(a) for a in out) if out else ""


_FLAGS = {"--dry-run", "--tensors", "--json"} | _RUN_ONLY_FLAGS


def _space_needed(plan: Plan, dst: Path, low_disk: bool, push: bool = False) -> int:
    """Bytes DST's device must have free: the output shards not yet there (with --low-disk and
    --push-to-hub only two at a time), plus the two largest source shards --low-disk downloads
    into DST."""
    sizes = [s.file_bytes for s in plan.shards
             if not ((dst / s.filename).is_file() and (dst / s.filename).stat().st_size == s.file_bytes)]
    need = sum(sorted(sizes, reverse=True)[:2]) if low_disk and push else sum(sizes)
    if low_disk:
        remote = getattr(plan.source, "remote", {}) or {}
        src_sizes = getattr(plan.source, "sizes", {}) or {}
        need += sum(sorted((src_sizes.get(p, 0) for p in remote), reverse=True)[:2])
    return need


def print_plan(plan: Plan, console: Console, tensors: bool = False) -> None:
    src = plan.source
    console.print(f"[bold]{getattr(src, 'label', src.root)}[/]  family: [cyan]{plan.family}[/]  "
                  f"{len(plan.ops)} tensors in {len(src.shards)} shard(s)")
    t = Table(title="Plan by role", title_justify="left")
    for c, j in [("role", "left"), ("tensors", "right"), ("quantized", "right"), ("action", "left"),
                 ("bytes in", "right"), ("bytes out", "right"), ("ratio", "right")]:
        t.add_column(c, justify=j)
    for role, s in plan.by_role().items():
        actions: dict[str, int] = {}
        for op in plan.ops:
            if op.role == role:
                actions[op.action] = actions.get(op.action, 0) + 1
        action = ", ".join(sorted(actions, key=lambda a: -actions[a]))
        t.add_row(role, str(s.tensors), str(s.quantized), action, human(s.bytes_in), human(s.bytes_out),
                  f"{s.bytes_in / s.bytes_out:.2f}x" if s.bytes_out else "-")
    t.add_section()
    t.add_row("total", str(len(plan.ops)), str(plan.quantized), "",
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
            action = op.action + (f" ({op.note})" if op.note else "")
            tt.add_row(op.source.name, op.role, action, ins, outs, str(op.outputs[0].shard + 1))
        console.print(tt)
    for w in plan.warnings:
        err.print(f"[yellow]warning:[/] {w}", soft_wrap=True)


def plan_json(plan: Plan) -> dict:
    return {
        "source": str(getattr(plan.source, "label", plan.source.root)),
        "family": plan.family,
        "bytes_in": plan.bytes_in,
        "bytes_out": plan.bytes_out,
        "roles": {r: vars(s) for r, s in plan.by_role().items()},
        "shards": [{"file": s.filename, "bytes": s.file_bytes} for s in plan.shards],
        "tensors": [
            {"source": op.source.name, "role": op.role, "action": op.kind, "scheme": op.scheme,
             "label": op.action,
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


REVISION_HELP = "Hub source (SRC = org/name): the branch, tag or commit to convert (default: main)."


@main.command()
@click.argument("src")
@plan_options
@click.option("--tensors", is_flag=True, help="Also list every tensor with its action, shapes and output shard.")
@click.option("--json", "as_json", is_flag=True, help="Print the whole plan as JSON.")
@click.option("--revision", default=None, help=REVISION_HELP)
def inspect(src, mlp, attn, ignore, recipe, max_shard_size, scale_search, fmt, activations, calibrate, allow_unloadable,
            calib_samples, calib_seqlen, tensors, as_json, revision):
    """Show the plan for SRC: what happens to every tensor and the output size. Reads no tensor data."""
    plan = _make_plan(src, mlp, ignore, recipe, max_shard_size, attn, fmt, revision=revision, scale_search=scale_search,
                      activations=activations, calibrate=calibrate, allow_unloadable=allow_unloadable)
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
@click.option("--revision", default=None, help=REVISION_HELP)
@click.option("--low-disk", is_flag=True,
              help="Keep disk use near two source plus two output shards: delete each downloaded source shard "
                   "once every tensor that needs it is written and, with --push-to-hub, each output shard once "
                   "it is uploaded (DST then keeps only the small files).")
@click.option("--push-to-hub", "push_to_hub", metavar="ORG/NAME", default=None,
              help="Create the Hub repo if needed, upload each shard as soon as it is written (while the next is "
                   "converted), then make one commit with everything. Rerunning the same command after an "
                   "interruption resumes and re-sends nothing the Hub already has. Root-level *.safetensors in "
                   "the repo that the new index does not name are deleted in that commit.")
@click.option("--private", is_flag=True, help="With --push-to-hub: create the repo private.")
@click.option("--push-revision", metavar="BRANCH", default=None,
              help="With --push-to-hub: the branch to commit to (created from main if missing; default main).")
@click.option("--commit-message", default=None, help="With --push-to-hub: the commit title.")
@click.option("--base-model", metavar="ORG/NAME", default=None,
              help="The Hub model the source is (the card's base_model). Default: the Hub SRC itself, or "
                   "config.json's _name_or_path when it is a Hub id; otherwise the card has none (with a warning).")
@click.option("--skip-space-check", is_flag=True,
              help="Do not refuse to start when DST's device reports less free space than the output needs (for "
                   "file systems whose free space is not what fits: compressed, deduplicated or network ones).")
@click.option("--eval", "eval_text", type=click.Path(exists=True, dir_okay=False), default=None,
              help="After converting, run `qstream eval` on this text (8192 tokens, 1024-token windows) and write "
                   "the figures into the model card. Needs a local SRC and the calibrate extra.")
def convert(src, dst, mlp, attn, ignore, recipe, max_shard_size, scale_search, fmt, activations, calibrate,
            allow_unloadable, calib_samples, calib_seqlen, dry_run, overwrite, resume, threads, quiet, revision, low_disk, push_to_hub,
            private, push_revision, commit_message, base_model, skip_space_check,
            eval_text):
    """Convert SRC (a checkpoint folder, or a Hub repo id like org/name) into DST (a new folder)."""
    from .convert import Executor
    from .publish.hub import DiskMeter, HubHooks, HubPusher, push_resumable, source_label
    from .sources.hub_source import DOWNLOADS
    from .progress import make_progress
    from .publish.card import base_model_of, is_hub_id, model_card
    from .writer import STAGING_DIR, check_dst, prepare_dst

    for flag, value in (("--private", private), ("--push-revision", push_revision), ("--commit-message", commit_message)):
        if value and not push_to_hub:
            raise click.UsageError(f"{flag} needs --push-to-hub.")
    if base_model is not None and not is_hub_id(base_model):
        raise QStreamError(f"--base-model {base_model!r} is not a Hub model id; pass ORG/NAME as on huggingface.co.")
    if eval_text and (push_to_hub or not Path(src).is_dir()):
        raise click.UsageError("--eval needs a local SRC folder and no --push-to-hub (the card is pushed before "
                               "the eval could run); run `qstream eval` and push afterwards.")
    console = _console(quiet)
    download_dir = (Path(dst) / STAGING_DIR / DOWNLOADS).absolute() if low_disk else None
    hub_calib = calibrate is not None and not Path(src).is_dir()  # a Hub SRC: downloaded whole for the pass
    if hub_calib and low_disk:
        raise click.UsageError("--calibrate reads every decoder layer of the source before the conversion starts, "
                               "so a Hub SRC is downloaded whole first: drop --low-disk, or convert a local copy.")
    calib = None if hub_calib else _calibration_tokens(src, calibrate, calib_samples, calib_seqlen)
    plan = _make_plan(src, mlp, ignore, recipe, max_shard_size, attn, fmt, revision=revision, download_dir=download_dir,
                      scale_search=scale_search, activations=activations, calibrate=calibrate,
                      calibration=calib[1] if calib else None, allow_unloadable=allow_unloadable)
    if hub_calib:  # the tokenizer is among the side files the plan already fetched
        calib = _calibration_tokens(str(plan.source.root), calibrate, calib_samples, calib_seqlen)
        plan.options = dataclasses.replace(plan.options, calibration=calib[1])
    if calib and not calib[0].calibrated_ops(plan):
        raise click.UsageError("--calibrate: the plan quantizes no Linear to FP4 (e.g. --mlp none); nothing to calibrate.")
    plan.base_model = base_model
    plan.serve_name = push_to_hub
    _, no_base = base_model_of(plan)
    if no_base and push_to_hub:
        plan.warnings.append(no_base)
    dstp = Path(dst)
    need = 0 if skip_space_check else _space_needed(plan, dstp, low_disk, bool(push_to_hub))
    if dry_run:
        print_plan(plan, console)
        check_dst(plan.source.root, dstp, overwrite=overwrite, resume=resume, need_bytes=need)
        room = f"has room for the {human(need)} it needs" if need else "was not checked for free space"
        console.print(f"dry run: nothing written; {dstp} is usable and {room}")
        return
    for w in plan.warnings:
        err.print(f"[yellow]warning:[/] {w}", soft_wrap=True)
    # An interrupted push of this same plan resumes with the same command (DST is all ours).
    resume = resume or bool(push_to_hub and push_resumable(dstp, push_to_hub, plan.fingerprint()))
    pusher = None
    if push_to_hub:
        pusher = HubPusher(push_to_hub, dstp, plan.fingerprint(), private=private, branch=push_revision,
                           commit_message=commit_message or "", delete_uploaded=low_disk, log=console.print)
        pusher.connect()
        pusher.validate_card(model_card(plan))  # the Hub's metadata check, before the first shard is sent
    lock = prepare_dst(plan.source.root, dstp, overwrite=overwrite, resume=resume, need_bytes=need)  # noqa: F841 (held)
    if hub_calib:
        from .sources.hub_source import download_shards

        download_shards(plan.source, None if quiet else console.print)
    if pusher is not None:
        pusher.start()
    meter = DiskMeter([dstp]).start() if low_disk else None
    hooks = HubHooks(plan, dstp, low_disk=low_disk, pusher=pusher, meter=meter)
    progress, done = make_progress(console, quiet)
    try:
        cal = calib[0].calibrate(plan, dstp, calib[2], resume=resume, on_layer=lambda i, n: quiet or console.print(
            f"calibration: decoder layer {i + 1}/{n} quantized (GPTQ)"), on_note=lambda s: err.print(
            f"[yellow]note:[/] {escape(s)}", soft_wrap=True)) if calib else None
        result = Executor(plan, dstp, threads=threads, resume=resume, hooks=hooks, calibrated=cal).run(progress)
        if cal is not None:
            cal.cleanup()
    except KeyboardInterrupt:
        done()
        again = "the same command" if push_to_hub else "the same command with --resume"
        err.print(f"[yellow]interrupted:[/] finished shards are kept, and what --resume needs is in "
                  f"{dstp / STAGING_DIR} (delete the folder to give up); run {again} to continue.", soft_wrap=True)
        sys.exit(130)
    finally:
        done()
        hooks.close()
    if eval_text:
        _eval_into_card(dstp, src, eval_text, console)
    if pusher is not None and pusher.result is not None:
        console.print(f"pushed to {pusher.result.repo_id}: commit {pusher.result.commit} ({pusher.result.url})")
    if meter is not None:
        console.print(f"peak disk use under {dstp}: {human(meter.peak)} ({meter.peak} bytes)")
    if not quiet:
        console.print(f"[bold]Converted {source_label(plan.source)} -> {dstp}[/]", soft_wrap=True)
        t = Table(show_header=False)
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


@main.command()
@click.argument("dst", type=click.Path(exists=True, file_okay=False))
@click.option("--source", "source", type=click.Path(exists=True, file_okay=False), default=None,
              help="The checkpoint DST was converted from: decode every quantized tensor and report its relative "
                   "error, SNR and max abs error against the source, per tensor (worst first) and per role.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON (every tensor, worst first).")
@click.option("--top", type=click.IntRange(min=0), default=None,
              help="Show the N worst tensors (default: 20 in the table, all in --json).")
@click.option("--max-rel-error", type=click.FloatRange(min=0), default=None,
              help="With --source: fail when a tensor's relative error ||w - w_hat|| / ||w|| exceeds this.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Worker threads (default: up to 8).")
def verify(dst, source, as_json, top, max_rel_error, threads):
    """Check a converted folder DST without loading a model: index, shards and config agree, every quantized
    module has its tensors with the right dtypes and shapes, no NaN/Inf. Exits 1 when a check fails."""
    from .verify.verify import print_report, verify as run_verify

    if max_rel_error is not None and source is None:
        raise click.UsageError("--max-rel-error needs --source.")
    report = run_verify(dst, source, threads=threads, max_rel_error=max_rel_error)
    if as_json:
        click.echo(json.dumps(report.to_json(top), indent=1))
        for e in report.errors:
            click.echo(f"error: {e}", err=True)
    else:
        print_report(report, _console(False), err, top)
    if not report.ok:
        sys.exit(1)


def _calibration_tokens(src: str, path: str | None, samples: int | None, seqlen: int | None):
    """(the calibrate module, the tokens' identity, [samples, seqlen] ids) for --calibrate, else None."""
    if path is None:
        if samples is not None or seqlen is not None:
            raise click.UsageError("--calib-samples and --calib-seqlen need --calibrate FILE.")
        return None
    if not Path(src).is_dir():
        raise click.UsageError(f"--calibrate: {src} is not a checkpoint folder (its tokenizer and layers are read "
                               "from it).")
    try:
        from . import calibrate
    except ImportError as e:
        raise QStreamError(f"--calibrate needs torch and transformers ({e}); install them with "
                           "pip install 'qstream-convert[calibrate]'.") from e
    ids = calibrate.calibration_ids(src, path, samples or calibrate.DEFAULT_SAMPLES, seqlen or calibrate.DEFAULT_SEQLEN)
    return calibrate, calibrate.calibration_key(ids), ids


def _eval_into_card(dst: Path, src: str, text: str, console: Console) -> None:
    try:
        from .evaluate import evaluate_text, print_result, write_card_section
    except ImportError as e:
        raise QStreamError(f"--eval needs torch and transformers ({e}); install them with "
                           "pip install 'qstream[calibrate]'.") from e
    r = evaluate_text(dst, src, text)
    print_result(r, console)
    console.print(f"eval figures written into {write_card_section(dst, r)}")


@main.command("eval")
@click.argument("dst", type=click.Path(exists=True, file_okay=False))
@click.option("--source", "source", type=click.Path(exists=True, file_okay=False), required=True,
              help="The checkpoint DST was converted from (the reference distribution).")
@click.option("--text", "text", required=True, help="UTF-8 text file (or .jsonl with a 'text' field) to score.")
@click.option("--tokens", type=click.IntRange(min=2), default=8192, show_default=True,
              help="Score the first N tokens of the text (source tokenizer, no special tokens).")
@click.option("--ctx", type=click.IntRange(min=2), default=1024, show_default=True,
              help="Window length: non-overlapping windows, each scored from its second token.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def eval_(dst, source, text, tokens, ctx, as_json):
    """Run DST and its source side by side one decoder layer at a time (never a whole model; CUDA when present)
    and report KL divergence (mean, median, p99), both perplexities, top-1 agreement and per-layer drift.
    Needs torch and transformers: pip install 'qstream[calibrate]'."""
    try:
        from .evaluate import evaluate_text, print_result
    except ImportError as e:
        raise QStreamError(f"qstream eval needs torch and transformers ({e}); install them with "
                           "pip install 'qstream[calibrate]'.") from e
    console = _console(as_json)
    r = evaluate_text(dst, source, text, tokens, ctx,
                      on_layer=None if as_json or not err.is_terminal else lambda i, n: err.print(f"layer {i + 1}/{n}", end="\r"))
    if as_json:
        click.echo(json.dumps(r.to_json(), indent=1))
    else:
        print_result(r, console)


def _sigterm(signum, frame):  # pragma: no cover - exercised by the resume tests
    raise KeyboardInterrupt


def run() -> None:
    """Entry point that turns qstream errors into one line and an exit code."""
    import signal

    signal.signal(signal.SIGTERM, _sigterm)
    try:
        main(standalone_mode=False)
    except QStreamError as e:
        err.print(f"[red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)  # "[calibrate]" is no markup
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
