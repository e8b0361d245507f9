"""Export a quantized model to what serving engines and runtimes load.

- ``export(model, export_dir, format, tokenizer=..., overwrite=...)``: dispatch by name (``export_formats()``);
  ``register_exporter(name, function)`` adds a target from outside lowbit (see ``registry``).
- ``export_gguf`` (llama.cpp), ``export_onnx`` (Q/DQ), ``export_tensorrt_llm_checkpoint`` (legacy, per rank).
"""

from lowbit.export.gguf import export_gguf
from lowbit.export.onnx_qdq import export_onnx
from lowbit.export.registry import export, export_formats, get_exporter, register_exporter, unregister_exporter
from lowbit.export.trtllm import export_tensorrt_llm_checkpoint

__all__ = ["export", "export_formats", "export_gguf", "export_onnx", "export_tensorrt_llm_checkpoint", "get_exporter",
           "register_exporter", "unregister_exporter"]
