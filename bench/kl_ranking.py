"""Every lowbit preset and algorithm ranked by KL divergence to the float model, perplexity delta beside it.

    python bench/kl_ranking.py [--model default] [--eval-tokens 8192] [--calib-samples 32] [--jobs 1]
                               [--out bench/results]

Every case quantizes a fresh copy of the same float32 model with the same calibration windows (bundled
calibration text, seed 0) and is scored on the same held-out tokens (``lowbit.report.Workload``: windows of
256 tokens, stride 128) against the float model, the two run window by window side by side
(``lowbit.eval.divergence``, exact): mean per-token KL(float || quantized) in nats, its 99th percentile, the
top-1 agreement, perplexity and its change. Cases: each preset of ``lowbit.PRESETS`` with its own algorithm,
then the algorithm variants of ``bench/algorithms.py`` (lowbit's; not its ``layer_inputs`` options), then INT3
g128 weight-only by round-to-nearest and by GPTQ. Rows are sorted by KL; under the table, each pair of cases
that the perplexity delta and KL rank in opposite order. One quantization per case (no timing repeats: the
times are indicative). ``--jobs N`` runs the cases in N worker processes, each with its own copy of the
workload (same seed, same tokens: the scores do not depend on N; the times do).
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import warnings
from pathlib import Path

import torch

import lowbit
from lowbit.eval import format_table
from lowbit.report import Measurement, Workload, measure_baseline, run_context

sys.path.insert(0, str(Path(__file__).parent))
from accuracy import Case, opposite_order_lines, parse_bench_args, ranked_by_kl, run_case, write_report  # noqa: E402
from algorithms import CASES as ALGORITHM_CASES  # noqa: E402
from algorithms import lowbit_case  # noqa: E402

INT3_G128 = {"quant_cfg": {"*weight_quantizer": {"num_bits": 3, "block_sizes": {-1: 128}, "enable": True},
                           "*lm_head*": {"enable": False}, "default": {"enable": False}}, "algorithm": "max"}


def int3_case(algorithm: str) -> Case:
    def apply(model, workload):
        return lowbit.quantize(model, {**INT3_G128, "algorithm": algorithm}, workload.forward_loop())

    return Case("INT3 g128 weight-only", "lowbit", f"INT3 g128 {'RTN' if algorithm == 'max' else algorithm}", apply,
                lowbit.fold_weight)


def all_cases() -> list[Case]:
    presets = [lowbit_case(name.removesuffix("_CFG"), name) for name in lowbit.PRESETS]
    variants = [case for case in ALGORITHM_CASES if case.library == "lowbit" and case.config not in lowbit.PRESETS
                and "layer_inputs" not in case.config]  # an option of the algorithms, not another algorithm
    return [*presets, *variants, int3_case("max"), int3_case("gptq")]


def workload_for(args: argparse.Namespace) -> Workload:
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    workload = Workload.default(args.calib_samples, args.eval_tokens, progress=False, model=args.model)
    workload.model.to(args.device)
    return workload


def run_cases(args: argparse.Namespace, configs: list[str]) -> list[Measurement]:
    """The cases named by ``configs`` measured on a workload built in this process (a worker's job)."""
    workload = workload_for(args)
    by_config = {case.config: case for case in all_cases()}
    results = []
    for config in configs:
        results.append(run_case(by_config[config], workload))
        print(f"{config}: {results[-1]}", flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args, cases = parse_bench_args(__doc__.split("\n\n")[0], argv, all_cases(), 1, "unused: one run per case",
                                   eval_tokens=8192, jobs=True)
    workload = workload_for(args)
    baseline = measure_baseline(workload)
    shares = [[case.config for case in cases[job :: args.jobs]] for job in range(args.jobs)]
    with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
        done = pool.starmap(run_cases, [(args, share) for share in shares])
    measured = {result.config: result for share in done for result in share}
    results = [measured[case.config] for case in cases]
    rows, scores = ranked_by_kl(cases, results, baseline)
    context = run_context(["python", "bench/kl_ranking.py", *argv])
    text = "\n".join([
        f"# Every preset and algorithm ranked by KL to the float model, {context['date'][:10]}",
        "",
        f"- command: `{context['command']}`",
        f"- machine: {context['machine']}; load average at the end: {context['load_average']}",
        f"- versions: python {context['python']}, torch {context['torch']}, lowbit {lowbit.__version__}",
        f"- date: {context['date']}",
        f"- workload: model `{args.model}` (float32, {args.device}; {args.jobs} worker processes), "
        f"{len(workload.calibration)} calibration batches "
        f"of 8 x 256 tokens, scored on the first {workload.eval_tokens} held-out tokens (seq_len 256, stride 128)",
        "- `KL`: mean per-token KL(float || quantized), nats; `KL p99`: its 99th percentile; `top-1 %`: positions "
        "where both models' most likely next token agree; `d ppl`: perplexity change; `quant s`: one run, "
        "indicative only (shared machine)",
        "",
        "```",
        format_table(rows),
        "```",
        "",
        *opposite_order_lines(scores),
        "",
    ])
    write_report(text, args.out, "kl_ranking" if args.model == "default" else f"kl_ranking_{args.model}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
