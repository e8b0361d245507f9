"""auto_quantize on the bundled model: against pure formats and random assignments, and against ModelOpt's.

    python bench/auto_quantize.py [--part lowbit|modelopt|awq|all] [--calib-samples 8] [--batch-size 2]
                                  [--steps 4] [--eval-tokens 4096] [--eval-parts 1] [--repeats 1]
                                  [--threads 1] [--out bench/results]

Data: calibration windows of 256 tokens from the bundled calibration text (seed 0), ``--batch-size`` per
batch; both libraries get the same batches, ``num_calib_steps = num_score_steps = --steps``,
``forward_step = model(**batch, labels=input_ids)``, ``loss_func = output.loss``. Scoring: the first
``--eval-tokens`` held-out tokens, windows of 256, stride 128, against the float model side by side
(``lowbit.eval.divergence``): mean per-token KL (nats) and perplexity. With ``--eval-parts P`` the held-out
text is cut into P equal parts and the first ``--eval-tokens`` of each are scored (KL: the mean over parts;
perplexity: exp of the mean log perplexity); rows compared with a ModelOpt model then also give the part-by-part
difference, mean ± standard error over the parts: two models equal up to rounding (FP8 activation codes flip at
midpoints and the flips grow through the layers) differ by ~0.5 % KL per 4,096-token part, so a gap below
that on one part is not a difference. Effective bits are lowbit's
(scales included, ``lowbit.search.cost``); for ModelOpt's models also ModelOpt's own count (elements only).

Part ``lowbit`` (formats NVFP4_DEFAULT_CFG + FP8_DEFAULT_CFG + none, budget 4.8): one gradient search
(``lowbit.search.auto.search``), then the calibrated candidates switched to: every searched layer in NVFP4,
every one in FP8, the search's choice, three random assignments (seeds 0, 1, 2: groups visited in random
order, each moved to a random costlier choice that keeps the budget), and a KL-scored search
(``method="kl_div"``, one score batch). Then the Pareto sweep (the same scores re-solved at each budget,
measured perplexity beside the predicted score) drawn to ``auto_quantize_pareto.png`` and
``auto_quantize_layers.png``.

Part ``modelopt`` (needs nvidia-modelopt; formats INT4_AWQ_CFG + FP8_DEFAULT_CFG + none, budgets 5, 6, 7):
per budget, a fresh float model through lowbit's search and choice (``lowbit.search.auto.search`` then
``apply``: what ``auto_quantize`` runs, with its default ``score_dtype="auto"``) and a fresh one through
``modelopt.torch.quantization.auto_quantize``, one after the other in this process (``--repeats`` pairs,
lowbit first in even pairs, ModelOpt first in odd ones, after one untimed warm-up run of each), each timed
from the call to its return (calibration + scoring + search): wall seconds and the process's CPU seconds
(``time.process_time``, less sensitive to other work on a shared machine), then both scored. Compare times
as ratios taken side by side. ModelOpt counts element bits only (INT4 4, FP8 8), lowbit scales too (INT4 g128
4.125, as the issue defines effective bits), so at one budget ModelOpt's model holds more bits by lowbit's count.
Two more rows per budget compare at equal size: ModelOpt's search with its INT4 format's cost set to 4.125 bits
(its own ``QuantizeConfig.effective_bits`` override; untimed, the same work), so that both libraries fill the
same budget by the same count; and lowbit's scores re-solved at the bits ModelOpt's default run reached.
"""

from __future__ import annotations

import argparse
import copy
import math
import random
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

import lowbit
from lowbit.data import calibration_batches, default_calibration_text, default_eval_text
from lowbit.eval import divergence, format_table
from lowbit.presets import get_preset
from lowbit.report import run_context
from lowbit.search.auto import search

SEQ_LEN, STRIDE = 256, 128
NVFP4_FP8 = ["NVFP4_DEFAULT_CFG", "FP8_DEFAULT_CFG"]
INT4_FP8 = ["INT4_AWQ_CFG", "FP8_DEFAULT_CFG"]
BUDGET = 4.8
PEER_BUDGETS = (5.0, 6.0, 7.0)
INT4_WITH_SCALES = 4 + 16 / 128  # INT4 g128: 4 bits per element and a 16-bit scale per 128
SWEEP = (4.6, 4.8, 5.0, 6.0, 7.0, 8.0)


def forward_step(model, batch):
    return model(**batch, labels=batch["input_ids"])


def loss_func(output, batch):
    return output.loss


class Scorer:
    """KL to the float model and perplexity on held-out tokens (module docstring): the eval text cut into
    ``parts`` equal parts (by characters), the first ``eval_tokens`` tokens of each scored; KL is the mean over
    parts, perplexity ``exp`` of the mean log perplexity (one part: the first ``eval_tokens`` tokens of the text,
    as before the option existed; part 1 of several starts with the same tokens)."""

    def __init__(self, reference, tokenizer, eval_tokens: int, parts: int = 1) -> None:
        self.reference, self.tokenizer, self.eval_tokens = reference, tokenizer, eval_tokens
        text = default_eval_text()
        self.parts = [text[i * len(text) // parts:(i + 1) * len(text) // parts] for i in range(parts)]

    def parts_of(self, model) -> list[tuple[float, float]]:
        """(mean KL, log perplexity) of each part."""
        scores = [divergence(model, self.reference, self.tokenizer, part, seq_len=SEQ_LEN, stride=STRIDE,
                             max_tokens=self.eval_tokens, progress=False) for part in self.parts]
        return [(s.mean_kl, math.log(s.perplexity)) for s in scores]

    def __call__(self, model) -> dict:
        return summary(self.parts_of(model))


def summary(parts: list[tuple[float, float]]) -> dict:
    return {"KL": round(statistics.fmean(p[0] for p in parts), 5),
            "perplexity": round(math.exp(statistics.fmean(p[1] for p in parts)), 3)}


def paired(parts: list[tuple[float, float]], base: list[tuple[float, float]]) -> dict:
    """Part by part against ``base`` (the same parts): KL relative difference and perplexity ratio, mean and
    standard error over the parts (the noise floor of a comparison on this text)."""
    if len(parts) < 2:
        return {}
    kl = [a[0] / b[0] - 1 for a, b in zip(parts, base, strict=True)]
    ppl = [math.exp(a[1] - b[1]) - 1 for a, b in zip(parts, base, strict=True)]
    error = math.sqrt(len(parts))
    return {"KL vs modelopt": f"{100 * statistics.fmean(kl):+.2f} ± {100 * statistics.stdev(kl) / error:.2f} %",
            "ppl vs modelopt": f"{100 * statistics.fmean(ppl):+.3f} ± {100 * statistics.stdev(ppl) / error:.3f} %"}


def random_assignment(state, seed: int, budget: float) -> list[str]:
    """Every group at its cheapest choice, then groups in random order each moved to a random costlier choice
    that keeps the total within the budget."""
    rng = random.Random(seed)
    choice = [min(g.bits, key=g.bits.get) for g in state.groups]
    order = list(range(len(state.groups)))
    rng.shuffle(order)
    for index in order:
        options = [c for c in state.choices if state.groups[index].bits[c] > state.groups[index].bits[choice[index]]]
        rng.shuffle(options)
        for option in options:
            trial = choice[:index] + [option] + choice[index + 1:]
            if state.bits_of(trial) <= budget:
                choice = trial
                break
    return choice


def lowbit_part(batches, score: Scorer, steps: int, out: Path) -> list[dict]:
    from lowbit.search.plots import plot_layer_scores, plot_pareto

    model, _ = lowbit.assets.load_default_model()
    start = time.perf_counter()
    calibrated, state = search(model, {"effective_bits": BUDGET}, NVFP4_FP8, batches, forward_step, loss_func,
                               num_calib_steps=steps, num_score_steps=steps)
    seconds = time.perf_counter() - start
    rows = []

    def measure(name: str, choice: list[str], extra: dict | None = None) -> dict:
        calibrated.apply({m: c for g, c in zip(state.groups, choice, strict=True) for m in g.modules})
        row = {"assignment": name, "effective bits": round(state.bits_of(choice), 4), **score(model),
               **(extra or {})}
        rows.append(row)
        print(row, flush=True)
        return row

    for name in NVFP4_FP8:
        measure(f"every layer {name}", [name] * len(state.groups))
    measure(f"auto_quantize gradient @ {BUDGET}", [g.choice for g in state.groups],
            {"search s": round(seconds, 1)})
    randoms = [measure(f"random seed {seed} @ {BUDGET}", random_assignment(state, seed, BUDGET)) for seed in range(3)]
    rows.append({"assignment": "random, mean of 3 seeds",
                 "effective bits": round(sum(r["effective bits"] for r in randoms) / 3, 4),
                 "KL": round(sum(r["KL"] for r in randoms) / 3, 5),
                 "perplexity": round(sum(r["perplexity"] for r in randoms) / 3, 3)})
    kl_model, _ = lowbit.assets.load_default_model()
    start = time.perf_counter()
    kl_calibrated, kl_state = search(kl_model, {"effective_bits": BUDGET}, NVFP4_FP8, batches, lambda m, b: m(**b),
                                     method="kl_div", num_calib_steps=steps, num_score_steps=1)
    kl_seconds = time.perf_counter() - start
    kl_calibrated.apply(kl_state.assignment)
    row = {"assignment": f"auto_quantize kl_div @ {BUDGET}", "effective bits": round(kl_state.effective_bits, 4),
           **score(kl_model), "search s": round(kl_seconds, 1)}
    rows.append(row)
    print(row, flush=True)
    del kl_calibrated, kl_model

    front = [state.resolve(bits) for bits in SWEEP]
    perplexities = []
    for resolved in front:
        calibrated.apply(resolved.assignment)
        perplexities.append(score(model)["perplexity"])
    plot_pareto(front, out / "auto_quantize_pareto.png", perplexities,
                title="auto_quantize NVFP4 + FP8 + none, bundled model")
    plot_layer_scores(state, out / "auto_quantize_layers.png")
    sweep = [{"budget": b, "effective bits": round(s.effective_bits, 4), "predicted score": f"{s.score:.4g}",
              "perplexity": p} for b, s, p in zip(SWEEP, front, perplexities, strict=True)]
    return rows, sweep


def modelopt_bits(model, int4_bits: float = 4.0) -> tuple[float, float]:
    """(lowbit effective bits with scales, ModelOpt's count: element bits, INT4 at ``int4_bits``) of a
    ModelOpt-quantized model."""
    lowbit_total = modelopt_total = numel_total = 0
    for _, module in model.named_modules():
        quantizer = getattr(module, "weight_quantizer", None)
        if quantizer is None or not isinstance(module, torch.nn.Linear):  # ModelOpt also wraps the embedding
            continue
        weight = module.weight
        numel = weight.numel()
        numel_total += numel
        if not quantizer.is_enabled:
            lowbit_total += 16 * numel
            modelopt_total += 16 * numel
        elif quantizer.num_bits == 4:  # INT4 g128, a 16-bit scale per block
            lowbit_total += 4 * numel + 16 * numel // 128
            modelopt_total += int4_bits * numel
        else:  # FP8 per tensor, one FP32 scale
            lowbit_total += 8 * numel + 32
            modelopt_total += 8 * numel
    return lowbit_total / numel_total, modelopt_total / numel_total


def timed(run, *args) -> tuple[object, float, float]:
    """``run(*args)``'s result, wall seconds and this process's CPU seconds."""
    start, cpu = time.perf_counter(), time.process_time()
    result = run(*args)
    return result, time.perf_counter() - start, time.process_time() - cpu


def modelopt_part(batches, score: Scorer, steps: int, repeats: int) -> list[dict]:
    import modelopt
    import modelopt.torch.quantization as mtq

    # ModelOpt's own cost override (QuantizeConfig.effective_bits): INT4 g128 at 4.125 bits, its scales counted
    # as the effective bits (and lowbit) count them, so both searches hold the same budget
    int4_counted = dict(mtq.INT4_AWQ_CFG, effective_bits=INT4_WITH_SCALES)  # custom: ModelOpt names it CUSTOM_0

    def run_lowbit(budget):
        model, _ = lowbit.assets.load_default_model()
        calibrated, state = search(model, {"effective_bits": budget}, INT4_FP8, batches, forward_step, loss_func,
                                   num_calib_steps=steps, num_score_steps=steps)
        calibrated.apply(state.assignment)  # what auto_quantize does; the candidates stay for the equal-bits row
        return model, calibrated, state

    def run_modelopt(budget, formats=INT4_FP8):
        peer, _ = lowbit.assets.load_default_model()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peer, _ = mtq.auto_quantize(peer, constraints={"effective_bits": budget}, quantization_formats=formats,
                                        data_loader=batches, forward_step=forward_step, loss_func=loss_func,
                                        num_calib_steps=steps, num_score_steps=steps, verbose=False)
        return peer

    def scored(row: dict, model, base=None) -> tuple[dict, list]:
        parts = score.parts_of(model)
        row.update(summary(parts))
        row.update(paired(parts, base) if base is not None else {})
        print(row, flush=True)
        return row, parts

    run_lowbit(PEER_BUDGETS[0])  # untimed warm-up of each library: first-call costs (kernels, caches)
    run_modelopt(PEER_BUDGETS[0])
    rows = []
    for budget in PEER_BUDGETS:
        times = []  # (lowbit wall, lowbit CPU, modelopt wall, modelopt CPU) per repeat, the two runs back to back
        for repeat in range(repeats):
            if repeat % 2:  # odd repeats run ModelOpt first: neither library always runs second
                peer, peer_seconds, peer_cpu = timed(run_modelopt, budget)
                (model, calibrated, state), seconds, cpu_seconds = timed(run_lowbit, budget)
            else:
                (model, calibrated, state), seconds, cpu_seconds = timed(run_lowbit, budget)
                peer, peer_seconds, peer_cpu = timed(run_modelopt, budget)
            times.append((seconds, cpu_seconds, peer_seconds, peer_cpu))
        with_scales, modelopt_count = modelopt_bits(peer)
        theirs, base = scored({"library": f"modelopt {modelopt.__version__}", "budget": budget,
                               "effective bits (lowbit)": round(with_scales, 4),
                               "effective bits (modelopt count)": round(modelopt_count, 4)}, peer)
        theirs.update({"wall s": " / ".join(f"{t[2]:.1f}" for t in times),
                       "CPU s": " / ".join(f"{t[3]:.1f}" for t in times)})
        ours, _ = scored({"library": f"lowbit {lowbit.__version__}", "budget": budget,
                          "effective bits (lowbit)": round(state.effective_bits, 4)}, model, base)
        ours.update({"wall s": " / ".join(f"{t[0]:.1f}" for t in times),
                     "CPU s": " / ".join(f"{t[1]:.1f}" for t in times),
                     "wall vs modelopt": " / ".join(f"{t[0] / t[2]:.2f}x" for t in times),
                     "CPU vs modelopt": " / ".join(f"{t[1] / t[3]:.2f}x" for t in times)})
        counted = run_modelopt(budget, [int4_counted, "FP8_DEFAULT_CFG"])  # untimed: the same work as above
        counted_bits, counted_count = modelopt_bits(counted, INT4_WITH_SCALES)
        scales_row, _ = scored({"library": "modelopt, INT4 scales counted", "budget": budget,
                                "effective bits (lowbit)": round(counted_bits, 4),
                                "effective bits (modelopt count)": round(counted_count, 4)}, counted, base)
        equal = state.resolve(with_scales)  # the same scores, solved at ModelOpt's bits counted with scales
        calibrated.apply(equal.assignment)
        same_bits, _ = scored({"library": "lowbit at modelopt's bits", "budget": round(with_scales, 4),
                               "effective bits (lowbit)": round(equal.effective_bits, 4)}, model, base)
        rows += [theirs, ours, scales_row, same_bits]
        del model, peer, calibrated, counted
    return rows


def awq_part(batches, score: Scorer, steps: int) -> list[dict]:
    """Plain ``quantize`` with INT4_AWQ_CFG against ``mtq.quantize`` with ModelOpt's, on the same batches (the
    first ``steps // 4``, at least one, as auto_quantize calibrates AWQ, then all ``steps``), with the preset's
    lm_head rule (head float) and without it (head in INT4, as auto_quantize searches it)."""
    import modelopt.torch.quantization as mtq

    def without_head(config: dict) -> dict:
        config = copy.deepcopy(config)
        rules = config["quant_cfg"]
        if isinstance(rules, dict):
            rules.pop("*lm_head*")
        else:
            config["quant_cfg"] = [rule for rule in rules if rule.get("quantizer_name") != "*lm_head*"]
        return config

    rows = []
    for count in sorted({max(1, steps // 4), steps}):
        def loop(model, count=count):
            for batch in batches[:count]:
                model(**batch)

        for head in (False, True):
            ours, _ = lowbit.assets.load_default_model()
            config = get_preset("INT4_AWQ_CFG")
            lowbit.quantize(ours, without_head(config) if head else config, loop)
            peer, _ = lowbit.assets.load_default_model()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                mtq.quantize(peer, without_head(mtq.INT4_AWQ_CFG) if head else mtq.INT4_AWQ_CFG, loop)
            mine, theirs = score(ours), score(peer)
            row = {"calibration batches": count, "lm_head": "INT4" if head else "float",
                   "KL lowbit": mine["KL"], "KL modelopt": theirs["KL"],
                   "KL lowbit / modelopt": f"{mine['KL'] / theirs['KL']:.4f}",
                   "perplexity lowbit": mine["perplexity"], "perplexity modelopt": theirs["perplexity"]}
            print(row, flush=True)
            rows.append(row)
    return rows


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("lowbit", "modelopt", "awq", "all"), default="all")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs of both libraries per budget")
    parser.add_argument("--calib-samples", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--eval-tokens", type=int, default=4096, help="tokens scored in each eval part")
    parser.add_argument("--eval-parts", type=int, default=1,
                        help="eval text cut into this many equal parts, each scored (module docstring)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    reference, tokenizer = lowbit.assets.load_default_model()
    batches = calibration_batches(tokenizer, default_calibration_text(), num_samples=args.calib_samples,
                                  seq_len=SEQ_LEN, batch_size=args.batch_size, seed=0)
    score = Scorer(copy.deepcopy(reference), tokenizer, args.eval_tokens, args.eval_parts)
    sections = [f"# auto_quantize on the bundled model\n\n{run_context(['python', *sys.argv])}\n".replace("'", "")]
    float_row = {"assignment": "float (none)", "effective bits": 16.0, **score(reference)}
    if args.part in ("lowbit", "all"):
        rows, sweep = lowbit_part(batches, score, args.steps, out)
        sections.append("## NVFP4 + FP8 + none at 4.8 bits\n\n" + format_table([float_row, *rows]))
        sections.append("## Pareto sweep (gradient scores re-solved per budget)\n\n" + format_table(sweep))
    if args.part in ("modelopt", "all"):
        sections.append("## INT4_AWQ + FP8 + none against ModelOpt auto_quantize\n\n"
                        + format_table(modelopt_part(batches, score, args.steps, args.repeats)))
    if args.part in ("awq", "all"):
        sections.append("## Plain INT4_AWQ_CFG quantize against mtq.quantize\n\n"
                        + format_table(awq_part(batches, score, args.steps)))
    text = "\n\n".join(sections) + "\n"
    print(text)
    name = f"auto_quantize_{args.part}_{time.strftime('%Y-%m-%d')}.md"
    (out / name).write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
