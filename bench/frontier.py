"""The accuracy frontier at 4 bits and below: RTN, GPTQ, AWQ and lowbit's newer methods (HQQ, QuaRot and SpinQuant
rotations, NVFP4 / MXFP4 block scale search, and their combinations) next to ModelOpt and NNCF, on one bundled model.

    python bench/frontier.py [--model default|gpt2] [--eval-tokens 2048] [--calib-samples 8]
                             [--libraries lowbit,modelopt,nncf] [--formats "W4A16 g128"] [--methods "RTN;GPTQ"]
                             [--out bench/results]
    python bench/frontier.py --combine bench/results/STEM RUN.jsonl [RUN.jsonl ...]

Each run writes ``<out>/frontier_<model>[_<formats>]_<date>.md`` and ``.jsonl`` (its records); ``--combine``
renders one report (``STEM.md`` and ``.jsonl``) from the records of several runs of one model, e.g. one per
format run one after the other on a shared machine.

Formats: W4A16 g128 (INT4 symmetric, the RTN baseline of the targets), W3A16 g128 and W2A16 g64 (asymmetric
integers, ``INT3_/INT2_BLOCKWISE_WEIGHT_ONLY_CFG``), W4A4 NVFP4 and W4A4 MXFP4 (lowbit's presets, dynamic
activation blocks). Every case quantizes a fresh copy of the same float32 model with the same calibration
windows (bundled calibration text) and is scored on the same held-out tokens against the float model, run beside
it window by window (``lowbit.eval.divergence``): mean per-token KL(float || quantized) first, the perplexity
change beside it, and the calibration + quantization wall time as a ratio to RTN's (same format, one run each:
the machine is shared, so times are indicative). Peers run in the same process: ModelOpt (its max calibration at
every format, its awq_lite at W4; its integers are symmetric only) and NNCF (``compress_weights`` INT4_SYM g128,
data-free and with AWQ + scale estimation; NNCF has no 3- or 2-bit integer mode and no W4A4 FP4 for torch). A case
that cannot run records why. GPTQ on NVFP4 / MX fixes each block's scale when its column loop reaches the block
(``lowbit.algorithms.gptq_micro``).

Under the tables, the issue's targets, each by KL and by perplexity delta: the best lowbit W4A16 g128 entry
<= 0.40x RTN's, W3A16 g128 <= 0.45x RTN's, the best W4A4 NVFP4 <= 1.2x W4A16 g128 RTN's; and whether the best
lowbit entry is below every peer's at each format. Options are the defaults, except in the rows of the GPTQ KL
study (``micro_gptq_cases``: act-order, damping 0.1, quantized layer inputs), whose best is chosen by the held-out
KL and says so by its name.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

import lowbit
from lowbit.eval import format_table
from lowbit.presets import AWQ_LITE_AS_MODELOPT
from lowbit.report import Measurement, Workload, measure_baseline, run_context

sys.path.insert(0, str(Path(__file__).parent))
from accuracy import LIBRARY_PACKAGES, Case, accuracy_cells, library_version, parse_bench_args, run_case  # noqa: E402
from algorithms import nncf_case  # noqa: E402

W4, W3, W2, NVFP4, MXFP4 = "W4A16 g128", "W3A16 g128", "W2A16 g64", "W4A4 NVFP4", "W4A4 MXFP4"
FORMATS = {W4: ("INT4_BLOCKWISE_WEIGHT_ONLY_CFG", 4, 128), W3: ("INT3_BLOCKWISE_WEIGHT_ONLY_CFG", 3, 128),
           W2: ("INT2_BLOCKWISE_WEIGHT_ONLY_CFG", 2, 64), NVFP4: ("NVFP4_DEFAULT_CFG", None, None),
           MXFP4: ("MXFP4_DEFAULT_CFG", None, None)}
INTEGER = (W4, W3, W2)
TARGETS = ((W4, W4, 0.40), (W3, W3, 0.45), (NVFP4, W4, 1.2))  # (format, RTN baseline's format, ratio)
ROTATE = {"rotate": True}
SPINQUANT_STEPS = 40  # Cayley SGD steps in the SpinQuant rows (the library's default is 100): ~10-minute runs
SPINQUANT = {"rotate": {"method": "spinquant", "steps": SPINQUANT_STEPS}}
GPTQ_SE = {"method": "gptq", "scale_estimation": True}
DEFAULT_CALIB_SAMPLES = 8
FLOAT_TARGETS_ONE_BATCH = {"layer_inputs": "quantized_float_targets", "batches_per_step": 1}  # AutoRound's options
AUTOROUND_400 = {**FLOAT_TARGETS_ONE_BATCH, "iterations": 400, "lr": 0.0025, "minmax_lr": 0.0025}


def format_config(format: str) -> dict:
    """The format's lowbit preset; integer weights with static group scales (what GPTQ keeps)."""
    config = lowbit.get_preset(FORMATS[format][0])
    weight = config["quant_cfg"]["*weight_quantizer"]
    if format in INTEGER:
        weight["block_sizes"] = {**weight["block_sizes"], "type": "static"}
    return config


def lowbit_case(format: str, method: str, algorithm: str | dict, then: tuple = ()) -> Case:
    """``lowbit.quantize`` with the format's config and ``algorithm``, then ``lowbit.calibrate`` with each of
    ``then`` in turn (composition: e.g. AWQ's scales, then the block scale search on the scaled weights)."""

    def apply(model: nn.Module, workload: Workload) -> nn.Module:
        config = format_config(format)
        config["algorithm"] = copy.deepcopy(algorithm)
        lowbit.quantize(model, config, workload.forward_loop())
        for step in then:
            lowbit.calibrate(model, copy.deepcopy(step), workload.forward_loop())
        return model

    return Case(format, "lowbit", method, apply, lowbit.fold_weight)


def modelopt_case(format: str, method: str, preset: str, bits: int | None = None, group: int | None = None) -> Case:
    """``mtq.quantize`` with ModelOpt's preset ``preset``; ``bits`` / ``group`` change its integer weight format."""

    def config() -> dict:
        import modelopt.torch.quantization as mtq

        result = copy.deepcopy(getattr(mtq, preset))
        if bits is not None:
            entries = [e for e in result["quant_cfg"] if e.get("quantizer_name") == "*weight_quantizer"]
            entries[0]["cfg"] = {**entries[0]["cfg"], "num_bits": bits, "block_sizes": {-1: group, "type": "static"}}
        return result

    def apply(model: nn.Module, workload: Workload) -> nn.Module:
        import modelopt.torch.quantization as mtq

        return mtq.quantize(model, config(), workload.forward_loop())

    def fold(model: nn.Module) -> nn.Module:
        import modelopt.torch.quantization as mtq

        mtq.fold_weight(model)
        return model

    return Case(format, "modelopt", method, apply, fold)


def new_method_cases() -> list[Case]:
    """AutoRound (auto-round's defaults, its 'light' recipe of 50 steps, after QuaRot) and LoRA correction
    (NNCF's rank 8, and rank 2) at the integer formats; SVDQuant at W4A4 (rank 32 as published, rank 4 for the
    bundled model's width of 256, and followed by the block scale search)."""
    found = []
    for format in INTEGER:
        found += [
            lowbit_case(format, "AutoRound", "autoround"),
            lowbit_case(format, "AutoRound light (50 steps)", {"method": "autoround", "iterations": 50}),
            lowbit_case(format, "QuaRot + AutoRound", {"method": "autoround", **ROTATE}),
            lowbit_case(format, "LoRA correction (rank 8)", "lora_correction"),
            lowbit_case(format, "LoRA correction (rank 2)", {"method": "lora_correction", "rank": 2}),
        ]
    for format in (NVFP4, MXFP4):
        found += [
            lowbit_case(format, "SVDQuant (rank 32)", "svdquant"),
            lowbit_case(format, "SVDQuant (rank 4)", {"method": "svdquant", "rank": 4}),
            lowbit_case(format, "SVDQuant + block scale search", "svdquant", then=("block_scale_search",)),
            *[lowbit_case(format, f"SVDQuant (rank {rank}) + block scale search", {"method": "svdquant", "rank": rank},
                          then=("block_scale_search",)) for rank in (2, 4, 8)],
        ]
    return found


def autoround_cases() -> list[Case]:
    """AutoRound's options at W4 / W3 g128 (``bench/results/frontier_w4w3_2026-12-07.md``): on the quantized
    blocks' inputs, fitted to the float model's block outputs (``layer_inputs="quantized_float_targets"``), and
    one calibration batch of 8 windows a step (``batches_per_step=1``: with ``--calib-samples 32`` each step costs
    what a step on 8 windows does), and started from GPTQ + scale estimation's codes and grid (``start="gptq"``);
    ``AUTOROUND_400``: 400 steps at auto-round's rate rule lr = 1 / steps (its 'best' recipe: 1000 steps, 0.001)."""
    autoround = {"method": "autoround"}
    return [lowbit_case(format, name, algorithm, then) for format in (W4, W3) for name, algorithm, then in (
        ("AutoRound, quantized inputs", {**autoround, "layer_inputs": "quantized"}, ()),
        ("AutoRound, quantized inputs, float targets", {**autoround, "layer_inputs": "quantized_float_targets"}, ()),
        ("AutoRound, float targets, 1 batch a step", {**autoround, **FLOAT_TARGETS_ONE_BATCH}, ()),
        ("AutoRound, float targets, 1 batch a step, 400 steps", {
            **autoround, **FLOAT_TARGETS_ONE_BATCH, "iterations": 400}, ()),
        ("AutoRound, 1 batch a step", {**autoround, "batches_per_step": 1}, ()),
        ("QuaRot + AutoRound, float targets, 1 batch a step", {
            **autoround, **FLOAT_TARGETS_ONE_BATCH, **ROTATE}, ()),
        ("QuaRot + AutoRound, float targets, 1 batch a step, 400 steps lr 0.0025", {
            **autoround, **AUTOROUND_400, **ROTATE}, ()),
        ("AutoRound from GPTQ + scale estimation", {**autoround, "start": "gptq"}, ()),
        ("AutoRound from GPTQ + scale estimation, float targets", {**autoround, "start": "gptq",
                                                                   "layer_inputs": "quantized_float_targets"}, ()),
        ("AutoRound from GPTQ + scale estimation, float targets, 1 batch a step", {
            **autoround, "start": "gptq", **FLOAT_TARGETS_ONE_BATCH}, ()),
    )]


def lsq_cases() -> list[Case]:
    """LSQ (``lowbit.algorithms.lsq``) at W4 / W3 g128: the steps tuned end to end against the float model's
    next-token distribution (KL), from round-to-nearest (LSQ proper, latent float weights) and, with the start's
    codes kept, from QuaRot + GPTQ + scale estimation and from QuaRot + AutoRound (float targets, 1 batch a step);
    100 Adam steps of 1 calibration batch (8 windows), lr 0.001 on the log-steps; the last two rows at distillation
    temperature 2, from AutoRound's 200 and 400 steps (``bench/results/frontier_w4_2026-12-07c.md``)."""
    steps = {"iterations": 100}
    return [lowbit_case(format, name, {"method": "lsq", **steps, **algorithm}) for format in (W4, W3)
            for name, algorithm in (
        ("LSQ from RTN", {"start": "max"}),
        ("LSQ from RTN, weights too", {"start": "max", "weight_lr": 0.001}),
        ("QuaRot + GPTQ + scale estimation + LSQ", {"start": "gptq", "start_options": {
            "scale_estimation": True, "percdamp": 0.1}, "latent": "codes", **ROTATE}),
        ("QuaRot + AutoRound + LSQ", {"start": "autoround", "start_options": FLOAT_TARGETS_ONE_BATCH,
                                      "latent": "codes", **ROTATE}),
        ("QuaRot + AutoRound + LSQ, T = 2", {"start": "autoround", "start_options": FLOAT_TARGETS_ONE_BATCH,
                                             "latent": "codes", "temperature": 2.0, **ROTATE}),
        ("QuaRot + AutoRound 400 steps + LSQ, T = 2", {"start": "autoround", "start_options": AUTOROUND_400,
                                                       "latent": "codes", "temperature": 2.0, **ROTATE}),
    )]


def cases() -> list[Case]:
    found = []
    for format in INTEGER:
        bits, group = FORMATS[format][1:]
        found += [
            lowbit_case(format, "RTN", "max"),
            lowbit_case(format, "GPTQ", "gptq"),
            lowbit_case(format, "AWQ", AWQ_LITE_AS_MODELOPT),
            lowbit_case(format, "HQQ", "hqq"),
            lowbit_case(format, "QuaRot (RTN)", {"method": "max", **ROTATE}),
            lowbit_case(format, "QuaRot + HQQ", {"method": "hqq", **ROTATE}),
            lowbit_case(format, "GPTQ + scale estimation", GPTQ_SE),
            lowbit_case(format, "GPTQ + HQQ grid", {"method": "gptq", "hqq": True}),
            lowbit_case(format, "QuaRot + GPTQ + scale estimation", {**GPTQ_SE, **ROTATE}),
            modelopt_case(format, "ModelOpt max (sym)", "INT4_BLOCKWISE_WEIGHT_ONLY_CFG", bits, group),
        ]
    found.append(modelopt_case(W4, "ModelOpt awq_lite", "INT4_AWQ_CFG"))
    found.append(_nncf(W4, "NNCF INT4_SYM data-free", "INT4_SYM"))
    found.append(_nncf(W4, "NNCF INT4_SYM AWQ + scale estimation", "INT4_SYM", awq=True, scale_estimation=True))
    found += new_method_cases() + autoround_cases() + lsq_cases()
    for format in (NVFP4, MXFP4):
        found += [
            lowbit_case(format, "RTN", "max"),
            lowbit_case(format, "GPTQ", "gptq"),
            lowbit_case(format, "AWQ", AWQ_LITE_AS_MODELOPT),
            lowbit_case(format, "QuaRot (RTN)", {"method": "max", **ROTATE}),
            lowbit_case(format, "block scale search (MSE)", "block_scale_search"),
            *([lowbit_case(format, "Four over Six", {"method": "block_scale_search", "search": "4over6"})]
              if format == NVFP4 else []),
            lowbit_case(format, "QuaRot + block scale search", {"method": "block_scale_search", **ROTATE}),
            lowbit_case(format, "AWQ + block scale search", AWQ_LITE_AS_MODELOPT, then=("block_scale_search",)),
            modelopt_case(format, "ModelOpt max", FORMATS[format][0]),
        ]
    found.append(modelopt_case(NVFP4, "ModelOpt awq_lite", "NVFP4_AWQ_LITE_CFG"))
    found += micro_gptq_cases() + spinquant_cases()
    return found


def spinquant_cases() -> list[Case]:
    """SpinQuant's learned R1 / R2 (``lowbit.rotation.spinquant``: ``SPINQUANT_STEPS`` Cayley SGD steps on the
    calibration KL, lr 1.5, one calibration batch a step) before RTN and before GPTQ, at W4A16 g128 and W4A4 NVFP4;
    beside them QuaRot without its online down_proj Hadamard (SpinQuant's start: the same R1 / R2, no step) and
    QuaRot (with it) + GPTQ."""
    return [lowbit_case(format, name, algorithm) for format in (W4, NVFP4) for name, algorithm in (
        ("QuaRot, no online Hadamard (RTN)", {"method": "max", "rotate": {"down_proj": False}}),
        ("SpinQuant", {"method": "max", **SPINQUANT}),
        ("QuaRot + GPTQ", {"method": "gptq", **ROTATE}),
        ("SpinQuant + GPTQ", {"method": "gptq", **SPINQUANT}))]


def micro_gptq_cases() -> list[Case]:
    """GPTQ on NVFP4 / MX weights (``lowbit.algorithms.gptq_micro``) with each block's scale searched when the
    column loop reaches it (by the block's squared error, or by GPTQ's loss), with act-order, with QuaRot, and
    rounding the least-squares weight for the quantized inputs (``input_error``, ``gptq_target``);
    then the KL study of GPTQ's options at W4 / W3 g128 (act-order, Hessian damping, layer inputs, with QuaRot
    and scale estimation or HQQ's grid)."""
    search = {"method": "gptq", "block_scales": "mse"}
    found = [lowbit_case(format, name, algorithm) for format in (NVFP4, MXFP4) for name, algorithm in (
        ("GPTQ + block scale search", search),
        ("GPTQ + block scales by GPTQ loss", {"method": "gptq", "block_scales": "loss"}),
        ("GPTQ act-order + block scale search", {**search, "act_order": True, "static_groups": True}),
        ("QuaRot + GPTQ + block scale search", {**search, **ROTATE}),
        ("GPTQ + block scale search + input error", {**search, "input_error": True}))]
    act_order = {**GPTQ_SE, "act_order": True}
    return found + [lowbit_case(format, name, algorithm) for format in (W4, W3) for name, algorithm in (
        ("GPTQ act-order + scale estimation", act_order),
        ("QuaRot + GPTQ act-order + scale estimation", {**act_order, **ROTATE}),
        ("QuaRot + GPTQ act-order + HQQ grid", {"method": "gptq", "hqq": True, "act_order": True, **ROTATE}),
        ("QuaRot + GPTQ + scale estimation, damp 0.1", {**GPTQ_SE, "percdamp": 0.1, **ROTATE}),
        ("QuaRot + GPTQ + scale estimation, quantized inputs", {**GPTQ_SE, "layer_inputs": "quantized", **ROTATE}))]


def _nncf(format: str, method: str, mode: str, **options) -> Case:
    case = nncf_case(format, mode, **options)
    return Case(format, "nncf", method, case.apply, case.prepare_eval)


def rtn_seconds(all_cases: list[Case], results: list[Measurement]) -> dict[str, float]:
    """Each format's lowbit RTN process CPU time, the unit of the time ratios (steadier than wall time when
    other processes share the cores)."""
    return {c.format: r.cpu_seconds for c, r in zip(all_cases, results, strict=True)
            if c.library == "lowbit" and c.config == "RTN" and r.cpu_seconds}


def detail_rows(all_cases: list[Case], results: list[Measurement], baseline: Measurement) -> list[dict]:
    """One row per case, by format then KL: the accuracy cells, wall time and its ratio to RTN's."""
    rtn = rtn_seconds(all_cases, results)
    order = sorted(range(len(all_cases)), key=lambda i: (list(FORMATS).index(all_cases[i].format),
                                                         results[i].kl is None, results[i].kl or 0.0))
    rows = []
    for index in order:
        case, result = all_cases[index], results[index]
        ratio = result.cpu_seconds / rtn[case.format] if result.cpu_seconds and rtn.get(case.format) else None
        rows.append({"format": case.format, "method": case.config, **accuracy_cells(result, baseline),
                     "wall s": None if result.seconds is None else round(result.seconds, 1),
                     "cpu s": None if result.cpu_seconds is None else round(result.cpu_seconds, 1),
                     "x RTN cpu": None if ratio is None else round(ratio, 1),
                     "note": (result.error or "")[:90]})
    return rows


def matrix_rows(all_cases: list[Case], results: list[Measurement], baseline: Measurement) -> list[dict]:
    """Methods down, formats across: ``KL / d ppl / time x RTN`` per cell ("-" where a case does not exist)."""
    rtn = rtn_seconds(all_cases, results)
    cells: dict[str, dict[str, str]] = {}
    for case, result in zip(all_cases, results, strict=True):
        if result.kl is None:
            text = "n/a"
        else:
            ratio = result.cpu_seconds / rtn[case.format] if rtn.get(case.format) else float("nan")
            text = f"{result.kl:.3g} / {result.as_row(baseline)['delta']:+.3f} / {ratio:.1f}x"
        cells.setdefault(case.config, {})[case.format] = text
    return [{"method": method, **{f: row.get(f, "-") for f in FORMATS}} for method, row in cells.items()]


def verdicts(all_cases: list[Case], results: list[Measurement], baseline: Measurement) -> list[str]:
    """The issue's ratios (by KL and by perplexity delta) and the best-below-every-peer check, as Markdown."""
    scores = {(c.format, c.library, c.config): (r.kl, r.as_row(baseline)["delta"])
              for c, r in zip(all_cases, results, strict=True) if r.kl is not None}

    def best(format: str, library: str) -> tuple[str, float, float] | None:
        found = [(k[2], kl, d) for k, (kl, d) in scores.items() if k[0] == format and k[1] == library]
        return min(found, key=lambda item: item[1]) if found else None

    lines = ["Targets, by KL (the best lowbit entry by KL) and by perplexity delta (the best by delta):", ""]
    for format, base_format, target in TARGETS:
        top, rtn = best(format, "lowbit"), scores.get((base_format, "lowbit", "RTN"))
        if top is None or rtn is None:
            lines.append(f"- {format} <= {target}x {base_format} RTN: not measured")
            continue
        by_kl = top[1] / rtn[0]
        best_delta = min((d, m) for (f, lib, m), (_, d) in scores.items() if f == format and lib == "lowbit")
        by_ppl = (f"best d ppl `{best_delta[1]}` {best_delta[0]:+.3f} = {best_delta[0] / rtn[1]:.3f}x "
                  f"({'holds' if best_delta[0] / rtn[1] <= target else 'fails'})" if rtn[1] > 0 else
                  f"d ppl: n/a (RTN's d ppl {rtn[1]:+.3f} is not above 0)")
        lines.append(f"- {format} <= {target}x {base_format} RTN: best `{top[0]}` KL {top[1]:.3g} = {by_kl:.3f}x "
                     f"({'holds' if by_kl <= target else 'fails'}; its d ppl {top[2]:+.3f}); {by_ppl}")
    lines += ["", "Best lowbit entry vs each peer's best, by KL:", ""]
    for format in FORMATS:
        ours = best(format, "lowbit")
        for library in ("modelopt", "nncf"):
            theirs = best(format, library)
            if ours and theirs:
                verdict = "below" if ours[1] < theirs[1] else "NOT below"
                lines.append(f"- {format}: lowbit `{ours[0]}` {ours[1]:.3g} {verdict} {library} `{theirs[0]}` "
                             f"{theirs[1]:.3g} (d ppl {ours[2]:+.3f} vs {theirs[2]:+.3f})")
    return lines


def report(model: str, context: dict, runs: list[dict], baseline: Measurement, selected: list[Case],
           results: list[Measurement]) -> str:
    """The Markdown report: each run's command, machine and workload, then the tables and the verdicts."""
    run_lines = [f"- run: `{run['command']}` on {run['machine']}, load average at the end {run['load_average']}; "
                 f"{run['workload']}; {run['versions']}" for run in runs]
    return "\n".join([
        f"# Accuracy frontier (4 bits and below), model `{model}`, {context['date'][:10]}",
        "",
        f"- report: `{context['command']}`",
        *run_lines,
        f"- float perplexity {baseline.perplexity:.3f}; shared machine: times are one run each, indicative",
        "- cells: mean per-token KL(float || quantized) in nats / perplexity delta / calibration + quantization "
        "time (process CPU time, all threads) as a multiple of RTN's at the same format",
        "",
        "```",
        format_table(matrix_rows(selected, results, baseline)),
        "```",
        "",
        *verdicts(selected, results, baseline),
        "",
        "Every case, by format then KL:",
        "",
        "```",
        format_table(detail_rows(selected, results, baseline)),
        "```",
        "",
    ])


def write_results(out: Path, stem: str, text: str, records: list[dict]) -> None:
    """``stem.md`` (the report) and ``stem.jsonl`` (the run records then one record per case, for --combine)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.md").write_text(text, encoding="utf-8")
    (out / f"{stem}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    print(text)
    print(f"written to {out / stem}.md and .jsonl")


def read_records(paths: list[Path]) -> tuple[list[dict], Measurement, list[Case], list[Measurement]]:
    """The runs, the float baseline and the cases with their measurements from ``--combine``'s files."""
    runs, baseline, selected, results = [], None, [], []
    known = {(c.format, c.library, c.config): c for c in cases()}
    for path in paths:
        for line in path.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            if "command" in record:
                runs.append(record)
                baseline = Measurement("none", "original", record["float_perplexity"])
            elif (record["format"], record["library"], record["config"]) not in {
                    (c.format, c.library, c.config) for c in selected}:
                selected.append(known[(record["format"], record["library"], record["config"])])
                results.append(Measurement(**{k: v for k, v in record.items() if k != "format"}))
    order = sorted(range(len(selected)), key=lambda i: list(known.values()).index(selected[i]))
    return runs, baseline, [selected[i] for i in order], [results[i] for i in order]


def _methods_option(argv: list[str]) -> tuple[set[str] | None, list[str]]:
    """``--methods "A;B"`` (method names as in the table, ``;``-separated) taken out of ``argv``: run only those
    rows (the other rows of a combined report come from earlier runs of the same workload)."""
    if "--methods" not in argv:
        return None, argv
    index = argv.index("--methods")
    names = {name.strip() for name in argv[index + 1].split(";")}
    unknown = sorted(names - {case.config for case in cases()})
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; allowed: {sorted({case.config for case in cases()})}")
    return names, argv[:index] + argv[index + 2:]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--combine"]:  # --combine OUT_STEM FILE.jsonl ...: one report from several runs of one model
        runs, baseline, selected, results = read_records([Path(p) for p in argv[2:]])
        context = run_context(["python", "bench/frontier.py", *argv])
        model = runs[0]["model"]
        records = runs + [{"format": c.format, **dataclasses.asdict(r)} for c, r in zip(selected, results, strict=True)]
        write_results(Path(argv[1]).parent, Path(argv[1]).name, report(model, context, runs, baseline, selected,
                                                                      results), records)
        return 0
    methods, argv = _methods_option(argv)
    args, selected = parse_bench_args(__doc__.split("\n\n")[0], argv, cases(), 1, "unused: one run per case",
                                      eval_tokens=2048)
    if methods is not None:
        selected = [case for case in selected if case.config in methods]
    formats = {case.format for case in selected}
    if NVFP4 in formats and W4 not in formats:  # the NVFP4 target is relative to W4A16 g128 RTN
        selected.insert(0, next(c for c in cases() if c.format == W4 and c.config == "RTN"))
    if "--calib-samples" not in argv:  # the shared parser's default is 32; GPTQ on 2 shared cores wants fewer
        args.calib_samples = DEFAULT_CALIB_SAMPLES
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    workload = Workload.default(args.calib_samples, args.eval_tokens, progress=False, model=args.model)
    baseline = measure_baseline(workload)
    results = []
    for case in selected:
        results.append(run_case(case, workload))
        print(f"{case.format} | {case.config}: {results[-1]}", flush=True)
    context = run_context(["python", "bench/frontier.py", *argv])
    versions = ", ".join(f"{lib} {library_version(lib) or 'not installed'}" for lib in LIBRARY_PACKAGES)
    run = {"command": context["command"], "machine": context["machine"], "load_average": context["load_average"],
           "versions": f"python {context['python']}, torch {context['torch']}, {versions}",
           "model": args.model, "float_perplexity": baseline.perplexity,
           "workload": f"{len(workload.calibration)} calibration batches of 8 x 256 tokens, scored on the first "
                       f"{workload.eval_tokens} held-out tokens (seq_len 256, stride 128)"}
    part = "" if args.formats is None else "_" + "_".join(f.replace(" ", "_").lower() for f in args.formats)
    records = [run] + [{"format": c.format, **dataclasses.asdict(r)} for c, r in zip(selected, results, strict=True)]
    write_results(args.out, f"frontier_{args.model}{part}_{context['date'][:10]}",
                  report(args.model, context, [run], baseline, selected, results), records)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
