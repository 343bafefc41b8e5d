"""The model card (README.md) written next to a converted checkpoint.

Every claim in it is derived from the plan (what each tensor became, by the one rule
:attr:`qstream.plan.ops.Op.quantized`) and from what the conversion measured; the source
card's metadata and text are carried over. It names no local path.
"""

from __future__ import annotations

import math
import re

from .. import __version__, activations
from ..layouts import openai_mxfp4
from ..plan.plan import Plan
from ..schemes import ATTN_SCHEMES, FP4_DTYPE, SCHEMES

DIST_NAME = "qstream-convert"  # the PyPI distribution (the command and the import are `qstream`)
PROJECT_URL = f"https://pypi.org/project/{DIST_NAME}/"
VLLM_CHECKED = "0.32.0"  # the vLLM whose source the requirements below were read from
# Metadata of the source card carried over as is (the Hub validates these keys).
CARRIED_KEYS = ("license", "license_name", "license_link", "language", "pipeline_tag", "datasets")
# A Hub model id as the Hub accepts it for base_model: org/name, letters, digits, - _ . (no -- or ..).
HUB_ID = re.compile(r"[A-Za-z0-9](?:[\w.-]{0,94}[A-Za-z0-9])?/[A-Za-z0-9_](?:[\w.-]{0,94}[A-Za-z0-9_])?")


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


def is_hub_id(text: object) -> bool:
    return isinstance(text, str) and bool(HUB_ID.fullmatch(text)) and ".." not in text and "--" not in text \
        and not text.endswith(".git")


def split_card(card: str | None) -> tuple[dict, str]:
    """(front matter as a dict, the text below it) of a model card; ({}, text) without front matter."""
    if not card:
        return {}, ""
    text = card.lstrip("\ufeff")
    m = re.match(r"---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(?:\r?\n|$)", text, re.S)
    if not m:
        return {}, text
    import yaml

    try:
        meta = yaml.safe_load(m.group(1)) or {}
    except yaml.YAMLError:
        meta = {}
    return (meta if isinstance(meta, dict) else {}), text[m.end():]


def base_model_of(plan: Plan) -> tuple[str | None, str | None]:
    """The card's base_model and, when there is none, why (a warning for the user).

    ``--base-model`` wins; a Hub source is its own base; a local source's ``_name_or_path``
    counts only when it is a Hub id (not a path that exists or looks like one)."""
    from pathlib import Path

    if plan.base_model:
        return plan.base_model, None
    repo = getattr(plan.source, "repo_id", None)
    if repo:
        return repo, None
    name = plan.source.config.get("_name_or_path")
    if is_hub_id(name) and not Path(name).exists():
        return name, None
    why = (f"config.json's _name_or_path {name!r} is not a Hub model id" if name else
           "the source is a local folder and its config.json has no _name_or_path")
    return None, (f"the model card has no base_model: {why}; pass --base-model ORG/NAME (the Hub repo it was "
                  "converted from) to link it")


def _kind(op) -> str:
    """What the conversion did to a quantized op's weight, in card words."""
    fmt = op.module_scheme.split(":")[0]
    if op.layout == "modelopt":
        return "nvfp4 (repacked from ModelOpt NVFP4, lossless)"
    if op.kind == "repack":
        return f"{fmt} (repacked from the source's MXFP4, lossless)"
    if op.kind == "fp8":
        return f"fp8 ({ATTN_SCHEMES[op.scheme].preset}, made from the source)"
    if op.kind == "copy" and op.layout == "openai":
        return f"{fmt} (the source's gpt-oss MXFP4 blocks, copied: lossless)"
    if op.kind == "copy":
        return "fp8 (kept from the source)"
    src = {None: "", "mxfp4": " from MXFP4"}.get(op.layout, " from FP8")
    return f"{fmt} (quantized{src})"


def _fmt_err(x: float) -> str:
    return f"{x:.4f}" if math.isfinite(x) else "-"


def _measured_rows(plan: Plan, measured: dict | None) -> list[str]:
    if measured is None:
        return ["Measured when the conversion finishes."]
    lossless = {f"{op.role}/{op.module_scheme.split(':')[0]}" for op in plan.ops
                if op.quantized and (op.kind == "repack" or op.layout in ("modelopt", "openai"))}
    rows = ["| role | format | tensors | relative error ‖w − ŵ‖ / ‖w‖ | SNR (dB) |", "|---|---|---:|---:|---:|"]
    for key, (sum_sq, err_sq, n) in measured.items():
        role, fmt = key.split("/")
        if key in lossless:
            rows.append(f"| {role} | {fmt} | {n} | 0 (lossless repack) | - |")
            continue
        rel = math.sqrt(err_sq / sum_sq) if sum_sq > 0 else (0.0 if err_sq == 0 else math.inf)
        snr = 10 * math.log10(sum_sq / err_sq) if err_sq > 0 and sum_sq > 0 else math.inf
        rows.append(f"| {role} | {fmt} | {n} | {_fmt_err(rel)} | {'∞' if snr == math.inf else f'{snr:.2f}'} |")
    if len(rows) == 2:
        return ["Nothing was quantized by this conversion, so there is no quantization error to report."]
    return ["Every weight quantized here was decoded the way compressed-tensors decodes it and compared "
            "with the source weight while converting (`qstream verify OUT --source SRC` measures the same):", "",
            *rows]


def _requirements(plan: Plan, fmts: list[str], moe: bool) -> list[str]:
    modelopt = plan.options.format == "modelopt"
    out = [f"Read from vLLM {VLLM_CHECKED}'s source (earlier versions were not checked):", ""]
    if modelopt:
        out.append(f"- **ModelOpt {(plan.quantization_config or {}).get('quant_algo')}**: vLLM {VLLM_CHECKED} or later (`modelopt_fp4`, chosen from config.json). "
                   "GPUs of compute capability 7.5 or higher; the weights run through the FP4 Marlin GEMM with "
                   "BF16/FP16 activations on every GPU.")
    elif "nvfp4" in fmts:
        out.append(f"- **{'NVFP4' if plan.options.activations == 'nvfp4' else 'NVFP4A16'}** (`nvfp4-pack-quantized`): vLLM {VLLM_CHECKED} or later. Compute capability 7.5 "
                   "or higher. Native FP4 on Blackwell data-center GPUs (SM 10.0 / 10.3, e.g. B200, GB200, B300) "
                   "through FlashInfer's CuTe-DSL W4A16 kernel; on Turing, Ampere, Ada and Hopper (SM 7.5-9.0) "
                   "through the FP4 Marlin kernel (weights decoded in the kernel, BF16 math).")
    openai = openai_mxfp4.is_openai(plan.quantization_config)
    if openai:
        out.append(openai_mxfp4.CARD_REQUIREMENT.format(v=VLLM_CHECKED))
    elif "mxfp4" in fmts and not modelopt:
        out.append(f"- **MXFP4** (`mxfp4-pack-quantized`): vLLM {VLLM_CHECKED} or later. Compute capability 8.0 or "
                   "higher. On SM 10.0+ with FlashInfer's CuTe-DSL kernels vLLM runs it natively as W4A4 (it also "
                   "quantizes the activations to MXFP4 at run time); elsewhere (Ampere, Ada, Hopper) weight-only "
                   "through the FP4 Marlin kernel.")
    if "fp8" in fmts:
        out.append("- **FP8** (`float-quantized`): native FP8 GEMM from compute capability 8.9 (Ada, Hopper, "
                   "Blackwell); below that vLLM's compressed-tensors loader runs it weight-only (W8A16 FP8 Marlin).")
    if not fmts:
        return ["None beyond the base model's: nothing was quantized."]
    if activations.card_requirement(plan.options):
        out.append(activations.card_requirement(plan.options))
    if moe and not modelopt and not openai:
        out += ["", "transformers 5.23 with compressed-tensors 0.20 cannot load per-expert FP4 MoE weights (it fuses "
                "the experts on load); serve this model with vLLM."]
    return out


def model_card(plan: Plan, measured: dict | None = None) -> str:
    """The README.md of the output. ``measured``: the executor's "role/format" -> [sum w^2,
    sum err^2, tensors]; None for a preview (the metadata checked before a push)."""
    src = plan.source
    meta, text = split_card(src.source_card)
    base, _ = base_model_of(plan)
    modelopt = plan.options.format == "modelopt"
    fmts = plan.schemes()  # formats of the quantized weights in the output (kept FP8 included)
    made = plan.schemes(converted_only=True)  # formats this run produced
    moe = any(".experts." in op.module for op in plan.ops if op.quantized)
    name = plan.serve_name or (base.split("/")[-1] if base else src.root.name)

    yaml_meta: dict = {}
    if base:
        yaml_meta["base_model"] = base
        if made:
            yaml_meta["base_model_relation"] = "quantized"
    for k in CARRIED_KEYS:
        if meta.get(k) not in (None, "", []):
            yaml_meta[k] = meta[k]
    yaml_meta["library_name"] = "transformers"
    tags = [t for t in (meta.get("tags") or []) if isinstance(t, str)] if isinstance(meta.get("tags"), list) else []
    openai = openai_mxfp4.is_openai(plan.quantization_config)
    ours = ["qstream", *([] if openai else ["modelopt" if modelopt else "compressed-tensors"]), "vllm", *fmts]
    yaml_meta["tags"] = tags + [t for t in ours if t not in tags]
    import yaml

    front = yaml.safe_dump(yaml_meta, sort_keys=False, allow_unicode=True, default_flow_style=False).strip()

    # what happened to each role, by the one rule
    by_role = plan.by_role()
    rows = ["| role | tensors | quantized | what happened | size in | size out |", "|---|---:|---:|---|---:|---:|"]
    for role, s in by_role.items():
        kinds = sorted({_kind(op) for op in plan.ops if op.role == role and op.quantized})
        other = [op for op in plan.ops if op.role == role and not op.quantized]
        if any(op.kind == "dequantize" for op in other):
            kinds.append("FP8 dequantized to BF16")
        if any(op.kind in ("copy", "cast") for op in other):
            kinds.append("kept as in the source" if not kinds else "the rest kept")
        if any(op.kind == "slice" for op in other):
            kinds.append("biases split per expert (same values)")
        rows.append(f"| {role} | {s.tensors} | {s.quantized} | {'; '.join(kinds)} | {human(s.bytes_in)} | {human(s.bytes_out)} |")
    kept_roles = [r for r, s in by_role.items() if s.quantized == 0 and not any(
        op.kind == "dequantize" for op in plan.ops if op.role == r)]
    what = []
    for f in made:
        ops = [op for op in plan.ops if op.converted and op.module_scheme.split(":")[0] == f]
        roles = sorted({op.role for op in ops})
        how = sorted({_kind(op).split(" (", 1)[1].rstrip(")") for op in ops})
        desc = SCHEMES[f].description if f in SCHEMES else " ".join(
            sorted({ATTN_SCHEMES[op.scheme].summary for op in ops if op.kind == "fp8"}))
        if plan.options.activations != "none":  # W4A4: the activations line below says what they are
            desc = desc.split(" Weight-only", 1)[0]
        what.append(f"- **{f.upper()}**, {', '.join(roles)} ({len(ops)} tensors; {', '.join(how)}): {desc}")
    kept_fp8 = [op for op in plan.ops if op.quantized and not op.converted]
    if kept_fp8:
        what.append(f"- **FP8 kept from the source** ({len(kept_fp8)} tensors, {', '.join(sorted({op.role for op in kept_fp8}))}): "
                    "the weight bytes are the source's, the scales renamed for compressed-tensors.")
    deq = [op for op in plan.ops if op.kind == "dequantize"]
    if deq:
        what.append(f"- **FP8 dequantized to BF16** ({len(deq)} tensors, {', '.join(sorted({op.role for op in deq}))}).")
    if not what:
        what = ["- Nothing: every tensor is kept as in the source (`--mlp none`); this is a re-sharded copy."]
    if activations.card_line(plan.options):  # W4A4 (qstream/activations.py)
        what += ["", activations.card_line(plan.options)]
    if kept_roles:
        what += ["", f"Kept byte for byte as in the source: {', '.join(kept_roles)}."]
    sdt = src.config.get("dtype") or src.config.get("torch_dtype")
    if any(f in ("nvfp4", "mxfp4") for f in fmts) and isinstance(sdt, str) and sdt != FP4_DTYPE:
        what += ["", f"The source is {sdt}; config.json says `dtype: {FP4_DTYPE}` because compressed-tensors "
                 f"decodes FP4 weights to bfloat16 (a {sdt} model would fail at its first matmul). The kept tensors "
                 f"are still stored as {sdt} and are cast on load."]
    ratio = plan.bytes_in / plan.bytes_out if plan.bytes_out else 0
    title = "+".join(f.upper() for f in made) if made else ("FP8, copied" if fmts else "unquantized copy")
    repo = plan.serve_name or (f"<your-name>/{name}" if base else "./this-folder")
    if base:
        origin = f"Converted from [`{base}`](https://huggingface.co/{base})"
    else:
        origin = "Converted from a local checkpoint"
    if made:
        how_scales = ("with round-to-nearest scales that match compressed-tensors byte for byte."
                      if plan.options.scale_search == "none" else
                      f"with block scales chosen by `--scale-search {plan.options.scale_search}` (the lowest "
                      "squared error of the decoded block; the same format).")
        origin += (f" by [qstream]({PROJECT_URL}) {__version__} (`pip install {DIST_NAME}`), a streaming converter: "
                   "weights are requantized tensor by tensor straight from the source safetensors, " + how_scales)
    else:
        origin += f" by [qstream]({PROJECT_URL}) {__version__} (`pip install {DIST_NAME}`); nothing was quantized."
    cls = (src.config.get("architectures") or ["AutoModelForCausalLM"])[0]
    if modelopt:
        usage_tf = ["This ModelOpt layout is for vLLM and TensorRT-LLM; for transformers convert with the default "
                    "`--format compressed-tensors`."]
    elif moe and not openai:
        usage_tf = []
    else:
        usage_tf = ["transformers" + (" (its own MXFP4 integration):" if openai else
                                      " (with `pip install compressed-tensors`):" if fmts else ":"), "", "```python",
                    "import torch",
                    f"from transformers import {cls}", "",
                    f'model = {cls}.from_pretrained("{repo}", dtype=torch.bfloat16)', "```"]
    command = plan.command or f"qstream convert SRC OUT --mlp {plan.options.mlp}"
    lines = [
        "---", front, "---", "",
        f"# {name} ({title})", "",
        origin, "",
        "## What was quantized", "",
        *what, "",
        *rows, "",
        f"Total: {human(plan.bytes_in)} in, {human(plan.bytes_out)} out ({ratio:.2f}x smaller).", "",
        "## Measured weight error", "",
        *_measured_rows(plan, measured), "",
        "## Use", "",
        ("vLLM (reads the quantization from config.json; no flag needed):" if fmts else "vLLM:"), "",
        "```", f"vllm serve {repo}", "```", "",
        *usage_tf, *([""] if usage_tf else []),
        "## Requirements", "",
        *_requirements(plan, fmts, moe), "",
        "## How it was made", "",
        "```", command, "```", "",
        (MODELOPT_NOTE.replace("weight-only NVFP4 checkpoint (`quant_algo: W4A16_NVFP4`", "NVFP4 W4A4 checkpoint "
                               "(`quant_algo: NVFP4`, with `input_scale`") if modelopt and plan.options.activations
         != "none" else MODELOPT_NOTE if modelopt else openai_mxfp4.CARD_NOTE if openai else
         "The `quantization_config` in config.json is in the compressed-tensors format, which vLLM and "
         "transformers (with `compressed-tensors` installed) read directly." if fmts else
         "config.json has no `quantization_config`: this is a plain checkpoint."), "",
    ]
    if text.strip():
        lines += ["## Original model card", "", text.strip(), ""]
    return "\n".join(lines)


MODELOPT_NOTE = ("This is a ModelOpt weight-only NVFP4 checkpoint (`quant_algo: W4A16_NVFP4` in hf_quant_config.json "
                 "and config.json): vLLM loads it as `modelopt_fp4`, TensorRT-LLM through hf_quant_config.json. "
                 "The packed weights and block scales are the same bytes as the compressed-tensors output of the same "
                 "conversion; `weight_scale_2` is the float32 reciprocal of its global scale.")
