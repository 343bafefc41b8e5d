"""Gemma 3, text-only and multimodal (SigLIP tower), under the Hub's names and under the
names transformers >= 4.52 saves: what is quantized, what passes through, and that the
output loads in transformers through compressed-tensors (vLLM: tests/test_vllm.py)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import run_qstream
from ct_reference import ct_mxfp4, ct_nvfp4
from synth import gemma3_config, gemma3_tensors, write_checkpoint
from test_convert import ignored, load_dir, raw

LAYOUTS = {"text": (False, "hub"), "mm-hub": (True, "hub"), "mm-v452": (True, "v4.52")}
IDS = torch.tensor([[2, 17, 33, 200, 5, 9, 77, 120], [2, 3, 250, 41, 8, 19, 64, 7]])


@pytest.fixture(scope="module", params=list(LAYOUTS))
def source(request, tmp_path_factory):
    mm, names = LAYOUTS[request.param]
    cfg = gemma3_config(mm)
    return request.param, write_checkpoint(tmp_path_factory.mktemp("g3") / "src", cfg, gemma3_tensors(cfg, names),
                                           n_shards=2, straddle=False)


def _load(path):
    from transformers import AutoModelForCausalLM, Gemma3ForConditionalGeneration

    mm = "vision_config" in json.loads((path / "config.json").read_text())
    cls = Gemma3ForConditionalGeneration if mm else AutoModelForCausalLM
    model, info = cls.from_pretrained(path, dtype=torch.bfloat16, output_loading_info=True)
    return model, {k: v for k, v in info.items() if v}


@pytest.mark.parametrize("scheme", ["mxfp4", "nvfp4"])
def test_gemma3_converts_and_loads(source, tmp_path, scheme):
    layout, src_dir = source
    dst = tmp_path / "out"
    run_qstream("convert", src_dir, dst, "--mlp", scheme, "--scale-search", "none", "-q", check=True)
    src, out = load_dir(src_dir), load_dir(dst)
    qc = json.loads((dst / "config.json").read_text())["quantization_config"]
    mlp = sorted(n for n in src if ".mlp." in n and "vision" not in n)
    assert len(mlp) == 6
    for n in mlp:  # the language model's MLP, exactly as compressed-tensors quantizes it
        w = src[n]  # BF16, as compressed-tensors gets it
        if scheme == "nvfp4":
            kind = n.split(".")[-2]
            partners = [] if kind == "down_proj" else [src[n.replace(kind, k)] for k in ("gate_proj", "up_proj") if k != kind]
            ref = ct_nvfp4(w, partners)
        else:
            ref = ct_mxfp4(w)
        mod = n.removesuffix(".weight")
        for k, v in ref.items():
            assert raw(out[f"{mod}.{k}"]) == raw(v), (n, k)
        assert not ignored(qc, mod), mod
    # everything else byte for byte; attention, the vision tower (its own mlp.fc1/fc2 too) and
    # the bare projector parameter are not quantized
    for n, t in src.items():
        if n not in mlp:
            assert raw(out[n]) == raw(t), n
            mod = n.rsplit(".", 1)[0]
            if n.endswith("_proj.weight") or n.endswith(("fc1.weight", "fc2.weight")):
                assert ignored(qc, mod), mod
    quantized = {k for k in out if k.rsplit(".", 1)[0] + ".weight" in mlp}
    assert set(out) - quantized == set(src) - set(mlp)
    # transformers takes it as it takes the source: no key missing or left over, logits close
    ref_model, info = _load(src_dir)
    assert not info, info
    q_model, info = _load(dst)
    assert not info, (layout, info)
    with torch.no_grad():
        a, b = ref_model(input_ids=IDS).logits.float(), q_model(input_ids=IDS).logits.float()
    assert torch.isfinite(b).all()
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item() > 0.95
