"""lowbit.compress_weights side by side with nncf.compress_weights, and the layer-selection study.

Two tables, on a causal LM (the bundled default model unless ``--model`` names another fixture), CPU. Accuracy
is the mean per-token KL(float || compressed) on held-out text, the float model run beside the compressed one
window by window (``lowbit.eval.divergence``), with the top-1 agreement and the perplexity change beside it.

1. parity: for each case, both libraries compress a fresh float32 copy with the same arguments; rows give
   KL, top-1 agreement and the perplexity change (%) of each, the model size in MiB (lowbit: the computed
   storage of its formats, fp16 scales and 4-bit zero points as NNCF stores them, and the bytes its packed
   model holds now; NNCF: the bytes of its parameters and buffers) and the compression wall time (lowbit /
   NNCF ratio). Data-aware cases give both the same dataset; NNCF always gets it (it traces torch models with
   it) but, in data-free cases, with the data-free metric.
2. selection: INT4_ASYM g128, ratio 0.8: every sensitivity metric against the same ratio given to layers
   chosen at random (mean of 3 seeds, same ratio rule); rows ranked by KL.

Usage (from the repository root):
    python bench/nncf_parity.py                       # both tables, full held-out text
    python bench/nncf_parity.py --only parity --max-tokens 16384 [--model default]
    python bench/nncf_parity.py --only parity --cases "int8_asym,int4_sym g128 r1.0"   # some parity cases
Entry points for other benchmarks: ``compare_with_nncf(model_factory, evaluate, dataset)`` and
``selection_study(model_factory, evaluate, dataset)``, each returning rows (dicts) for
``lowbit.eval.table.format_table``.
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

import lowbit
from lowbit.eval import Divergence, divergence, opposite_order_pairs
from lowbit.eval.table import format_table
from lowbit.weight_compression import (
    CompressWeightsMode,
    SensitivityMetric,
    apply_plan,
    check_options,
    plan_compression,
)
from lowbit.weight_compression.sensitivity import select_primary
from lowbit.weight_compression.summary import tensor_bytes

ModelFactory = Callable[[], nn.Module]
Evaluate = Callable[[nn.Module], Divergence]  # scores against the float model
MIB = 2**20


@dataclass(frozen=True)
class Case:
    """compress_weights arguments (the same names in lowbit and NNCF); ``data_aware`` passes the dataset."""

    name: str
    options: dict
    data_aware: bool = False


PARITY_CASES = (
    Case("int8_asym", {"mode": "int8_asym"}),
    Case("int4_sym g128 r1.0", {"mode": "int4_sym", "group_size": 128, "ratio": 1.0}),
    Case("int4_sym g128 r1.0 se", {"mode": "int4_sym", "group_size": 128, "ratio": 1.0,
                                   "scale_estimation": True}, data_aware=True),
    Case("int4_sym g128 r1.0 awq+se", {"mode": "int4_sym", "group_size": 128, "ratio": 1.0, "awq": True,
                                       "scale_estimation": True}, data_aware=True),
    Case("int4_asym g64 r0.8", {"mode": "int4_asym", "group_size": 64, "ratio": 0.8}),
    Case("int4_asym g64 r0.8 max_act_var", {"mode": "int4_asym", "group_size": 64, "ratio": 0.8,
                                            "sensitivity_metric": "max_activation_variance"}, data_aware=True),
)


def lowbit_compress(model: nn.Module, case: Case, dataset: list) -> tuple[nn.Module, float, int]:
    """Compress ``model`` with lowbit (packed); returns (model, seconds, computed compressed bytes)."""
    items = dataset if case.data_aware else None
    start = time.perf_counter()
    options = check_options(has_dataset=items is not None, **case.options)
    plan = plan_compression(model, options, items)
    model = apply_plan(model, plan, items)
    seconds = time.perf_counter() - start
    lowbit.fold_weight(model)  # layers left fake-quantized: no re-quantization at every forward
    return model, seconds, plan.summary().compressed_bytes


def nncf_compress(model: nn.Module, case: Case, dataset: list) -> tuple[nn.Module, float, int]:
    """Compress ``model`` with ``nncf.compress_weights``; returns (model, seconds, bytes as stored)."""
    import nncf

    options = dict(case.options)
    options["mode"] = nncf.CompressWeightsMode(CompressWeightsMode(options["mode"]).value)
    metric = options.pop("sensitivity_metric", None)
    if not case.data_aware and not options["mode"].value.startswith("int8"):
        metric = SensitivityMetric.WEIGHT_QUANTIZATION_ERROR
    if metric is not None:
        options["sensitivity_metric"] = nncf.SensitivityMetric(SensitivityMetric(metric).value)
    start = time.perf_counter()
    model = nncf.compress_weights(model, dataset=nncf.Dataset(dataset), subset_size=len(dataset), **options)
    return model, time.perf_counter() - start, tensor_bytes(model)


def compare_with_nncf(model_factory: ModelFactory, evaluate: Evaluate, dataset: list,
                      cases: tuple[Case, ...] = PARITY_CASES) -> list[dict]:
    """One row per case: KL to the float model, top-1, perplexity change and size of lowbit and NNCF, and
    lowbit's time / NNCF's; ``lowbit <= nncf``: lowbit's KL and size both at most NNCF's."""
    rows = []
    for case in cases:
        model, lowbit_seconds, lowbit_bytes = lowbit_compress(model_factory(), case, dataset)
        ours = evaluate(model)
        nncf_model, nncf_seconds, nncf_bytes = nncf_compress(model_factory(), case, dataset)
        theirs = evaluate(nncf_model)
        rows.append({
            "case": case.name,
            "float ppl": ours.reference_perplexity,
            "lowbit KL": _significant(ours.mean_kl),
            "nncf KL": _significant(theirs.mean_kl),
            "lowbit top-1 %": round(100 * ours.top1, 2),
            "nncf top-1 %": round(100 * theirs.top1, 2),
            "lowbit delta %": round(_delta_pct(ours), 3),
            "nncf delta %": round(_delta_pct(theirs), 3),
            "lowbit MiB": round(lowbit_bytes / MIB, 3),
            "nncf MiB": round(nncf_bytes / MIB, 3),
            "lowbit held MiB": round(tensor_bytes(model) / MIB, 3),
            "lowbit <= nncf": "yes" if ours.mean_kl <= theirs.mean_kl and lowbit_bytes <= nncf_bytes else "no",
            "time lowbit/nncf": round(lowbit_seconds / nncf_seconds, 2),
        })
    return rows


def _significant(kl: float) -> float:
    """``kl`` to 4 significant digits: INT8 cases sit near 1e-4, where 5 decimals leave 2 digits."""
    return float(f"{kl:.4g}")


def _delta_pct(scores: Divergence) -> float:
    return 100 * (scores.perplexity / scores.reference_perplexity - 1)


def _compress_with_plan(model: nn.Module, plan, dataset: list | None) -> nn.Module:
    return lowbit.fold_weight(apply_plan(model, plan, dataset))


def selection_study(model_factory: ModelFactory, evaluate: Evaluate, dataset: list, ratio: float = 0.8,
                    group_size: int = 128, seeds: tuple[int, ...] = (0, 1, 2)) -> list[dict]:
    """INT4_ASYM: KL and perplexity change for each sensitivity metric and for random layer choices at the same
    ratio; the metrics ranked by KL, then the random choices and their mean."""
    metric_rows, random_rows = [], []

    def row(name: str, scores: Divergence, plan) -> dict:
        defining = [entry for entry in plan.layers if entry.ratio_defining]
        share = sum(e.layer.num_weights for e in defining if e.primary) / sum(e.layer.num_weights for e in defining)
        return {"selection": name, "KL": _significant(scores.mean_kl), "top-1 %": round(100 * scores.top1, 2),
                "ppl": scores.perplexity, "delta %": round(_delta_pct(scores), 3),
                "MiB": round(plan.summary().compressed_bytes / MIB, 3), "4-bit layers": len(plan.primary_names),
                "4-bit share %": round(100 * share, 1)}

    for metric in SensitivityMetric:
        model = model_factory()
        items = dataset if metric.is_data_aware else None
        options = check_options("int4_asym", group_size, ratio, items is not None, metric)
        plan = plan_compression(model, options, items)
        metric_rows.append(row(metric.value, evaluate(_compress_with_plan(model, plan, None)), plan))
    random_scores = []
    for seed in seeds:
        model = model_factory()
        plan = plan_compression(model, check_options("int4_asym", group_size, 1.0))
        defining = [entry.layer for entry in plan.layers if entry.ratio_defining]
        scores = torch.rand(len(defining), generator=torch.Generator().manual_seed(seed)).tolist()
        chosen = select_primary([layer.num_weights for layer in defining], scores, ratio)
        plan = plan.with_primary(defining[i].name for i in chosen)
        random_scores.append(evaluate(_compress_with_plan(model, plan, None)))
        random_rows.append(row(f"random seed {seed}", random_scores[-1], plan))
    mean_ppl = sum(s.perplexity for s in random_scores) / len(random_scores)
    reference = random_scores[0].reference_perplexity
    random_rows.append({"selection": "random, mean of seeds",
                        "KL": _significant(sum(s.mean_kl for s in random_scores) / len(random_scores)),
                        "top-1 %": round(100 * sum(s.top1 for s in random_scores) / len(random_scores), 2),
                        "ppl": mean_ppl, "delta %": round(100 * (mean_ppl / reference - 1), 3)})
    return sorted(metric_rows, key=lambda r: r["KL"]) + random_rows


def opposite_order_line(rows: list[dict], name: str, delta: str, kl: str) -> str:
    """The pairs of rows that ``delta`` and ``kl`` rank in opposite order, as one line."""
    pairs = opposite_order_pairs({row[name]: (row[delta], row[kl]) for row in rows if row.get(kl) is not None})
    return f"pairs that {delta} and {kl} rank in opposite order: " + ("; ".join(f"{a} vs {b}" for a, b in pairs)
                                                                      or "none")


def _default_setup(model_name: str, max_tokens: int | None, calibration_samples: int):
    from lowbit.data import calibration_batches
    from lowbit.data.texts import default_calibration_text, default_eval_text
    from lowbit.report import model_loader

    load = model_loader(model_name)
    reference, tokenizer = load()
    text = default_eval_text()

    def model_factory() -> nn.Module:
        return load()[0].float()

    def evaluate(model: nn.Module) -> Divergence:
        return divergence(model, reference.float(), tokenizer, text, seq_len=256, stride=256, max_tokens=max_tokens,
                          progress=False)

    dataset = calibration_batches(tokenizer, default_calibration_text(), num_samples=calibration_samples,
                                  seq_len=256, batch_size=1, seed=0)
    return model_factory, evaluate, dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=("parity", "selection"), default=None)
    parser.add_argument("--model", default="default",
                        help="'default' (the bundled model) or NAME for lowbit.assets.load_NAME_model")
    parser.add_argument("--max-tokens", type=int, default=None, help="evaluate on the first N held-out tokens")
    parser.add_argument("--calibration-samples", type=int, default=64, help="dataset items of 256 tokens")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--cases", type=lambda text: [name.strip() for name in text.split(",")],
                        help=f"comma-separated parity cases (default: all of {[case.name for case in PARITY_CASES]})")
    args = parser.parse_args()
    by_name = {case.name: case for case in PARITY_CASES}
    unknown = sorted(set(args.cases or ()) - set(by_name))
    if unknown:
        parser.error(f"--cases: unknown {unknown}; allowed are {list(by_name)}")
    cases = tuple(by_name[name] for name in args.cases) if args.cases else PARITY_CASES
    torch.set_num_threads(args.threads)
    try:
        model_factory, evaluate, dataset = _default_setup(args.model, args.max_tokens, args.calibration_samples)
    except ValueError as error:
        parser.error(str(error))
    cpu = platform.processor() or platform.machine()
    print(f"# model {args.model!r}, KL to the float model and perplexity on held-out text "
          f"({args.max_tokens or 'all'} tokens, windows of 256), "
          f"{args.calibration_samples} calibration items of 256 tokens; CPU {cpu}, torch {torch.__version__}, "
          f"{args.threads} thread(s)")
    if args.only in (None, "parity"):
        import nncf

        print(f"\n## lowbit vs nncf {nncf.__version__}\n")
        rows = []
        for case in cases:  # one at a time, each row printed when done: a run cut short keeps its rows
            rows += compare_with_nncf(model_factory, evaluate, dataset, (case,))
            print(rows[-1], flush=True)
        print(format_table(rows), flush=True)
        scores = [{"name": f"{library} {row['case']}", "delta": row[f"{library} delta %"], "KL": row[f"{library} KL"]}
                  for row in rows for library in ("lowbit", "nncf")]
        print("\n" + opposite_order_line(scores, "name", "delta", "KL"), flush=True)
    if args.only in (None, "selection"):
        print("\n## layer selection, int4_asym g128 ratio 0.8\n")
        rows = selection_study(model_factory, evaluate, dataset)
        print(format_table(rows), flush=True)
        print("\n" + opposite_order_line(rows, "selection", "delta %", "KL"), flush=True)


if __name__ == "__main__":
    main()
