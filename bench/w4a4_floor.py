"""The W4A4 floor: each W4A4 format's activation quantizers alone (weights left in float), beside the format's
RTN and W4A16 g128 RTN, on bench/frontier.py's workload. No weight method at a W4A4 format can end below its
"float weights" row, so it bounds what GPTQ and its kin can reach against the frontier's W4A4 target.

    python bench/w4a4_floor.py [--model default|gpt2] [--calib-samples 8] [--eval-tokens 2048] [--threads 1]
        [--out bench/results]
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

import lowbit
from lowbit.eval import format_table
from lowbit.report import Workload, measure_baseline, run_context

sys.path.insert(0, str(Path(__file__).parent))
from accuracy import Case, accuracy_cells, run_case  # noqa: E402
from frontier import DEFAULT_CALIB_SAMPLES, MXFP4, NVFP4, W4, format_config, lowbit_case  # noqa: E402


def float_weights_case(format: str) -> Case:
    """The format's config with its weight quantizers disabled (activations quantized as the format says)."""

    def apply(model: nn.Module, workload: Workload) -> nn.Module:
        config = format_config(format)
        weight = config["quant_cfg"]["*weight_quantizer"]
        config["quant_cfg"]["*weight_quantizer"] = {**weight, "enable": False}
        lowbit.quantize(model, config, workload.forward_loop())
        return model

    return Case(format, "lowbit", "float weights (activations only)", apply, lowbit.fold_weight)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default", choices=["default", "gpt2"])
    parser.add_argument("--calib-samples", type=int, default=DEFAULT_CALIB_SAMPLES)
    parser.add_argument("--eval-tokens", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    workload = Workload.default(args.calib_samples, args.eval_tokens, progress=False, model=args.model)
    baseline = measure_baseline(workload)
    cases = [lowbit_case(W4, "RTN", "max")]
    for format in (NVFP4, MXFP4):
        cases += [lowbit_case(format, "RTN", "max"), float_weights_case(format)]
    rows = []
    for case in cases:
        result = run_case(case, workload)
        rows.append({"format": case.format, "method": case.config, **accuracy_cells(result, baseline),
                     "note": (result.error or "")[:90]})
        print(rows[-1], flush=True)
    context = run_context(["python", "bench/w4a4_floor.py", *(sys.argv[1:] if argv is None else argv)])
    text = "\n".join([
        f"# W4A4 floor: activations quantized, weights float, model `{args.model}`, {context['date'][:10]}",
        "",
        f"- command: `{context['command']}` on {context['machine']}, load average at the end "
        f"{context['load_average']}; python {context['python']}, torch {context['torch']}",
        f"- workload: bench/frontier.py's ({len(workload.calibration)} calibration batches of 8 x 256 tokens, the "
        f"first {workload.eval_tokens} held-out tokens); float perplexity {baseline.perplexity:.3f}",
        "",
        "```",
        format_table(rows),
        "```",
        "",
    ])
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "w4a4_floor" if args.model == "default" else f"w4a4_floor_{args.model}"
    path = args.out / f"{stem}_{context['date'][:10]}.md"
    path.write_text(text, encoding="utf-8")
    print(text)
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
