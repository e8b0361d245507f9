"""Accuracy and wall time of lowbit next to NVIDIA ModelOpt and NNCF, on lowbit's bundled model (CPU).

    python bench/accuracy.py [--model default] [--eval-tokens 16384] [--calib-samples 32]
                             [--libraries lowbit,modelopt,nncf] [--formats "INT4 weight-only g128"]
                             [--out bench/results]

Every case quantizes a fresh copy of the same model with the same calibration windows (bundled
calibration text, seed 0) and is scored on the same held-out tokens (``lowbit.report.Workload``) against
the float model, the two run window by window side by side (``lowbit.eval.divergence``). The table ranks
the cases of each format by the mean per-token KL(float || quantized) and gives, per case: KL, its 99th
percentile, the top-1 agreement, perplexity and its change vs the unquantized model (absolute and %), the
wall time of calibration + quantization and that time as a ratio to lowbit's for the same format. Under
the table: each pair of cases that the perplexity delta and KL rank in opposite order.
A case that fails (a format a peer does not run on CPU, a library not installed) records why.
The table is printed and written to ``<out>/accuracy_<date>.md`` with versions, command, machine and date.

To add a comparison, append a ``Case`` to ``CASES`` (rows with the same ``format`` line up); AWQ,
GPTQ, SmoothQuant and more NNCF modes belong here as they land.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import importlib.metadata
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

import lowbit
from lowbit.eval import format_table, opposite_order_pairs
from lowbit.report import (
    Measurement,
    Workload,
    available_cpus,
    measure,
    measure_baseline,
    model_loader,
    run_context,
    time_quantize,
)

Apply = Callable[[nn.Module, Workload], nn.Module]
LIBRARY_PACKAGES = {"lowbit": "lowbit", "modelopt": "nvidia-modelopt", "nncf": "nncf"}
NOTE_WIDTH = 100
HIGH_PRECISION_LAYERS = (".*lm_head.*", ".*embed_tokens.*")  # what lowbit's presets leave unquantized


@dataclass(frozen=True)
class Case:
    """One library's configuration for one format; ``apply(model, workload)`` quantizes ``model``
    (timed); ``prepare_eval(model)`` readies it for evaluation without changing its outputs (untimed:
    folding fake-quantized weights so that they are not re-quantized on every forward)."""

    format: str
    library: str
    config: str
    apply: Apply
    prepare_eval: Callable[[nn.Module], nn.Module] = lambda model: model


def lowbit_case(format: str, preset: str) -> Case:
    def apply(model: nn.Module, workload: Workload) -> nn.Module:
        return lowbit.quantize(model, lowbit.get_preset(preset), workload.forward_loop())

    return Case(format, "lowbit", preset, apply, lowbit.fold_weight)


def modelopt_case(format: str, preset: str) -> Case:
    """``modelopt.torch.quantization.quantize`` with the preset of the same name (fake quantization)."""

    def apply(model: nn.Module, workload: Workload) -> nn.Module:
        import modelopt.torch.quantization as mtq

        return mtq.quantize(model, copy.deepcopy(getattr(mtq, preset)), workload.forward_loop())

    def fold(model: nn.Module) -> nn.Module:
        import modelopt.torch.quantization as mtq

        mtq.fold_weight(model)
        return model

    return Case(format, "modelopt", preset, apply, fold)


def nncf_case(format: str, mode: str, group_size: int) -> Case:
    """``nncf.compress_weights`` on the torch model: real compressed weights, data-free, every Linear
    compressed to ``mode`` (ratio 1.0) except the layers lowbit's presets keep in high precision."""

    def apply(model: nn.Module, workload: Workload) -> nn.Module:
        import nncf

        example = nncf.Dataset([workload.calibration[0]["input_ids"]])  # for tracing only
        return nncf.compress_weights(
            model, mode=getattr(nncf.CompressWeightsMode, mode), group_size=group_size, ratio=1.0,
            dataset=example, ignored_scope=nncf.IgnoredScope(patterns=list(HIGH_PRECISION_LAYERS), validate=False),
        )

    return Case(format, "nncf", f"{mode} group_size={group_size}", apply)


CASES: list[Case] = [
    lowbit_case("FP8 W8A8 per-tensor", "FP8_DEFAULT_CFG"),
    modelopt_case("FP8 W8A8 per-tensor", "FP8_DEFAULT_CFG"),
    lowbit_case("INT8 W8A8", "INT8_DEFAULT_CFG"),
    modelopt_case("INT8 W8A8", "INT8_DEFAULT_CFG"),
    lowbit_case("INT8 weight-only per-channel", "INT8_WEIGHT_ONLY_CFG"),
    modelopt_case("INT8 weight-only per-channel", "INT8_WEIGHT_ONLY_CFG"),
    nncf_case("INT8 weight-only per-channel", "INT8_SYM", -1),
    lowbit_case("INT4 weight-only g128", "INT4_BLOCKWISE_WEIGHT_ONLY_CFG"),
    modelopt_case("INT4 weight-only g128", "INT4_BLOCKWISE_WEIGHT_ONLY_CFG"),
    nncf_case("INT4 weight-only g128", "INT4_SYM", 128),
    lowbit_case("NVFP4 W4A4", "NVFP4_DEFAULT_CFG"),
    modelopt_case("NVFP4 W4A4", "NVFP4_DEFAULT_CFG"),
    lowbit_case("NVFP4 weight-only", "W4A16_NVFP4_CFG"),
    modelopt_case("NVFP4 weight-only", "W4A16_NVFP4_CFG"),
    nncf_case("NVFP4 weight-only", "NVFP4", 16),
    lowbit_case("MXFP8 W8A8", "MXFP8_DEFAULT_CFG"),
    modelopt_case("MXFP8 W8A8", "MXFP8_DEFAULT_CFG"),
    lowbit_case("MXFP4 W4A4", "MXFP4_DEFAULT_CFG"),
    modelopt_case("MXFP4 W4A4", "MXFP4_DEFAULT_CFG"),
]


def library_version(library: str) -> str | None:
    """Installed version of ``library``'s package, None when it is not installed."""
    try:
        return importlib.metadata.version(LIBRARY_PACKAGES[library])
    except importlib.metadata.PackageNotFoundError:
        return None


def run_case(case: Case, workload: Workload) -> Measurement:
    if library_version(case.library) is None:
        package = LIBRARY_PACKAGES[case.library]
        return Measurement(case.library, case.config, error=f"not installed (pip install {package})")
    return measure(case.library, case.config, workload.model, functools.partial(case.apply, workload=workload),
                   lambda model: workload.divergence(case.prepare_eval(model)), lambda model: None)


def retime(cases: list[Case], results: list[Measurement], workload: Workload) -> list[Measurement]:
    """Quantize every case that ran once more and keep the faster time. Repeating whole passes (not
    one case N times in a row) spreads each case's runs over the benchmark, so a burst of load on a
    shared machine does not spoil all of them."""
    retimed = []
    for case, result in zip(cases, results, strict=True):
        if result.error is None:
            _, seconds, cpu_seconds = time_quantize(workload.model, functools.partial(case.apply, workload=workload))
            if seconds < result.seconds:
                result = dataclasses.replace(result, seconds=seconds, cpu_seconds=cpu_seconds)
        retimed.append(result)
    return retimed


def kl_order(cases: list[Case], results: list[Measurement]) -> list[int]:
    """Indices of the cases grouped by format (first-seen order), each group sorted by KL; failures last."""
    formats = list(dict.fromkeys(case.format for case in cases))
    return sorted(range(len(cases)), key=lambda i: (formats.index(cases[i].format), results[i].kl is None,
                                                    results[i].kl or 0.0))


def accuracy_cells(result: Measurement, baseline: Measurement) -> dict:
    """KL, its 99th percentile, top-1 % and the perplexity change, rounded for a table (KL first: it ranks)."""
    row = result.as_row(baseline)
    return {"KL": _significant(row["kl"], 3), "KL p99": _significant(row["kl_p99"], 3),
            "top-1 %": _round(None if row["top1"] is None else 100 * row["top1"], 2),
            "ppl": _round(row["perplexity"], 3), "d ppl": _round(row["delta"], 3)}


def unquantized_cells(baseline: Measurement) -> dict:
    """The float model's cells: empty KL columns (it is the reference), then its perplexity."""
    return {"KL": None, "KL p99": None, "top-1 %": None, "ppl": round(baseline.perplexity, 3)}


def comparison_rows(cases: list[Case], results: list[Measurement], baseline: Measurement) -> list[dict]:
    """One row per case, ranked by KL within its format: KL, top-1, perplexity delta vs ``baseline`` and wall
    time as a ratio to lowbit's, same format."""
    lowbit_seconds = {case.format: result.seconds for case, result in zip(cases, results, strict=True)
                      if case.library == "lowbit"}
    rows = [{"format": "unquantized", "library": "-", "config": "-", **unquantized_cells(baseline)}]
    for index in kl_order(cases, results):
        case, result = cases[index], results[index]
        row = result.as_row(baseline)
        reference = lowbit_seconds.get(case.format)
        ratio = result.seconds / reference if result.seconds is not None and reference else None
        rows.append({
            "format": case.format,
            "library": case.library,
            "config": case.config,
            **accuracy_cells(result, baseline),
            "d %": _round(row["delta_pct"], 2),
            "quant s": _round(row["seconds"], 2),
            "cpu s": _round(row["cpu_seconds"], 2),
            "time vs lowbit": _round(ratio, 2),
            "note": _shorten(row["error"] or "", NOTE_WIDTH),
        })
    return rows


def ranked_by_kl(cases: list[Case], results: list[Measurement], baseline: Measurement
                 ) -> tuple[list[dict], dict[str, tuple[float, float]]]:
    """Rows of every case sorted by KL alone (failures last), and ``{label: (perplexity delta, KL)}`` of those
    that ran, for ``opposite_order_lines``."""
    order = sorted(range(len(cases)), key=lambda i: (results[i].kl is None, results[i].kl or 0.0))
    rows = [{"rank": None, "config": "unquantized", **unquantized_cells(baseline)}]
    scores = {}
    for rank, index in enumerate(order, start=1):
        case, result = cases[index], results[index]
        label = case.config if case.library == "lowbit" else f"{case.library} {case.config}"
        rows.append({"rank": rank if result.kl is not None else None, "config": label,
                     **accuracy_cells(result, baseline), "quant s": _round(result.seconds, 2),
                     "note": _shorten(result.error or "", NOTE_WIDTH)})
        if result.kl is not None:
            scores[label] = (result.as_row(baseline)["delta"], result.kl)
    return rows, scores


def opposite_order_lines(scores: dict[str, tuple[float, float]]) -> list[str]:
    """Markdown lines naming each pair that the perplexity delta and KL rank in opposite order."""
    pairs = opposite_order_pairs(scores)
    head = (f"Pairs that perplexity delta and KL rank in opposite order ({len(pairs)} of "
            f"{len(scores) * (len(scores) - 1) // 2}; first the one with the lower delta):")
    return [head, "", *(f"- {a} (d ppl {scores[a][0]:+.3f}, KL {scores[a][1]:.3g}) vs {b} (d ppl "
                         f"{scores[b][0]:+.3f}, KL {scores[b][1]:.3g})" for a, b in pairs)]


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def _significant(value: float | None, digits: int) -> float | None:
    """``value`` to ``digits`` significant digits: KL spans 1e-7 (8-bit on GPT-2) to 0.3 (3-bit)."""
    return None if value is None else float(f"{value:.{digits}g}")


def select(cases: list[Case], libraries: list[str] | None, formats: list[str] | None) -> list[Case]:
    """Cases of the named libraries and formats (None: all); raises ValueError naming unknown ones."""
    for name, wanted, known in (("--libraries", libraries, {c.library for c in cases}),
                                ("--formats", formats, {c.format for c in cases})):
        unknown = set(wanted or ()) - known
        if unknown:
            raise ValueError(f"{name}: unknown {sorted(unknown)}; allowed are {sorted(known)}")
    return [c for c in cases if (libraries is None or c.library in libraries)
            and (formats is None or c.format in formats)]


def report(rows: list[dict], context: dict, workload: Workload, repeats: int, model: str,
           pairs: list[str]) -> str:
    versions = ", ".join(f"{lib} {library_version(lib) or 'not installed'}" for lib in LIBRARY_PACKAGES)
    return "\n".join([
        f"# Accuracy vs peers, {context['date'][:10]}",
        "",
        f"- command: `{context['command']}`",
        f"- machine: {context['machine']}; load average at the end: {context['load_average']}",
        f"- versions: python {context['python']}, torch {context['torch']}, {versions}",
        f"- date: {context['date']}",
        f"- workload: model `{model}`, {len(workload.calibration)} calibration batches "
        f"({sum(len(b['input_ids']) for b in workload.calibration)} windows), scored on the first "
        f"{workload.eval_tokens} held-out tokens against the float model",
        "- ranked by `KL` within each format: mean per-token KL(float || quantized), nats; `KL p99`: its 99th "
        "percentile; `top-1 %`: positions where both models' most likely next token agree",
        f"- `d %`: perplexity change vs unquantized; `quant s`: calibration + quantization wall time, "
        f"fastest of {repeats} passes; `cpu s`: the process's CPU time over that span (all threads; about "
        "threads x wall when the machine is idle); `time vs lowbit`: wall time over lowbit's for the same format",
        "",
        "```",
        format_table(rows),
        "```",
        "",
        *pairs,
        "",
    ])


def write_report(text: str, out: Path, stem: str) -> Path:
    """Print ``text`` and write it to ``out/<stem>_<today>.md``; returns the path."""
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{stem}_{date.today().isoformat()}.md"
    path.write_text(text, encoding="utf-8")
    print(f"written to {path}")
    return path


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def _model_name(name: str) -> str:
    try:
        model_loader(name)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return name


def parse_bench_args(description: str, argv: list[str], all_cases: list[Case], repeats: int,
                     repeats_help: str, eval_tokens: int = 16384, jobs: bool = False
                     ) -> tuple[argparse.Namespace, list[Case]]:
    """The options the side-by-side benches share, parsed, and the cases ``--libraries`` / ``--formats`` keep."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", type=_model_name, default="default",
                        help="'default' (the bundled model) or NAME for lowbit.assets.load_NAME_model")
    parser.add_argument("--eval-tokens", type=int, default=eval_tokens)
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--libraries", type=_names, help=f"comma-separated, of {sorted(LIBRARY_PACKAGES)}")
    parser.add_argument("--formats", type=_names, help="comma-separated format names of CASES")
    parser.add_argument("--threads", type=int, default=available_cpus())
    parser.add_argument("--repeats", type=int, default=repeats, help=repeats_help)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--device", default="cpu", help="where the model runs (cpu, cuda)")
    if jobs:
        parser.add_argument("--jobs", type=int, default=1, help="worker processes, each running a share of the cases")
    args = parser.parse_args(argv)
    try:
        return args, select(all_cases, args.libraries, args.formats)
    except ValueError as error:
        parser.error(str(error))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args, cases = parse_bench_args(__doc__.split("\n\n")[0], argv, CASES, 3,
                                   "passes over all cases; each case keeps its fastest quantization")

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", module="modelopt")
    workload = Workload.default(args.calib_samples, args.eval_tokens, model=args.model)
    workload.model.to(args.device)
    baseline = measure_baseline(workload)
    results = [run_case(case, workload) for case in tqdm(cases, desc="cases")]
    for _ in tqdm(range(args.repeats - 1), desc="re-timing passes"):
        results = retime(cases, results, workload)
    rows = comparison_rows(cases, results, baseline)
    pairs = opposite_order_lines(ranked_by_kl(cases, results, baseline)[1])
    context = run_context(["python", "bench/accuracy.py", *argv])
    stem = "accuracy" + ("" if args.device == "cpu" else f"_{args.device}") + ("" if args.model == "default"
                                                                                else f"_{args.model}")
    write_report(report(rows, context, workload, args.repeats, args.model, pairs), args.out, stem)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
