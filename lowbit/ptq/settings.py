"""``lowbit ptq``'s arguments, validated once at the door into a ``PtqSettings`` (nothing is loaded or written
before every check has passed), and the model's skeleton on the ``meta`` device for plans and budgets."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lowbit.assets import default_model_path
from lowbit.files import check_writable
from lowbit.hf import DEFAULT_SOURCE
from lowbit.ptq.qformats import KV_QFORMATS, LOWBIT_EXPORT, QFORMATS, check_choice, check_export, default_export
from lowbit.ptq.runners import check_auto_quantize, check_budget, check_layerwise_qformat, check_layerwise_runner

TASKS = ("quant", "ppl")
DEVICES = ("cpu", "cuda")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
BUILTIN = "builtin"
CALIB_SUFFIXES = (".txt", ".jsonl")


@dataclass(frozen=True)
class PtqSettings:
    """One run of ``lowbit ptq`` (see ``lowbit.ptq.cli`` for each option's meaning)."""

    model: str
    qformat: str
    kv_qformat: str
    calib_data: str
    calib_size: int
    batch_size: int
    seq_len: int
    export_path: Path | None
    export_format: str
    device: str
    dtype: str  # "auto" resolved by ``torch_dtype``
    tasks: tuple[str, ...]
    eval_tokens: int
    auto_quantize_bits: float | None
    quant: tuple[str, ...]
    low_memory_mode: bool
    trust_remote_code: bool
    dry_run: bool
    overwrite: bool
    progress: bool

    @property
    def model_directory(self) -> Path:
        return default_model_path() if self.model == DEFAULT_SOURCE else Path(self.model)

    @property
    def evaluates(self) -> bool:
        return "ppl" in self.tasks

    @property
    def exports(self) -> bool:
        return "quant" in self.tasks and not self.dry_run

    def torch_dtype(self, checkpoint_dtype: torch.dtype | None) -> torch.dtype:
        """``--dtype``; ``auto``: float32 on the CPU (its fast matmul dtype), the checkpoint's dtype on CUDA."""
        if self.dtype != "auto":
            return DTYPES[self.dtype]
        if self.device == "cpu" or checkpoint_dtype is None:
            return torch.float32
        return checkpoint_dtype


def _tasks(text: str) -> tuple[str, ...]:
    tasks = tuple(t.strip() for t in text.split(",") if t.strip())
    for task in tasks or ("",):
        check_choice("--tasks", task, TASKS)
    return tasks


def _quant_list(text: str | None) -> tuple[str, ...]:
    names = tuple(n.strip() for n in (text or "").split(",") if n.strip())
    for name in names:
        check_choice("--quant", name, QFORMATS)
    return names


def _check_model(model: str) -> None:
    if model != DEFAULT_SOURCE and not (Path(model) / "config.json").is_file():
        raise FileNotFoundError(f"--model {model!r}: no such Hugging Face model directory (no config.json); pass a "
                                f"local directory or {DEFAULT_SOURCE!r} for the bundled model (lowbit never downloads)")


def _check_calib_data(calib_data: str) -> None:
    if calib_data == BUILTIN:
        return
    if not calib_data.endswith(CALIB_SUFFIXES):
        raise ValueError(f"--calib-data {calib_data!r}: allowed are {BUILTIN!r} or a .txt / .jsonl file")
    if not Path(calib_data).is_file():
        raise FileNotFoundError(f"--calib-data {calib_data!r}: no such file")


def _check_device(device: str) -> None:
    check_choice("--device", device, DEVICES)
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch sees no CUDA device here; pass --device cpu")


def settings_from_args(args: argparse.Namespace) -> PtqSettings:
    """Every check that needs no weights: names, files, devices, exports, the output path, the runners."""
    check_choice("--qformat", args.qformat, QFORMATS)
    check_choice("--kv-cache-qformat", args.kv_cache_qformat, KV_QFORMATS)
    _check_model(args.model)
    _check_calib_data(args.calib_data)
    _check_device(args.device)
    tasks = _tasks(args.tasks)
    export_format = args.export_format or (LOWBIT_EXPORT if args.low_memory_mode else default_export(args.qformat))
    if args.low_memory_mode and export_format != LOWBIT_EXPORT:
        raise ValueError(f"--low-memory-mode writes lowbit's packed checkpoint block by block; --export-format "
                         f"{export_format!r} is not allowed with it (allowed: {LOWBIT_EXPORT})")
    check_export(args.qformat, args.kv_cache_qformat, export_format)
    quant = _quant_list(args.quant)
    if (args.auto_quantize_bits is None) != (not quant):
        raise ValueError("--auto-quantize-bits B and --quant a,b go together: the budget in bits per weight and "
                         "the formats to choose from")
    if args.low_memory_mode:
        check_layerwise_qformat(args.qformat, args.auto_quantize_bits)
    if args.auto_quantize_bits is not None and args.kv_cache_qformat != "none":
        raise ValueError("--auto-quantize-bits with --kv-cache-qformat: lowbit does not yet add a KV cache to an "
                         "auto_quantize search; pass --kv-cache-qformat none")
    export_path = None if args.export_path is None else Path(args.export_path)
    if "quant" in tasks and not args.dry_run:
        if export_path is None:
            raise ValueError("--export-path DIR is required with --tasks quant (or pass --dry-run)")
        check_writable(export_path, args.overwrite)
    settings = PtqSettings(
        args.model, args.qformat, args.kv_cache_qformat, args.calib_data, args.calib_size, args.batch_size,
        args.seq_len, export_path, export_format, args.device, args.dtype, tasks, args.eval_tokens,
        args.auto_quantize_bits, quant, args.low_memory_mode, args.trust_remote_code, args.dry_run, args.overwrite,
        not args.no_progress)
    if settings.low_memory_mode and not settings.dry_run:
        check_layerwise_runner()
    if settings.auto_quantize_bits is not None:
        check_budget(meta_model(settings), settings.auto_quantize_bits, settings.quant)
        if not settings.dry_run:
            check_auto_quantize()
    return settings


def meta_model(settings: PtqSettings) -> nn.Module:
    """The model built from its ``config.json`` on the ``meta`` device, in the dtype the run loads: shapes and
    module names only; no weight file is opened."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(settings.model_directory, local_files_only=True,
                                        trust_remote_code=settings.trust_remote_code)
    dtype = settings.torch_dtype(getattr(config, "dtype", None) if isinstance(getattr(config, "dtype", None),
                                                                             torch.dtype) else None)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=settings.trust_remote_code)
