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
- compress_weights INT4_SYM g128 ratio 1.0 data-free: lowbit, and NNCF with the same arguments.

Usage: python bench/gpt2_fixture.py [--max-tokens 16384] [--out bench/results]   (needs nncf for its rows)
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
from lowbit.assets import load_gpt2_model
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
COMPRESS_ARGS = {"mode": "int4_sym", "group_size": 128, "ratio": 1.0}


def nncf_compress(model: nn.Module, dataset: list) -> nn.Module:
    import nncf

    return nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT4_SYM, group_size=128, ratio=1.0,
                                 dataset=nncf.Dataset(dataset), subset_size=len(dataset),
                                 sensitivity_metric=nncf.SensitivityMetric.WEIGHT_QUANTIZATION_ERROR)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-tokens", type=int, default=16384)
    parser.add_argument("--calibration-samples", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="folder for the results file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base, tokenizer = load_gpt2_model(torch.float32)
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

    for name, config in QUANTIZE_VARIANTS.items():
        add(f"quantize: {name}", lambda m, c=config: lowbit.quantize(m, c, lambda mm: [mm(**b) for b in stacked]))
    add("compress_weights int4_sym g128 r1.0 (lowbit)", lambda m: lowbit.compress_weights(m, **COMPRESS_ARGS))
    try:
        add("compress_weights int4_sym g128 r1.0 (nncf)", lambda m: nncf_compress(m, calibration))
    except ImportError as error:
        print(f"nncf rows skipped: {error}")
    context = run_context(["python", "bench/gpt2_fixture.py", *sys.argv[1:]])
    text = (f"# GPT-2 fixture, INT4 ({len(inputs)} windows of {SEQ_LEN} held-out tokens, "
            f"{args.calibration_samples} calibration windows)\n\n" + format_table(rows) + "\n\n"
            + "\n".join(f"- {key}: {value}" for key, value in context.items()) + "\n")
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"gpt2_fixture_{date.today().isoformat()}.md").write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
