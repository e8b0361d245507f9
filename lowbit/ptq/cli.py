"""``lowbit ptq``: ModelOpt's hf_ptq workflow on a local Hugging Face model, in one command.

    lowbit ptq --model PATH --qformat int4_awq [--kv-cache-qformat fp8] --export-path DIR [--export-format hf]
               [--calib-data builtin|FILE.txt|FILE.jsonl] [--calib-size 512] [--batch-size 8] [--seq-len 512]
               [--device cpu|cuda] [--tasks quant,ppl] [--dry-run] [--low-memory-mode]
               [--auto-quantize-bits 4.8 --quant nvfp4,fp8] [--trust-remote-code]

Every argument is checked before the model is loaded (``lowbit.ptq.settings``); a bad one exits with status 2,
a message naming it, and nothing written. The run itself: ``lowbit.ptq.run``.
"""

from __future__ import annotations

import argparse

from lowbit.export import export_formats
from lowbit.progress import progress_bars
from lowbit.ptq.memory import frozen_heap
from lowbit.ptq.qformats import KV_QFORMATS, LOWBIT_EXPORT, QFORMATS
from lowbit.ptq.run import run_ptq
from lowbit.ptq.settings import BUILTIN, DEVICES, DTYPES, TASKS, settings_from_args

DEFAULT_CALIB_SIZE = 512
DEFAULT_SEQ_LEN = 512
DEFAULT_BATCH_SIZE = 8
DEFAULT_EVAL_TOKENS = 8192


def _bits(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of bits per weight, got {text!r}") from None


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or a positive integer, got {text}")
    return value


def add_ptq_parser(commands, positive_int) -> None:
    parser = commands.add_parser(
        "ptq", help="calibrate, quantize, score and export a local Hugging Face model (ModelOpt's hf_ptq)",
        description="Load a local Hugging Face causal LM, calibrate and quantize it in a --qformat (optionally "
                    "with a quantized KV cache), score it against the float model (mean per-token KL, "
                    "perplexity), export it, load the export back, and write a JSON report beside it.")
    parser.add_argument("--model", required=True, help="a local Hugging Face model directory, or 'default'")
    parser.add_argument("--qformat", required=True, metavar="QFORMAT",
                        help=f"one of {', '.join(QFORMATS)}")
    parser.add_argument("--kv-cache-qformat", default="none", metavar="KV",
                        help=f"KV-cache format: {', '.join(KV_QFORMATS)} (default: none)")
    parser.add_argument("--calib-data", default=BUILTIN,
                        help="'builtin' (the bundled text), a .txt file (cut in windows) or a .jsonl file (one "
                             "sample per record, padded on the left) (default: builtin)")
    parser.add_argument("--calib-size", type=positive_int, default=DEFAULT_CALIB_SIZE,
                        help=f"calibration samples (default: {DEFAULT_CALIB_SIZE})")
    parser.add_argument("--batch-size", type=positive_int, default=DEFAULT_BATCH_SIZE,
                        help=f"calibration samples per forward (default: {DEFAULT_BATCH_SIZE})")
    parser.add_argument("--seq-len", type=positive_int, default=DEFAULT_SEQ_LEN,
                        help=f"tokens per calibration sample and evaluation window (default: {DEFAULT_SEQ_LEN})")
    parser.add_argument("--export-path", help="directory to write the export to (required with --tasks quant)")
    parser.add_argument("--export-format", metavar="FORMAT",
                        help=f"one of {', '.join([*export_formats(), LOWBIT_EXPORT])} (default: hf where it holds "
                             f"the qformat, else {LOWBIT_EXPORT}: lowbit's packed checkpoint)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --export-path")
    parser.add_argument("--auto-quantize-bits", type=_bits, metavar="B",
                        help="search a format per layer under B effective bits per weight (with --quant)")
    parser.add_argument("--quant", metavar="A,B", help="the qformats --auto-quantize-bits chooses from")
    parser.add_argument("--device", default="cpu", metavar="DEVICE", help=f"{' or '.join(DEVICES)} (default: cpu)")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                        help="float dtype the model is loaded in (auto: float32 on cpu, the checkpoint's on cuda)")
    parser.add_argument("--low-memory-mode", action="store_true",
                        help="one decoder block on the device at a time (the layer-wise runner)")
    parser.add_argument("--tasks", default="quant,ppl",
                        help=f"comma-separated, of {', '.join(TASKS)}: quant = quantize and export, ppl = KL to "
                             "the float model and perplexity on held-out text (default: quant,ppl)")
    parser.add_argument("--eval-tokens", type=_non_negative_int, default=DEFAULT_EVAL_TOKENS,
                        help=f"held-out tokens scored by ppl (default: {DEFAULT_EVAL_TOKENS})")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="let transformers run the model directory's own code")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the plan (rules, float layers and why, bytes, memory and time estimates) "
                             "and stop before any weight is read")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    parser.set_defaults(handler=lambda args, argv: _run(args, argv))


def _run(args: argparse.Namespace, argv: list[str]) -> int:
    settings = settings_from_args(args)
    with frozen_heap(), progress_bars(settings.progress):
        run_ptq(settings, argv)
    return 0
