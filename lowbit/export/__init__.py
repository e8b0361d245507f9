"""Export a quantized model to what serving engines and runtimes load.

- ``export(model, export_dir, format, tokenizer=..., overwrite=...)``: dispatch by name (``export_formats()``);
  ``register_exporter(name, function)`` adds a target from outside lowbit (see ``registry``).
"""

from lowbit.export.registry import export, export_formats, get_exporter, register_exporter, unregister_exporter

__all__ = ["export", "export_formats", "get_exporter", "register_exporter", "unregister_exporter"]
