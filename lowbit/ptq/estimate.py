"""Peak memory and calibration time of a ``lowbit ptq`` run, estimated from the plan and the model's shapes.

Terms (bytes; ``e`` = element size of the load dtype, ``B`` batch, ``S`` seq_len, ``N`` calibration samples,
``H`` hidden size, ``I`` the widest linear input (intermediate size), ``V`` vocabulary, ``L`` decoder layers,
``D`` k/v width per layer):

- ``W``: the model's parameters and buffers in the load dtype; ``F``: the checkpoint's safetensors files;
  ``Wq``: the weights the plan quantizes; ``E``: the export's tensors (quantized weights packed, the rest as
  loaded);
- ``forward(b, cache)``: one forward of ``b`` sequences, per token the logits ``V 4`` and the live activations
  of a decoder block ``(5 I + 8 H) e`` (MLP gate, up, activation, product, output; attention q, k, v, scores,
  output; residual, norm), plus with the KV cache HF keeps by default ``2 L D e``; ``log_probs(b)``: ``b S V 4``;
- ``tokenize(c)``: tokenizing ``c`` characters in one call peaks at ``TOKENIZE_BYTES_PER_CHAR c`` and keeps
  ``TOKENIZER_KEPT_PER_CHAR c`` (the tokenizer's word cache), counted once for the longest text;
- ``captured``: a layer-wise algorithm (all but max and smoothquant) keeps the first block's inputs for every
  sample, the block's outputs and the float reference outputs, ``3 N S H e``; GPTQ adds float32 Hessians
  ``7 I^2 4``, AWQ float32 input samples ``4 min(4096, N S) I 4``.

The run keeps freed memory from piling up: glibc's mmap threshold is fixed so that freed tensors of 1 MiB or
more go back to the OS, and free heap pages are released between phases (``lowbit.ptq.memory``); within a
phase smaller freed blocks (the tokenizer's) stay in the heap, so a phase's transients add up. The host
estimate is then a walk over the run's steps, each adding what it keeps (``kept``) and peaking at kept + its transient:

====================  ======================================  ==============================================
step                  kept                                    transient
====================  ======================================  ==============================================
load                  ``W``                                   ``F`` (the checkpoint, mapped while copied)
calibration text      ``tokenize`` kept                       ``tokenize(c)``
reference (ppl)       ``W``                                   -
quantize              ``FIRST_FORWARD_KEPT`` (if a forward)   ``Wq`` + ``forward(B, cache)`` + ``captured``
                                                              (``Wq``: weights fake-quantized once for a pass)
evaluate (ppl)        the held-out text's extra cache          ``tokenize(c) + forward(8) + log_probs(8)``
export                less the reference                      ``2 E`` (tensors and safetensors' copy)
reload                -                                       ``W + E`` (built in float, then packed)
====================  ======================================  ==============================================

The constants were measured on this project's CI-class machine (2 CPU cores, torch 2.13 CPU, transformers
5.25, glibc 2.36) with the bundled model and tokenizer: ``TOKENIZE_BYTES_PER_CHAR`` 165 (33 MB peak for the
200 KB calibration text), ``TOKENIZER_KEPT_PER_CHAR`` 125 (25 MB still resident after it; the 250 KB
held-out text then adds 6 MB), ``FIRST_FORWARD_KEPT`` 8 MB (resident growth after the first forward: BLAS and
OpenMP buffers). On CUDA the model, activations and the reference sit on the GPU (the GPU estimate is the
largest step without the tokenizer's terms) and the host holds ``W + F`` while loading.

Calibration time, a lower bound (``calibration_lower_bound_seconds``): forward FLOPs ``2 x (linear weights) x
tokens`` times the passes the algorithm makes (max: 1 when activations are calibrated, else 0; smoothquant 1;
awq_lite 2 + its 11 alphas; gptq 3), over the device's matmul rate measured on a ``PROBE_SIZE`` square float32
product (a few ms). Fake quantization, the algorithms' searches, Python and data movement are not counted: on the
bundled model on the loaded 2-core CI machine an fp8 run took 13.2 s against 1.6 s (8x,
bench/results/ptq_memory_2026-12-07.md), so the figure says how long the run cannot be shorter than, not how long
it will take.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from torch import nn

from lowbit.data import default_calibration_text, default_eval_text
from lowbit.ptq.plan import Plan

TOKENIZE_BYTES_PER_CHAR = 165
TOKENIZER_KEPT_PER_CHAR = 125
FIRST_FORWARD_KEPT = 8_000_000
PROBE_SIZE = 512
EVAL_WINDOWS = 8  # lowbit.eval.perplexity.WINDOWS_PER_FORWARD
AWQ_MAX_TOKENS = 4096
AWQ_ALPHAS = 11
PASSES = {"max": 1, "smoothquant": 1, "awq_lite": 2 + AWQ_ALPHAS, "awq_full": 2 + 2 * AWQ_ALPHAS, "awq_clip": 3,
          "gptq": 3, "scale_estimation": 3}


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _shapes(model: nn.Module) -> dict[str, int]:
    """Hidden size, widest linear input, vocabulary, layers and k/v width from the config and the linears."""
    config = getattr(model, "config", None)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    widest = max((m.in_features for m in linears), default=1)
    hidden = getattr(config, "hidden_size", None) or widest
    heads = getattr(config, "num_attention_heads", None) or 1
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return {"hidden": hidden, "widest": widest, "layers": getattr(config, "num_hidden_layers", None) or 1,
            "vocab": getattr(config, "vocab_size", None) or max((m.out_features for m in linears), default=1),
            "kv_width": kv_heads * head_dim}


def matmul_flops_per_second(device: str) -> float:
    """Measured float32 matmul rate of ``device`` (4 products of PROBE_SIZE^2 matrices, best of 3)."""
    a = torch.randn(PROBE_SIZE, PROBE_SIZE, device=device)
    best = math.inf
    for _ in range(3):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(4):
            a @ a
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 4 * 2 * PROBE_SIZE ** 3 / best


def calibration_characters(calib_data: str) -> int:
    """Characters tokenized in one call for calibration: the whole text, or a .jsonl file's longest record."""
    if calib_data == "builtin":
        return len(default_calibration_text())
    text = Path(calib_data).read_text(encoding="utf-8")
    return max((len(line) for line in text.splitlines()), default=0) if calib_data.endswith(".jsonl") else len(text)


def checkpoint_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in Path(directory).glob("*.safetensors"))


def host_steps(w: int, f: int, wq: int, e: int, forward_calibration: int, evaluation: int, captured: int,
               characters: tuple[int, int], settings, calibrated: bool) -> dict[str, int]:
    """{step: peak bytes above the start} of the host walk in the module docstring's table."""
    calibration_chars, eval_chars = characters
    kept, peaks = 0, {}

    def step(name: str, adds: int, transient: int) -> None:
        nonlocal kept
        peaks[name] = max(peaks.get(name, 0), kept + max(adds, 0) + transient)
        kept += adds

    step("load", w, f)
    tokenizer_transient = TOKENIZE_BYTES_PER_CHAR - TOKENIZER_KEPT_PER_CHAR  # on top of what it keeps
    step("load", TOKENIZER_KEPT_PER_CHAR * calibration_chars, tokenizer_transient * calibration_chars)
    step("load", w if settings.evaluates else 0, 0)
    step("quantize", FIRST_FORWARD_KEPT if calibrated else 0, wq + forward_calibration + captured
         if calibrated else 0)
    if settings.evaluates:  # the tokenizer's freed blocks stay in the heap while the windows are scored
        extra = TOKENIZER_KEPT_PER_CHAR * max(0, eval_chars - calibration_chars)
        step("evaluate", extra, TOKENIZE_BYTES_PER_CHAR * eval_chars - extra + evaluation)
    if settings.exports:
        kept -= w if settings.evaluates else 0
        step("export", 0, 2 * e)
        step("reload", 0, w + e)
    return peaks


def estimate(plan: Plan, model: nn.Module, settings) -> dict:
    """{<step>_phase_bytes, host_peak_bytes, gpu_peak_bytes, calibration_lower_bound_seconds} (module
    docstring)."""
    element = next(model.parameters()).element_size()
    w = _bytes(model.parameters()) + _bytes(model.buffers())
    wq = sum(p.bytes_before for p in plan.quantized)
    e = w - wq + sum(p.bytes_after for p in plan.quantized)
    shape = _shapes(model)
    s, n = settings.seq_len, settings.calib_size

    def forward(sequences: int, cache: bool) -> int:
        per_token = shape["vocab"] * 4 + (5 * shape["widest"] + 8 * shape["hidden"]) * element
        return sequences * s * (per_token + (2 * shape["layers"] * shape["kv_width"] * element if cache else 0))

    method = plan.algorithm or "max"
    captured = 0 if method in ("max", "smoothquant") else 3 * n * s * shape["hidden"] * element
    if method == "gptq":
        captured += 7 * shape["widest"] ** 2 * 4
    elif method.startswith("awq"):
        captured += 4 * min(AWQ_MAX_TOKENS, n * s) * shape["widest"] * 4
    calibrated = bool(plan.activations) or method != "max"
    evaluation = forward(EVAL_WINDOWS, False) + EVAL_WINDOWS * s * shape["vocab"] * 4
    f = checkpoint_bytes(settings.model_directory)
    characters = (calibration_characters(settings.calib_data), len(default_eval_text()))
    phases = host_steps(w, f, wq, e, forward(settings.batch_size, True), evaluation, captured, characters,
                        settings, calibrated)
    passes = PASSES.get(method, 3) if calibrated else 0
    linear_numel = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear))
    on_gpu = settings.device == "cuda"
    gpu = (2 if settings.evaluates else 1) * w + max(wq + forward(settings.batch_size, True) + captured, evaluation)
    return {
        **{f"{name}_phase_bytes": value for name, value in phases.items()},
        "host_peak_bytes": w + f if on_gpu else max(phases.values()),
        "gpu_peak_bytes": gpu if on_gpu else None,
        "calibration_lower_bound_seconds": passes * 2 * linear_numel * n * s / matmul_flops_per_second(settings.device),
    }
