"""The model card (README.md) written next to a converted checkpoint."""

from __future__ import annotations

import re

from . import __version__
from .plan import Plan
from .schemes import SCHEMES


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


def _source_license(card: str | None) -> str | None:
    if not card or not card.startswith("---"):
        return None
    end = card.find("\n---", 3)
    if end < 0:
        return None
    m = re.search(r"^license:\s*(\S+)\s*$", card[3:end], re.M)
    return m.group(1) if m else None


MODELOPT_NOTE = ("This is a ModelOpt weight-only NVFP4 checkpoint (`quant_algo: W4A16_NVFP4` in hf_quant_config.json "
                 "and config.json): vLLM loads it as `modelopt_fp4`, TensorRT-LLM through hf_quant_config.json. "
                 "The packed weights and block scales are the same bytes as the compressed-tensors output of the same "
                 "conversion; `weight_scale_2` is the float32 reciprocal of its global scale.")


def model_card(plan: Plan) -> str:
    src = plan.source
    base = getattr(src, "repo_id", None) or src.config.get("_name_or_path") or src.root.name
    schemes = sorted({op.scheme for op in plan.ops if op.kind == "quantize" or op.layout == "modelopt"})
    tags = ["qstream", "modelopt" if plan.options.format == "modelopt" else "compressed-tensors", "vllm", *schemes]
    lic = _source_license(src.source_card)
    yaml = ["---", f"base_model: {base}", "base_model_relation: quantized", "library_name: transformers"]
    if lic:
        yaml.append(f"license: {lic}")
    yaml.append("tags:")
    yaml += [f"- {t}" for t in tags]
    yaml.append("---")
    rows = ["| role | tensors | quantized | scheme | size in | size out |", "|---|---:|---:|---|---:|---:|"]
    for role, s in plan.by_role().items():
        sch = sorted({op.scheme for op in plan.ops if op.role == role and (op.kind == "quantize" or op.layout == "modelopt")})
        rows.append(
            f"| {role} | {s.tensors} | {s.quantized} | {', '.join(sch) or 'unchanged'} | {human(s.bytes_in)} | {human(s.bytes_out)} |"
        )
    desc = "\n".join(f"- **{n}**: {SCHEMES[n].description}" for n in schemes)
    ratio = plan.bytes_in / plan.bytes_out if plan.bytes_out else 0
    cmd = plan.command or f"qstream convert {src.root} OUT --mlp {plan.options.mlp}"
    return "\n".join(
        yaml
        + [
            "",
            f"# {base} ({', '.join(s.upper() for s in schemes) or 'unquantized'})",
            "",
            f"Converted from `{base}` by [qstream](https://pypi.org/project/qstream/) {__version__}, "
            "a streaming converter: weights are requantized tensor by tensor straight from the "
            "source safetensors, " + ("with round-to-nearest scales that match compressed-tensors byte for byte."
                                      if plan.options.scale_search == "none" else
                                      f"with block scales chosen by `--scale-search {plan.options.scale_search}` "
                                      "(the lowest squared error of the decoded block; the same format)."),
            "",
            "## What was quantized",
            "",
            desc or "- nothing (all tensors kept)",
            "",
            "Everything else (attention, embeddings, norms, lm_head, routers, vision tower, projector) "
            "is kept byte for byte as in the source.",
            "",
            *rows,
            "",
            f"Total: {human(plan.bytes_in)} in, {human(plan.bytes_out)} out ({ratio:.2f}x smaller).",
            "",
            "## How it was made",
            "",
            "```",
            cmd,
            "```",
            "",
            "## Serve with vLLM",
            "",
            "```",
            f"vllm serve {plan.serve_name or '<this-repo-or-folder>'}",
            "```",
            "",
            "The `quantization_config` in config.json is in the compressed-tensors format, "
            "which vLLM and transformers (with `compressed-tensors` installed) read directly."
            if plan.options.format != "modelopt" else MODELOPT_NOTE,
            "",
        ]
    )
