"""Calibration algorithms side by side: lowbit vs NVIDIA ModelOpt vs NNCF, on lowbit's bundled model (CPU).

    python bench/algorithms.py [--model default] [--eval-tokens 16384] [--calib-samples 32] [--repeats 2]
                               [--libraries lowbit,modelopt,nncf] [--formats "INT8 W8A8"] [--out bench/results]

Every case quantizes a fresh copy of the same float32 model with the same calibration windows (bundled
calibration text, 32 windows of 256 tokens, seed 0; NNCF gets the same windows one per item) and is scored
on the same held-out tokens (``lowbit.report.Workload``: seq_len 256, stride 128) against the float model,
run beside it window by window (``lowbit.eval.divergence``). The cases of each format are ranked by the mean
per-token KL(float || quantized); per case the table gives KL, its 99th percentile, the top-1 agreement,
perplexity and its change vs the unquantized model, the wall time of calibration + quantization (fastest of
``--repeats`` whole passes, ``bench/accuracy.retime``) and the process CPU time of that run. A case a
library cannot run on CPU records why.

Two verdicts per format, printed under the table and written with it, then the pairs of cases that the
perplexity delta and KL rank in opposite order:

- accuracy: lowbit's best KL at the format <= the best peer's KL at the format (the deltas beside);
- speed: for each config both lowbit and ModelOpt run (same preset name), lowbit's wall time <= 0.5x
  ModelOpt's; each time is also given as a multiple of the bare calibration forward loop (fastest of
  ``--repeats``), the floor of any calibration that needs activations.

Nothing here is tuned on the held-out text: algorithm options are the presets' defaults.
"""

from __future__ import annotations

import copy
import os
import re
import sys
import warnings
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

import lowbit
from lowbit.eval import format_table
from lowbit.report import Measurement, Workload, measure_baseline, run_context, time_quantize

sys.path.insert(0, str(Path(__file__).parent))
from accuracy import (  # noqa: E402  (bench/ is not a package)
    HIGH_PRECISION_LAYERS,
    LIBRARY_PACKAGES,
    Case,
    accuracy_cells,
    kl_order,
    library_version,
    modelopt_case,
    opposite_order_lines,
    parse_bench_args,
    ranked_by_kl,
    retime,
    run_case,
    unquantized_cells,
    write_report,
)

INT4_SYM = "INT4 sym g128 weight-only"
INT4_ASYM = "INT4 asym g128 weight-only"
INT8_W8A8 = "INT8 W8A8 (per-channel W; per-tensor A)"  # no comma: --formats splits on commas
FP8_W8A8 = "FP8 W8A8 per-tensor"
W4A8 = "W4A8 (INT4 g128 -> FP8 W; FP8 A)"  # no comma either
NVFP4 = "NVFP4 W4A4 (E2M1 blocks of 16)"
SPEED_RATIO = 0.5  # the target: lowbit's wall time <= this x ModelOpt's, same config


def lowbit_case(format: str, preset: str, algorithm: str | dict | None = None) -> Case:
    """``lowbit.quantize`` with ``preset``, its algorithm replaced by ``algorithm`` when given."""
    config = copy.deepcopy(lowbit.get_preset(preset))
    if algorithm is not None:
        config["algorithm"] = algorithm
    label = preset if algorithm is None else f"{preset} algorithm={_algorithm_label(algorithm)}"

    def apply(model: nn.Module, workload: Workload) -> nn.Module:
        return lowbit.quantize(model, copy.deepcopy(config), workload.forward_loop())

    return Case(format, "lowbit", label, apply, lowbit.fold_weight)


def _algorithm_label(algorithm: str | dict) -> str:
    """``gptq`` or ``gptq(scale_estimation=True)``: the method and every option given."""
    if isinstance(algorithm, str):
        return algorithm
    options = ", ".join(f"{key}={value}" for key, value in algorithm.items() if key != "method")
    return f"{algorithm['method']}({options})" if options else algorithm["method"]


def lowbit_compress_case(format: str, mode: str, **options) -> Case:
    """``lowbit.compress_weights`` (NNCF's API) with the same arguments as :func:`nncf_case`."""

    def apply(model: nn.Module, workload: Workload) -> nn.Module:
        dataset = [{"input_ids": ids[None]} for ids in _windows(workload)] if options else None
        from lowbit.weight_compression import compress_weights

        return compress_weights(model, mode=mode.lower(), group_size=128, ratio=1.0, dataset=dataset,
                                       ignored_scope=_high_precision, **options)

    return Case(format, "lowbit", _label(f"compress_weights {mode}", options), apply)


def _high_precision(name: str) -> bool:
    """NNCF's ``IgnoredScope(patterns=HIGH_PRECISION_LAYERS, validate=False)`` for lowbit: a layer any pattern
    matches whole, none required to match (GPT-2 has no ``embed_tokens``)."""
    return any(re.fullmatch(pattern, name) for pattern in HIGH_PRECISION_LAYERS)


def nncf_case(format: str, mode: str, **options) -> Case:
    """``nncf.compress_weights`` on the torch model, group 128, ratio 1.0; the calibration windows as the
    dataset (one window per item; data-free cases get it for tracing only)."""

    def apply(model: nn.Module, workload: Workload) -> nn.Module:
        import nncf

        windows = _windows(workload)
        return nncf.compress_weights(
            model, mode=getattr(nncf.CompressWeightsMode, mode), group_size=128, ratio=1.0,
            dataset=nncf.Dataset([ids[None] for ids in windows]), subset_size=len(windows),
            ignored_scope=nncf.IgnoredScope(patterns=list(HIGH_PRECISION_LAYERS), validate=False), **options,
        )

    return Case(format, "nncf", _label(mode, options), apply)


def _windows(workload: Workload) -> list[torch.Tensor]:
    return [ids for batch in workload.calibration for ids in batch["input_ids"]]


def _label(name: str, options: dict) -> str:
    return " ".join([name, *(key for key, value in options.items() if value)])


CASES: list[Case] = [
    lowbit_case(INT4_SYM, "INT4_BLOCKWISE_WEIGHT_ONLY_CFG"),
    lowbit_case(INT4_SYM, "INT4_AWQ_CFG"),
    lowbit_case(INT4_SYM, "INT4_AWQ_CFG", "awq_full"),
    lowbit_case(INT4_SYM, "INT4_BLOCKWISE_WEIGHT_ONLY_CFG", "gptq"),
    lowbit_case(INT4_SYM, "INT4_BLOCKWISE_WEIGHT_ONLY_CFG", {"method": "gptq", "scale_estimation": True}),
    lowbit_case(INT4_SYM, "INT4_BLOCKWISE_WEIGHT_ONLY_CFG",
                {"method": "gptq", "scale_estimation": True, "layer_inputs": "quantized"}),
    lowbit_compress_case(INT4_SYM, "INT4_SYM", scale_estimation=True),
    lowbit_compress_case(INT4_SYM, "INT4_SYM", scale_estimation=True, gptq=True),
    modelopt_case(INT4_SYM, "INT4_BLOCKWISE_WEIGHT_ONLY_CFG"),
    modelopt_case(INT4_SYM, "INT4_AWQ_CFG"),
    nncf_case(INT4_SYM, "INT4_SYM"),
    nncf_case(INT4_SYM, "INT4_SYM", awq=True),
    nncf_case(INT4_SYM, "INT4_SYM", scale_estimation=True),
    nncf_case(INT4_SYM, "INT4_SYM", awq=True, scale_estimation=True),
    nncf_case(INT4_SYM, "INT4_SYM", gptq=True),
    lowbit_compress_case(INT4_ASYM, "INT4_ASYM"),
    lowbit_compress_case(INT4_ASYM, "INT4_ASYM", awq=True),
    lowbit_compress_case(INT4_ASYM, "INT4_ASYM", scale_estimation=True),
    lowbit_compress_case(INT4_ASYM, "INT4_ASYM", awq=True, scale_estimation=True),
    lowbit_compress_case(INT4_ASYM, "INT4_ASYM", scale_estimation=True, gptq=True),
    nncf_case(INT4_ASYM, "INT4_ASYM"),
    nncf_case(INT4_ASYM, "INT4_ASYM", awq=True),
    nncf_case(INT4_ASYM, "INT4_ASYM", scale_estimation=True),
    nncf_case(INT4_ASYM, "INT4_ASYM", awq=True, scale_estimation=True),
    lowbit_case(INT8_W8A8, "INT8_DEFAULT_CFG"),
    lowbit_case(INT8_W8A8, "INT8_SMOOTHQUANT_CFG"),
    modelopt_case(INT8_W8A8, "INT8_DEFAULT_CFG"),
    modelopt_case(INT8_W8A8, "INT8_SMOOTHQUANT_CFG"),
    lowbit_case(FP8_W8A8, "FP8_DEFAULT_CFG"),
    modelopt_case(FP8_W8A8, "FP8_DEFAULT_CFG"),
    lowbit_case(W4A8, "W4A8_AWQ_BETA_CFG"),
    lowbit_case(W4A8, "W4A8_AWQ_BETA_CFG", {**lowbit.presets.AWQ_LITE_AS_MODELOPT, "layer_inputs": "quantized"}),
    modelopt_case(W4A8, "W4A8_AWQ_BETA_CFG"),
    lowbit_case(NVFP4, "NVFP4_DEFAULT_CFG"),
    lowbit_case(NVFP4, "NVFP4_AWQ_LITE_CFG"),
    lowbit_case(NVFP4, "NVFP4_AWQ_LITE_CFG", "awq_lite"),  # awq_lite's defaults: one scale per input group
    modelopt_case(NVFP4, "NVFP4_DEFAULT_CFG"),
    modelopt_case(NVFP4, "NVFP4_AWQ_LITE_CFG"),
]


def forward_loop_seconds(workload: Workload) -> float:
    """Wall time of one bare run of the calibration forward loop on a copy of the float model (no_grad, eval;
    ``time_quantize``'s clock): the floor of any calibration that needs the activations, lowbit's and
    ModelOpt's alike."""

    def run_loop(model: nn.Module) -> nn.Module:
        workload.forward_loop()(model.eval())
        return model

    return time_quantize(workload.model, run_loop)[1]


def rows_and_verdicts(cases: list[Case], results: list[Measurement], baseline: Measurement,
                      floor: float) -> tuple[list, list]:
    """Table rows (one per case, ranked by KL within each format) and the verdict lines (accuracy per format by
    KL, speed per shared config, with each time as a multiple of the bare forward loop's ``floor`` seconds)."""
    rows = [{"format": "unquantized", "library": "-", "config": "-", **unquantized_cells(baseline)}]
    best: dict[tuple[str, str], tuple[float, float]] = {}  # (format, library) -> (KL, delta) of its lowest KL
    seconds: dict[tuple[str, str], float] = {}
    for index in kl_order(cases, results):
        case, result = cases[index], results[index]
        row = result.as_row(baseline)
        if result.kl is not None:
            key = (case.format, case.library)
            best[key] = min(best.get(key, (result.kl, row["delta"])), (result.kl, row["delta"]))
            seconds[(case.library, case.config)] = row["seconds"]
        rows.append({
            "format": case.format, "library": case.library, "config": case.config,
            **accuracy_cells(result, baseline),
            "wall s": _round(row["seconds"], 2), "cpu s": _round(row["cpu_seconds"], 2),
            "note": (row["error"] or "")[:110],
        })
    verdicts = []
    for format in dict.fromkeys(case.format for case in cases):
        ours = best.get((format, "lowbit"))
        peers = [value for (f, library), value in best.items() if f == format and library != "lowbit"]
        if ours and peers:
            peer = min(peers)
            verdicts.append(f"accuracy {format}: lowbit best KL {ours[0]:.5f} (d ppl {ours[1]:.3f}) vs best peer "
                            f"{peer[0]:.5f} (d ppl {peer[1]:.3f}) -> {'met' if ours[0] <= peer[0] else 'NOT met'}")
    for (library, config), peer_seconds in seconds.items():
        if library == "modelopt" and ("lowbit", config) in seconds:
            ours = seconds[("lowbit", config)]
            ratio = ours / peer_seconds
            verdicts.append(f"speed {config}: lowbit {ours:.2f} s vs modelopt {peer_seconds:.2f} s = {ratio:.2f}x "
                            f"-> {'met' if ratio <= SPEED_RATIO else 'NOT met'} (forward-loop floor {floor:.2f} s: "
                            f"lowbit {ours / floor:.2f}x, modelopt {peer_seconds / floor:.2f}x)")
    return rows, verdicts


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def report(rows: list[dict], verdicts: list[str], context: dict, workload: Workload, repeats: int, model: str,
           pairs: list[str]) -> str:
    versions = ", ".join(f"{lib} {library_version(lib) or 'not installed'}" for lib in LIBRARY_PACKAGES)
    windows = len(_windows(workload))
    device = next(workload.model.parameters()).device
    return "\n".join([
        f"# Calibration algorithms vs peers, {context['date'][:10]}",
        "",
        f"- command: `{context['command']}`",
        f"- machine: {context['machine']}; load average at the end: "
        + " / ".join(f"{load:.2f}" for load in os.getloadavg()) + " (1 / 5 / 15 min)",
        f"- versions: python {context['python']}, torch {context['torch']}, {versions}",
        f"- date: {context['date']}",
        f"- workload: model `{model}` (float32, on {device}), {windows} calibration windows x 256 tokens of the "
        f"calibration text, scored against the float model on the first {workload.eval_tokens} held-out tokens "
        "(seq_len 256, stride 128)",
        "- ranked by `KL` within each format: mean per-token KL(float || quantized), nats; `KL p99`: its 99th "
        "percentile; `top-1 %`: positions where both models' most likely next token agree",
        f"- `d ppl`: perplexity change vs unquantized; `wall s`: calibration + quantization wall time, fastest of "
        f"{repeats}; `cpu s`: the process's CPU time over that run (all threads)",
        "",
        "```",
        format_table(rows),
        "```",
        "",
        "Verdicts (accuracy: lowbit's best KL at the format vs the best peer's; speed: same preset, "
        f"target lowbit <= {SPEED_RATIO}x ModelOpt's wall time):",
        "",
        *(f"- {line}" for line in verdicts),
        "",
        *pairs,
        "",
    ])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args, cases = parse_bench_args(__doc__.split("\n\n")[0], argv, CASES, 2,
                                   "quantize this many times, keep the fastest")

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    workload = Workload.default(args.calib_samples, args.eval_tokens, progress=False, model=args.model)
    workload.model.to(args.device)
    baseline = measure_baseline(workload)
    floor = forward_loop_seconds(workload)
    results = []
    for case in tqdm(cases, desc="cases"):
        results.append(run_case(case, workload))
        tqdm.write(f"{case.format} | {case.library} {case.config}: {results[-1]}")
    for _ in range(args.repeats - 1):
        floor = min(floor, forward_loop_seconds(workload))
        results = retime(cases, results, workload)
    rows, verdicts = rows_and_verdicts(cases, results, baseline, floor)
    pairs = opposite_order_lines(ranked_by_kl(cases, results, baseline)[1])
    text = report(rows, verdicts, run_context(["python", "bench/algorithms.py", *argv]), workload, args.repeats,
                  args.model, pairs)
    stem = "algorithms" + ("" if args.device == "cpu" else f"_{args.device}") + ("" if args.model == "default"
                                                                                  else f"_{args.model}")
    write_report(text, args.out, stem)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
