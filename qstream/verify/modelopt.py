"""`qstream verify` of a ModelOpt output (``--format modelopt``): config.json and
hf_quant_config.json agree, modules are resolved against ``exclude_modules`` as vLLM and
TensorRT-LLM match it, and each quantized module holds ModelOpt's NVFP4 tensors.
Methods of :class:`qstream.verify.verify.Verifier` (a mixin)."""

from __future__ import annotations

import fnmatch

from ..layouts.modelopt import GROUP_SIZE as MO_GROUP_SIZE, HF_QUANT_CONFIG, READ_ALGOS as MO_ALGOS
from .rules import CT_ONLY_SUFFIXES, Group, Module, read_json_member


class ModeloptChecks:
    """The ModelOpt rules of :class:`qstream.verify.verify.Verifier`."""

    def _modelopt_config(self, qc: dict | None) -> tuple[str, list[str]] | None:
        """(quant_algo, exclude_modules) of a ModelOpt checkpoint, after checking that config.json's
        quantization_config and hf_quant_config.json agree; None when there is nothing to resolve
        modules against (already reported)."""
        hf: dict | None = None
        path = self.dst / HF_QUANT_CONFIG
        if not path.exists():
            self.error(HF_QUANT_CONFIG, "missing, but config.json says ModelOpt; TensorRT-LLM reads quant_algo and "
                                        "exclude_modules from it")
        else:
            try:
                _, hf = read_json_member(path, "quantization")
            except (OSError, ValueError, UnicodeDecodeError) as e:
                self.error(HF_QUANT_CONFIG, f"cannot be read ({e})")
                hf = None
        if qc is None and self.config_ok:
            self.error("config.json", f"has no quantization_config, but {HF_QUANT_CONFIG} describes a ModelOpt "
                                      "checkpoint; transformers and vLLM read config.json's (qstream writes both)")

        def excludes(where: str, key: str, value) -> list[str] | None:
            if value is None:
                return []
            if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
                self.error(where, f"{key} is not a list of module names / wildcards")
                return None
            return value

        def group_sizes(where: str, values) -> None:
            for key, v in values:
                if v is not None and v != MO_GROUP_SIZE:
                    self.error(where, f"{key} is {v!r}; NVFP4 blocks are {MO_GROUP_SIZE} weights")

        algo_cfg = algo_hf = excl_cfg = excl_hf = None
        if isinstance(qc, dict):
            algo_cfg = str(qc.get("quant_algo") or "").upper()
            excl_cfg = excludes("config.json", "quantization_config.ignore", qc.get("ignore"))
            groups = qc.get("config_groups") if isinstance(qc.get("config_groups"), dict) else {}
            group_sizes("config.json", [("quantization_config.group_size", qc.get("group_size"))] + [
                (f"quantization_config.config_groups.{k}.weights.group_size", (g.get("weights") or {}).get("group_size"))
                for k, g in groups.items() if isinstance(g, dict) and isinstance(g.get("weights"), dict)])
        if hf is not None:
            algo_hf = str(hf.get("quant_algo") or "").upper()
            excl_hf = excludes(HF_QUANT_CONFIG, "quantization.exclude_modules", hf.get("exclude_modules"))
            group_sizes(HF_QUANT_CONFIG, [("quantization.group_size", hf.get("group_size"))])
        if algo_cfg is not None and algo_hf is not None and algo_cfg != algo_hf:
            self.error(HF_QUANT_CONFIG, f"quantization.quant_algo is {algo_hf or None!r} but config.json's "
                                        f"quantization_config.quant_algo is {algo_cfg or None!r}; runtimes read one "
                                        "or the other")
        if excl_cfg is not None and excl_hf is not None and set(excl_cfg) != set(excl_hf):
            only_hf = sorted(set(excl_hf) - set(excl_cfg))
            only_cfg = sorted(set(excl_cfg) - set(excl_hf))
            self.error(HF_QUANT_CONFIG, f"quantization.exclude_modules differs from config.json's "
                                        f"quantization_config.ignore (only here: {only_hf}; only in config.json: "
                                        f"{only_cfg}); TensorRT-LLM reads this one, vLLM config.json's")
        algo = algo_cfg if algo_cfg is not None else algo_hf
        excl = excl_cfg if qc is not None else excl_hf  # what vLLM / transformers resolve against
        if algo is None or excl is None:
            return None
        if algo not in MO_ALGOS:
            where = "config.json" if algo_cfg is not None else HF_QUANT_CONFIG
            self.error(where, f"ModelOpt quant_algo {algo or None!r}; verify checks ModelOpt NVFP4 "
                              f"({', '.join(MO_ALGOS)})")
            return None
        return algo, excl

    def _resolve_modelopt(self, qc: dict | None) -> None:
        """Modules against ModelOpt's ``exclude_modules``, matched the way the runtimes do it
        (modelopt.check_excludes): each module under its own name and the names vLLM /
        TensorRT-LLM give its layer (``qkv_proj``, ``gate_up_proj``, the ``experts`` of a MoE).
        TensorRT-LLM: ``fnmatchcase``. vLLM: exact, substring and ``fnmatch`` over the entries,
        ``x*`` also read as ``x`` and ``x.*`` (its ``apply_vllm_mapper``). A quantized module must
        be excluded by neither; an unquantized Linear must be excluded by both."""
        from ..layouts.modelopt import _runtime_names

        cfg = self._modelopt_config(qc)
        if not self.config_ok or cfg is None:
            return
        algo, excl = cfg
        group = Group("modelopt", algo, "nvfp4", {"group_size": MO_GROUP_SIZE}, None, layout="modelopt")
        for m in self.modules.values():
            w = m.parts.get("weight")
            quant = [m.parts[s] for s in ("weight_scale_2", "weight_scale") + CT_ONLY_SUFFIXES if s in m.parts]
            if w is not None and w.dtype == "U8":
                quant.append(w)
            linear = m.ndim == 2 and m.role not in ("embedding", "norm")
            names = _runtime_names(m.name) if linear else [m.name]
            vllm = [(e, n) for n in names for e in excl if _vllm_excludes(e, n)]
            trt = [(e, n) for n in names for e in excl if fnmatch.fnmatchcase(n, e)]
            if quant:
                t = quant[0]
                if not linear:
                    self.error(t.path.name, f"{t.name} exists but {m.name} is not a Linear ({m.role}); ModelOpt "
                                            "loaders never quantize it")
                elif vllm or trt:
                    e, n = (vllm or trt)[0]
                    who = "vLLM and TensorRT-LLM" if vllm and trt else ("vLLM" if vllm else "TensorRT-LLM")
                    layer = "" if n == m.name else f" (as layer {n})"
                    self.error(t.path.name, f"{t.name} exists but exclude_modules entry {e!r} excludes "
                                            f"{m.name}{layer} in {who}, which would load it unquantized")
                else:
                    m.group = group
                    self.report.modules[algo] = self.report.modules.get(algo, 0) + 1
                    self._check_modelopt_quantized(m)
                continue
            if linear and w is not None and not trt:
                who = "vLLM or TensorRT-LLM" if not vllm else "TensorRT-LLM (fnmatch)"
                self.error(w.path.name, f"{w.name} is {w.dtype}, unquantized, but no exclude_modules entry excludes "
                                        f"{m.name} in {who}, which would load it as {algo} (expecting U8 "
                                        f"{m.name}.weight, weight_scale and weight_scale_2)")
                continue
            self._check_unquantized(m)

    def _check_modelopt_quantized(self, m: Module) -> None:
        g = m.group
        ct = [m.parts[s] for s in CT_ONLY_SUFFIXES if s in m.parts]
        if ct and "weight" not in m.parts:
            self.error(ct[0].path.name, f"{m.name} holds compressed-tensors tensors ({', '.join(t.name for t in ct)}) "
                                        f"in a ModelOpt {g.format} checkpoint, which stores {m.name}.weight (U8), "
                                        f"weight_scale and weight_scale_2")
            return
        weight, rows, cols = self._expect_packed(m, "weight", MO_GROUP_SIZE)
        scale = self._expect(m, "weight_scale", ("F8_E4M3",), (rows, cols // MO_GROUP_SIZE) if weight else None)
        ok = weight is not None and scale is not None
        expected = {"weight", "weight_scale", "weight_scale_2"} | ({"input_scale"} if g.format == "NVFP4" else set())
        for suffix in sorted(expected - {"weight", "weight_scale"}):
            t = self._expect(m, suffix, ("F32",), None)
            if t is not None and tuple(t.shape) not in ((), (1,)):
                self.error(t.path.name, f"{t.name} has shape {list(t.shape)}, expected a scalar ([] or [1])")
                t = None
            ok &= t is not None
        for suffix, t in m.parts.items():
            if suffix not in expected:
                if suffix in CT_ONLY_SUFFIXES:
                    what = f"a compressed-tensors tensor in a ModelOpt {g.format} checkpoint"
                elif suffix == "input_scale":
                    what = f"unexpected: {g.format} is weight-only"
                else:
                    what = "unexpected"
                self.error(t.path.name, f"{t.name} is {what} ({m.name} resolves to {g.desc})")
                ok = False
        m.ok = ok

    # ---------------------------------------------------------------- values


def _vllm_excludes(entry: str, layer: str) -> bool:
    """vLLM ModelOptQuantConfigBase.is_layer_excluded for one entry: exact, substring, fnmatch;
    with apply_vllm_mapper an entry ``x*`` (not ``x.*``) also reads as ``x`` and ``x.*``."""
    if entry == layer or entry in layer or fnmatch.fnmatchcase(layer, entry):
        return True
    if len(entry) >= 2 and entry.endswith("*") and entry[-2] != ".":
        return entry[:-1] in layer or fnmatch.fnmatchcase(layer, entry[:-1] + ".*")
    return False
