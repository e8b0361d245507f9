"""Export targets: one name -> one exporter function.

Every exporter has the same call shape, so the CLI and scripts dispatch by name::

    exporter(model, export_dir, *, tokenizer=None, overwrite=False, **options) -> Path

``model`` is a model quantized by ``lowbit.quantize`` (fake-quantized, optionally ``compress``-ed); the
exporter checks that the target can express every quantized layer before writing anything, writes
through ``lowbit.files.atomic_directory`` and returns the directory (or file) it wrote.

Adding a target is one file in ``lowbit/export/`` plus one line in ``TARGETS`` below (``"module:function"``,
imported only when used, so a target's optional dependency is not needed to import lowbit). Code outside
lowbit registers with ``register_exporter(name, function)``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

from lowbit.rotation.quarot import check_no_online_rotation

Exporter = Callable[..., Path]

TARGETS: dict[str, str] = {
    "hf": "lowbit.export.modelopt_hf:export_hf_checkpoint",
    "compressed-tensors": "lowbit.export.compressed_tensors:export_compressed_tensors",
    "gguf": "lowbit.export.gguf:export_gguf",
    "onnx": "lowbit.export.onnx_qdq:export_onnx_dir",
    "trtllm": "lowbit.export.trtllm:export_tensorrt_llm_dir",
}
_REGISTERED: dict[str, Exporter] = {}


def register_exporter(name: str, exporter: Exporter, replace: bool = False) -> None:
    """Make ``exporter`` available as ``name`` (for ``get_exporter``, ``export`` and ``--export-format``)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name={name!r}: expected a non-empty string")
    if not callable(exporter):
        raise TypeError(f"exporter for {name!r}: expected a callable, got {type(exporter).__name__}")
    if not replace and name in export_formats():
        raise ValueError(f"export format {name!r} is already registered; pass replace=True to replace it")
    _REGISTERED[name] = exporter


def unregister_exporter(name: str) -> None:
    """Remove an exporter added with ``register_exporter`` (built-in targets stay)."""
    if name not in _REGISTERED:
        raise ValueError(f"export format {name!r} was not added with register_exporter: {sorted(_REGISTERED)}")
    del _REGISTERED[name]


def export_formats() -> list[str]:
    """Every export format name, built-in and registered, sorted."""
    return sorted({*TARGETS, *_REGISTERED})


def get_exporter(name: str) -> Exporter:
    """The exporter function of ``name``; ValueError naming the allowed formats when unknown."""
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name not in TARGETS:
        raise ValueError(f"export format {name!r}: allowed are {export_formats()}")
    module_name, function_name = TARGETS[name].split(":")
    return getattr(importlib.import_module(module_name), function_name)


def export(model, export_dir: str | Path, format: str, **options) -> Path:
    """Export ``model`` to ``export_dir`` as ``format`` (see ``export_formats()``); returns the path written."""
    check_no_online_rotation(model, f"export to {format}")
    return get_exporter(format)(model, export_dir, **options)
