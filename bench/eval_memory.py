"""Peak memory of ``lowbit eval`` scoring a quantized model against a saved top-k reference, against scoring
the quantized model alone (perplexity only) and against the float model run beside it (CPU).

    python bench/eval_memory.py [--eval-tokens 8192] [--top-k 256] [--preset INT4_BLOCKWISE_WEIGHT_ONLY_CFG]
                                [--out bench/results]

Setup (untimed, in this process): the bundled model quantized with ``--preset`` and saved with
``lowbit.hf.save_quantized`` (fake-quantized weights), and the float model's top-k reference file written by
``lowbit.eval.save_topk_reference`` on the same held-out tokens. Then each command runs in its own fresh
subprocess, which reports the resident size after importing torch, transformers and lowbit (the floor every
run shares) and its peak resident set size over the command (Linux ``VmHWM``, reset to the floor with
``/proc/self/clear_refs`` once the imports are done, so a transient peak while importing does not count):

- ``alone``:     ``lowbit eval DIR``                          (perplexity of the quantized model)
- ``top-k``:     ``lowbit eval DIR --reference FILE``          (the second pass of the two-pass mode)
- ``beside``:    ``lowbit eval DIR --reference default``       (the float model run beside it)

Ratios to ``alone`` are given for the whole peak and for the peak above the import floor. The target:
``top-k`` / ``alone`` <= 1.3.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

TARGET_RATIO = 1.3
MEGABYTE = 1e6


def child(argv: list[str]) -> None:
    """Run ``lowbit`` with ``argv`` in this process; print a JSON line with the peak and the import floor."""
    import torch  # noqa: F401  (the floor: what every run imports)
    import transformers  # noqa: F401

    from lowbit.cli import main
    from lowbit.ptq.memory import status_bytes

    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)
    floor = status_bytes("VmRSS")
    if floor is None:
        raise RuntimeError("/proc/self/status has no VmRSS: this bench needs Linux")
    main(argv)
    print("MEMORY " + json.dumps({"floor": floor, "peak": status_bytes("VmHWM")}))


def run_child(argv: list[str]) -> dict:
    result = subprocess.run([sys.executable, __file__, "--child", *argv], capture_output=True, text=True, check=True)
    line = next(line for line in result.stdout.splitlines() if line.startswith("MEMORY "))
    return json.loads(line.removeprefix("MEMORY "))


def main() -> int:
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--top-k", type=int, default=256)
    parser.add_argument("--preset", default="INT4_BLOCKWISE_WEIGHT_ONLY_CFG")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()

    import torch

    import lowbit
    from lowbit.assets import load_default_model
    from lowbit.data import calibration_batches, default_calibration_text, default_eval_text, make_forward_loop
    from lowbit.eval import TopKReference, format_table, save_topk_reference
    from lowbit.hf import save_quantized
    from lowbit.report import run_context

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="eval_memory-"))
    model, tokenizer = load_default_model()
    reference = save_topk_reference(model, tokenizer, default_eval_text(), work / "reference.safetensors",
                                    args.top_k, seq_len=256, stride=128, max_tokens=args.eval_tokens)
    batches = calibration_batches(tokenizer, default_calibration_text(), num_samples=32, seq_len=256)
    save_quantized(lowbit.quantize(model, lowbit.get_preset(args.preset), make_forward_loop(batches)), tokenizer,
                   work / "quantized")
    common = [str(work / "quantized"), "--eval-tokens", str(args.eval_tokens), "--no-progress"]
    runs = {"alone": common, "top-k": [*common, "--reference", str(reference)],
            "beside": [*common, "--reference", "default"]}
    measured = {name: run_child(["eval", *argv]) for name, argv in runs.items()}
    alone = measured["alone"]
    rows = [{
        "run": name, "command": " ".join(["lowbit eval DIR", *runs[name][len(common):]]).replace(str(reference),
                                                                                                 "FILE"),
        "peak MB": round(m["peak"] / MEGABYTE, 1), "import floor MB": round(m["floor"] / MEGABYTE, 1),
        "peak / alone": round(m["peak"] / alone["peak"], 3),
        "above floor / alone's": round((m["peak"] - m["floor"]) / (alone["peak"] - alone["floor"]), 3),
    } for name, m in measured.items()]
    ratio = measured["top-k"]["peak"] / alone["peak"]
    above = (measured["top-k"]["peak"] - measured["top-k"]["floor"]) / (alone["peak"] - alone["floor"])
    context = run_context(["python", "bench/eval_memory.py", *sys.argv[1:]])
    stored = TopKReference(reference)
    text = "\n".join([
        f"# Peak memory of lowbit eval with a saved top-k reference, {context['date'][:10]}",
        "",
        f"- command: `{context['command']}`",
        f"- machine: {context['machine']}; load average at the end: {context['load_average']}",
        f"- versions: python {context['python']}, torch {context['torch']}, lowbit {lowbit.__version__}",
        f"- date: {context['date']}",
        f"- workload: the bundled model quantized with {args.preset} (fake-quantized, float32), "
        f"{args.eval_tokens} held-out tokens in windows of 256, stride 128; reference file: top-{stored.k} of "
        f"{stored.positions} positions, {stored.nbytes / MEGABYTE:.2f} MB",
        "- peak: the subprocess's peak resident set size over the command (VmHWM, reset after the imports); "
        "import floor: its resident size after importing torch, transformers and lowbit",
        "",
        "```",
        format_table(rows),
        "```",
        "",
        f"top-k / alone: {ratio:.3f}x of the whole peak, {above:.3f}x above the import floor; target <= "
        f"{TARGET_RATIO}x -> {'met' if max(ratio, above) <= TARGET_RATIO else 'NOT met'}",
        "",
    ])
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"eval_memory_{context['date'][:10]}.md"
    path.write_text(text, encoding="utf-8")
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
