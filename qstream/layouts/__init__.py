"""Output layouts: how a checkpoint format names and describes quantized tensors.
compressed-tensors (:mod:`.compressed_tensors`: the ``quantization_config`` groups) and
NVIDIA ModelOpt (:mod:`.modelopt`: renames, ``hf_quant_config.json``, the exclude list)."""
