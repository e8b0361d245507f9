"""Export a quantized model to what serving engines and runtimes load, and load lowbit's exports back.

- ``export(model, export_dir, format, tokenizer=..., overwrite=...)``: dispatch by name (``export_formats()``);
  ``register_exporter(name, function)`` adds a target from outside lowbit (see ``registry``).
- ``export_hf_checkpoint``: ModelOpt's unified Hugging Face checkpoint (``modelopt_hf``).
- ``export_compressed_tensors``: llm-compressor's compressed-tensors checkpoint (``compressed_tensors``).
- ``export_gguf`` (llama.cpp; ``snap_k_quant_scales`` puts INT4-g32 / INT6-g16 scales on Q4_K / Q6_K's grid),
  ``export_onnx`` (Q/DQ), ``export_tensorrt_llm_checkpoint`` (legacy, per rank).
- ``load_quantized(export_dir)``: a runnable compressed lowbit model from the first two (``load``).
"""

from lowbit.export.compressed_tensors import export_compressed_tensors
from lowbit.export.gguf import export_gguf
from lowbit.export.k_quants import snap_k_quant_scales
from lowbit.export.load import load_quantized
from lowbit.export.modelopt_hf import export_hf_checkpoint
from lowbit.export.onnx_qdq import export_onnx
from lowbit.export.registry import export, export_formats, get_exporter, register_exporter, unregister_exporter
from lowbit.export.trtllm import export_tensorrt_llm_checkpoint

__all__ = [
    "export", "export_compressed_tensors", "export_formats", "export_gguf", "export_hf_checkpoint", "export_onnx",
    "export_tensorrt_llm_checkpoint", "get_exporter", "load_quantized", "register_exporter", "snap_k_quant_scales",
    "unregister_exporter",
]
