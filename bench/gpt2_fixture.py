"""INT4 on the GPT-2 fixture (Conv1D layers, tied embedding and lm_head): lowbit's algorithms and
compress_weights side by side with nncf.compress_weights, ranked by mean per-token KL to the float model.

Protocol: ``lowbit.assets.load_gpt2_model()`` in float32 on CPU; the first ``--max-tokens`` tokens of the
bundled held-out text cut into non-overlapping windows of 256; for each variant (a fresh copy) the
perplexity of those windows and the mean over every scored token of ``KL(p_float || p_quantized)`` of the
next-token distributions (float64 sums). Calibration: ``--calibration-samples`` windows of 256 tokens of
the bundled calibration text (seed 0), batch 1 for compress_weights (as NNCF takes them) and batches of 8
for ``quantize()``. Variants:

- quantize(): RTN (INT4 g128 static blocks, max calibration), AWQ (INT4_AWQ_CFG), GPTQ, GPTQ + scale
  estimation (INT4 g128 static blocks); lm_head (tied to the embedding) float, as the presets keep it;
- compress_weights g128 ratio 1.0, lowbit and NNCF with the same arguments, each case side by side:
  INT4_SYM data-free, INT4_ASYM data-free, INT4_ASYM with AWQ (the calibration windows as dataset).
  ``--skip-quantize`` leaves out the quantize() rows (the results file is then ``gpt2_fixture_compress_*``).

``--grid-study`` adds where the INT4_SYM difference comes from, on the same windows: every Conv1D
rounded in float (groups of 128 along the input dim of its ``(out, in)`` view; embeddings INT8 asymmetric
per row as both libraries store them) with lowbit's ModelOpt-style grid (``amax = m * max|w|``, step ``amax / 7``, codes
-8..7) for ``m`` chosen per group by least squared weight error over ``m`` in ``[floor, 1]`` (steps of
1/32), and with NNCF's signed scale (step ``max|w| / 8``, the group's largest magnitude mapped to code -8
whatever its sign: a negative scale; compress_weights' INT4_SYM has used it since, through
``lowbit.formats.quantize_int_signed_scale``), plain and with its step shrunk per group by ``m`` in ``[0.5, 1]``
chosen by the least squared or the least largest absolute weight error (compress_weights' INT4_SYM takes the
latter).

Usage: python bench/gpt2_fixture.py [--max-tokens 16384] [--grid-study] [--model default] [--out bench/results]
(needs nncf for its rows; ``--model default`` runs the same rows on the bundled Llama, for comparison)
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit.assets import load_default_model, load_gpt2_model
from lowbit.data import calibration_batches, default_calibration_text, default_eval_text, token_stream
from lowbit.eval.table import format_table
from lowbit.presets import get_preset
from lowbit.report import run_context

SEQ_LEN = 256


def windows(tokenizer, max_tokens: int) -> list[torch.Tensor]:
    ids = token_stream(tokenizer, default_eval_text())[:max_tokens]
    return [ids[i : i + SEQ_LEN][None] for i in range(0, len(ids) - SEQ_LEN + 1, SEQ_LEN)]


@torch.no_grad()
def log_probs(model: nn.Module, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    return [F.log_softmax(model(input_ids=x).logits[0, :-1].double(), dim=-1) for x in inputs]


@torch.no_grad()
def score(model: nn.Module, inputs: list[torch.Tensor], reference: list[torch.Tensor]) -> tuple[float, float]:
    """(perplexity of the windows, mean per-token KL(p_reference || p_model)), both float64."""
    nll, kl, count = 0.0, 0.0, 0
    for x, ref, lp in zip(inputs, reference, log_probs(model, inputs), strict=True):
        targets = x[0, 1:]
        nll -= float(lp.gather(-1, targets[:, None]).sum())
        kl += float((ref.exp() * (ref - lp)).sum())
        count += targets.numel()
    return math.exp(nll / count), kl / count


def int4_static(algorithm) -> dict:
    config = get_preset("INT4_BLOCKWISE_WEIGHT_ONLY_CFG")
    config["quant_cfg"]["*weight_quantizer"]["block_sizes"] = {-1: 128, "type": "static"}
    config["algorithm"] = algorithm
    return config


QUANTIZE_VARIANTS = {
    "RTN int4 g128 (max)": int4_static("max"),
    "AWQ (INT4_AWQ_CFG)": get_preset("INT4_AWQ_CFG"),
    "GPTQ int4 g128": int4_static("gptq"),
    "GPTQ + scale estimation int4 g128": int4_static({"method": "gptq", "scale_estimation": True}),
}
COMPRESS_CASES = {  # label: (mode, awq)
    "int4_sym g128 r1.0": ("int4_sym", False),
    "int4_asym g128 r1.0": ("int4_asym", False),
    "int4_asym g128 r1.0 awq": ("int4_asym", True),
}


def lowbit_grid(weight: torch.Tensor, floor: float) -> torch.Tensor:
    """Groups of 128 of ``weight`` (out, in) on lowbit's INT4 grid, ``m`` in ``[floor, 1]`` by weight error."""
    groups = weight.reshape(weight.shape[0], -1, 128)
    candidates = []
    for m in [i / 32 for i in range(round(floor * 32), 33)]:
        step = m * groups.abs().amax(-1, keepdim=True) / 7
        candidates.append(torch.clamp(torch.round(groups / step), -8, 7) * step)
    candidates = torch.stack(candidates)
    best = (candidates - groups).square().sum(-1, keepdim=True).argmin(0, keepdim=True)
    return candidates.gather(0, best.expand(1, *groups.shape))[0].reshape(weight.shape)


def nncf_signed_grid(weight: torch.Tensor) -> torch.Tensor:
    """Groups of 128 of ``weight`` (out, in) with NNCF's signed scale ``s = -w_max / 8`` (``w_max``: the
    group's weight of largest magnitude), codes clamp(round(w / s), -8, 7)."""
    groups = weight.reshape(weight.shape[0], -1, 128)
    step = -groups.gather(-1, groups.abs().argmax(-1, keepdim=True)) / 8
    return (torch.clamp(torch.round(groups / step), -8, 7) * step).reshape(weight.shape)


def searched_signed_grid(weight: torch.Tensor, objective: str) -> torch.Tensor:
    """:func:`nncf_signed_grid` with the step times ``m`` per group, ``m`` in ``[0.5, 1]`` (steps of 1/32) by the
    least squared (``"squared"``) or least largest absolute (``"max_abs"``) weight error, smallest ``m`` on ties."""
    groups = weight.reshape(weight.shape[0], -1, 128).double()
    extreme = groups.gather(-1, groups.abs().argmax(-1, keepdim=True))
    best, best_error = None, None
    for m in [i / 32 for i in range(16, 33)]:
        step = -extreme / 8 * m
        candidate = torch.clamp(torch.round(groups / step), -8, 7) * step
        delta = (candidate - groups).abs()
        error = delta.square().sum(-1, keepdim=True) if objective == "squared" else delta.amax(-1, keepdim=True)
        better = torch.ones_like(error, dtype=torch.bool) if best is None else error < best_error
        best = candidate if best is None else torch.where(better, candidate, best)
        best_error = error if best_error is None else torch.where(better, error, best_error)
    return best.reshape(weight.shape).float()


def int8_asymmetric_rows(weight: torch.Tensor) -> torch.Tensor:
    low, high = weight.amin(1, keepdim=True), weight.amax(1, keepdim=True)
    step = (high - low) / 255
    zero = torch.round(-low / step)
    return (torch.clamp(torch.round(weight / step) + zero, 0, 255) - zero) * step


def rounded_in_float(model: nn.Module, int4) -> nn.Module:
    """Every Conv1D's ``(out, in)`` view and Linear but lm_head through ``int4``; the embeddings and lm_head
    INT8 asymmetric per row (compress_weights' backup for them)."""
    with torch.no_grad():
        for name, module in model.named_modules():
            if type(module).__name__ == "Conv1D":
                module.weight.copy_(int4(module.weight.t()).t())
            elif isinstance(module, nn.Embedding) or name == "lm_head":
                module.weight.copy_(int8_asymmetric_rows(module.weight))
            elif isinstance(module, nn.Linear):
                module.weight.copy_(int4(module.weight))
    return model


def lowbit_compress(model: nn.Module, dataset: list, mode: str, awq: bool) -> nn.Module:
    return lowbit.compress_weights(model, mode=mode, group_size=128, ratio=1.0, awq=awq,
                                   dataset=dataset if awq else None)


def nncf_compress(model: nn.Module, dataset: list, mode: str, awq: bool) -> nn.Module:
    import nncf

    return nncf.compress_weights(model, mode=nncf.CompressWeightsMode(mode), group_size=128, ratio=1.0, awq=awq,
                                 dataset=nncf.Dataset(dataset), subset_size=len(dataset),
                                 sensitivity_metric=nncf.SensitivityMetric.WEIGHT_QUANTIZATION_ERROR)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-tokens", type=int, default=16384)
    parser.add_argument("--calibration-samples", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="folder for the results file")
    parser.add_argument("--grid-study", action="store_true", help="add the INT4_SYM grid rows (docstring)")
    parser.add_argument("--skip-quantize", action="store_true", help="compress_weights rows only")
    parser.add_argument("--model", choices=("gpt2", "default"), default="gpt2",
                        help="default: the bundled Llama instead, for the same rows")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base, tokenizer = (load_gpt2_model if args.model == "gpt2" else load_default_model)(torch.float32)
    inputs = windows(tokenizer, args.max_tokens)
    reference = log_probs(base, inputs)
    float_ppl, _ = score(base, inputs, reference)
    calibration, stacked = (calibration_batches(tokenizer, default_calibration_text(), seed=0, seq_len=SEQ_LEN,
                                                num_samples=args.calibration_samples, batch_size=size)
                            for size in (1, 8))
    rows = [{"variant": "float32", "ppl": float_ppl, "d ppl": 0.0, "KL": 0.0, "seconds": 0.0}]

    def add(name: str, quantize) -> None:
        model = copy.deepcopy(base)
        start = time.perf_counter()
        model = quantize(model)
        seconds = time.perf_counter() - start
        ppl, kl = score(model, inputs, reference)
        rows.append({"variant": name, "ppl": ppl, "d ppl": ppl - float_ppl, "KL": kl, "seconds": seconds})
        print(rows[-1], flush=True)

    for name, config in () if args.skip_quantize else QUANTIZE_VARIANTS.items():
        add(f"quantize: {name}", lambda m, c=config: lowbit.quantize(m, c, lambda mm: [mm(**b) for b in stacked]))
    for label, case in COMPRESS_CASES.items():
        for library, compress in (("lowbit", lowbit_compress), ("nncf", nncf_compress)):
            try:
                add(f"compress_weights {label} ({library})", lambda m, c=compress, k=case: c(m, calibration, *k))
            except ImportError as error:
                print(f"nncf rows skipped: {error}")
    if args.grid_study:
        for floor in (0.5, 0.75, 0.8125, 0.875, 1.0):
            add(f"study: lowbit grid, m in [{floor}, 1]", lambda m, f=floor: rounded_in_float(
                m, lambda w: lowbit_grid(w, f)))
        add("study: NNCF signed-scale grid", lambda m: rounded_in_float(m, nncf_signed_grid))
        for objective in ("squared", "max_abs"):
            add(f"study: signed grid, m in [0.5, 1] by {objective} error", lambda m, o=objective: rounded_in_float(
                m, lambda w: searched_signed_grid(w, o)))
    context = run_context(["python", "bench/gpt2_fixture.py", *sys.argv[1:]])
    context["transformers"] = __import__("transformers").__version__
    try:
        context["nncf"] = __import__("nncf").__version__
    except ImportError:
        context["nncf"] = "not installed"
    title = "GPT-2 fixture" if args.model == "gpt2" else "default model (Llama)"
    text = (f"# {title}, INT4 ({len(inputs)} windows of {SEQ_LEN} held-out tokens, "
            f"{args.calibration_samples} calibration windows)\n\n" + format_table(rows) + "\n\n"
            + "\n".join(f"- {key}: {value}" for key, value in context.items()) + "\n")
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        name = "gpt2_fixture" if args.model == "gpt2" else "gpt2_fixture_llama_rows"
        name += "_compress" if args.skip_quantize else ""
        (args.out / f"{name}_{date.today().isoformat()}.md").write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
