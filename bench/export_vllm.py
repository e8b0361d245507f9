"""Do lowbit's exports load and generate in vLLM (CPU), and do they compute lowbit's model?

Protocol (fixed seed, the bundled model; lowbit's models in float32):
1. Quantize the bundled model (``lowbit.assets.load_default_model``) with each case's config, calibrated on
   16 windows of 256 tokens of the bundled calibration text.
2. Export it (ModelOpt unified HF or compressed-tensors) to a temporary directory.
3. vLLM (``vllm.LLM(dir)``, float32 where it runs; bfloat16 for ModelOpt checkpoints, the only dtypes its loader
   takes, and for W4A16, whose CPU kernel "cpu_gemm_wna16" has no float32)
   generates 8 tokens greedily and reports ``prompt_logprobs`` for a
   prompt of the first 129 tokens of the bundled held-out text: the log-probabilities of 128 held-out tokens.
4. The same 128 log-probabilities from lowbit's in-memory quantized model and from the float model.
Reported: mean |vLLM - lowbit| (nats; must be <= 0.05) and mean |vLLM - float| (must be larger); the floor
of that comparison, mean |lowbit.load_quantized(export) - lowbit| (the export's divisor scales reloaded as
reciprocals: weights equal to one float32 rounding; with dynamic FP8 activations such 1-ulp differences flip
rounding steps that grow over the 8 layers, so two equivalent implementations differ by about as much as the
quantization noise itself: a +1 ulp change of one layer's amax moved FP8 per-token logprobs by 0.067), and
mean |lowbit run in vLLM's dtype - lowbit| (the floor for an engine running bfloat16); also
mean |vLLM - lowbit run in vLLM's dtype| (bfloat16 rounding alone moves this model's logprobs) and mean
|vLLM - lowbit with activation quantization off| (what an engine computes if it keeps activations in float).

    /work/venvs/<vllm venv>/bin/python bench/export_vllm.py [--case NAME ...] [--json out.json]

Needs vllm (CPU build) in the running Python; prints one row per case (an error row when a case fails).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

import lowbit
from lowbit.data import calibration_batches, default_calibration_text, default_eval_text, make_forward_loop
from lowbit.export import export

PROMPT_TOKENS = 129  # 128 scored held-out tokens after the first
TOLERANCE = 0.05
MEMORY_FRACTION = 0.1  # of the CPU memory, for vLLM's KV cache (the CPU backend reads the GPU flag)
CALIB_SAMPLES, SEQ_LEN = 16, 256


def _preset(name: str, **changes) -> dict:
    config = lowbit.get_preset(name)
    config.update(changes)
    return config


def _mixed() -> dict:
    """FP8 per-channel weights / per-token activations in attention, NVFP4 (W4A4) in the MLP. (vLLM 0.32 CPU
    has no kernel for 128x128-block FP8 weights, "CPUFp8BlockScaledMMKernel requires AMX tile support", for
    MXFP8, "Failed to find a kernel that can implement the MXFP8 linear layer", nor for W4A16 NVFP4, "Forced
    NVFP4 kernel MarlinNvFp4LinearKernel is not supported": measured here.)"""
    config = lowbit.get_preset("FP8_PER_CHANNEL_PER_TOKEN_CFG")
    nvfp4 = lowbit.get_preset("NVFP4_DEFAULT_CFG")["quant_cfg"]
    config["quant_cfg"]["*mlp*weight_quantizer"] = nvfp4["*weight_quantizer"]
    config["quant_cfg"]["*mlp*input_quantizer"] = nvfp4["*input_quantizer"]
    return config


def _mixed_fp8_weight_only() -> dict:
    """FP8 per-channel weights / per-token activations in attention, FP8 per-tensor weights with float
    activations in the MLP (quant_algo FP8 without input_scale): two formats, tried as a MIXED_PRECISION that
    vLLM CPU might run."""
    config = lowbit.get_preset("FP8_PER_CHANNEL_PER_TOKEN_CFG")
    config["quant_cfg"]["*mlp*weight_quantizer"] = {"num_bits": (4, 3), "axis": None}
    config["quant_cfg"]["*mlp*input_quantizer"] = {"enable": False}
    return config


def _smoothquant_w8a8() -> dict:
    """W8A8 INT8 SmoothQuant on the norm-fed linears (q/k/v, gate/up: the scale folds into the norm);
    o_proj and down_proj stay float: their input has no norm to fold a smoothing scale into, a kept
    pre_quant_scale has no compressed-tensors tensor, and vLLM CPU has no W8A16 channel kernel (measured)."""
    config = lowbit.get_preset("INT8_SMOOTHQUANT_CFG")
    config["quant_cfg"]["*o_proj*"] = {"enable": False}
    config["quant_cfg"]["*down_proj*"] = {"enable": False}
    return config


def _mixed_int8_w4a16() -> dict:
    """compressed-tensors mixed-precision from two formats that both have vLLM CPU kernels: W8A8 INT8
    SmoothQuant on q/k/v (as in ``_smoothquant_w8a8``), W4A16 g128 on gate/up/down; o_proj float."""
    config = _smoothquant_w8a8()
    config["quant_cfg"]["*mlp*weight_quantizer"] = lowbit.get_preset("INT4_BLOCKWISE_WEIGHT_ONLY_CFG")[
        "quant_cfg"]["*weight_quantizer"]
    config["quant_cfg"]["*mlp*input_quantizer"] = {"enable": False}
    return config


def _mixed_fp8_w4a16() -> dict:
    """compressed-tensors mixed-precision: FP8 per-channel / per-token on the attention linears, W4A16 g128 on
    gate/up/down."""
    config = lowbit.get_preset("FP8_PER_CHANNEL_PER_TOKEN_CFG")
    config["quant_cfg"]["*mlp*weight_quantizer"] = lowbit.get_preset("INT4_BLOCKWISE_WEIGHT_ONLY_CFG")[
        "quant_cfg"]["*weight_quantizer"]
    config["quant_cfg"]["*mlp*input_quantizer"] = {"enable": False}
    return config


def _fp8_dynamic() -> dict:
    return lowbit.get_preset("FP8_PER_CHANNEL_PER_TOKEN_CFG")


CASES = {  # name: (config, export format, vLLM dtype)
    "modelopt FP8_PER_CHANNEL_PER_TOKEN": (lambda: _preset("FP8_PER_CHANNEL_PER_TOKEN_CFG"), "hf", "bfloat16"),
    "modelopt MIXED_PRECISION": (_mixed, "hf", "bfloat16"),
    "compressed-tensors W8A8 INT8 SmoothQuant": (_smoothquant_w8a8, "compressed-tensors", "float32"),
    "compressed-tensors W4A16 g128 GPTQ": (
        lambda: _preset("INT4_BLOCKWISE_WEIGHT_ONLY_CFG", algorithm="gptq"), "compressed-tensors", "bfloat16"),
    "compressed-tensors FP8": (_fp8_dynamic, "compressed-tensors", "float32"),
    "compressed-tensors mixed-precision W8A8 INT8 + W4A16": (_mixed_int8_w4a16, "compressed-tensors", "bfloat16"),
    "compressed-tensors mixed-precision FP8 + W4A16": (_mixed_fp8_w4a16, "compressed-tensors", "bfloat16"),
    "modelopt MIXED_PRECISION FP8 weight-only MLP": (_mixed_fp8_weight_only, "hf", "bfloat16"),
    # the noise floor: the float model itself (save_pretrained), vLLM against transformers in the same dtype
    "float bfloat16 (no quantization)": (None, None, "bfloat16"),
    "float float32 (no quantization)": (None, None, "float32"),
}


def prompt_ids(tokenizer) -> list[int]:
    return tokenizer(default_eval_text())["input_ids"][:PROMPT_TOKENS]


def lowbit_logprobs(model, ids: list[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """log p(token t | tokens < t) for t = 1..len(ids)-1 from ``model`` run in ``dtype``, as float64."""
    model = model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].double()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:]).unsqueeze(-1)).squeeze(-1)


def vllm_logprobs(directory: Path, ids: list[int], dtype: str) -> tuple[torch.Tensor, list[int], float]:
    """(vLLM's prompt log-probabilities of ids[1:], 8 greedily generated token ids, load + run seconds)."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    start = time.perf_counter()
    llm = LLM(model=str(directory), dtype=dtype, max_model_len=512, seed=0, enforce_eager=True,
              gpu_memory_utilization=MEMORY_FRACTION)
    params = SamplingParams(max_tokens=8, temperature=0.0, prompt_logprobs=0)
    output = llm.generate([TokensPrompt(prompt_token_ids=ids)], params)[0]
    scored = [entry[token].logprob for entry, token in zip(output.prompt_logprobs[1:], ids[1:], strict=True)]
    seconds = time.perf_counter() - start
    del llm
    return torch.tensor(scored, dtype=torch.float64), list(output.outputs[0].token_ids), seconds


def float_case(name: str, float_model, tokenizer, ids: list[int], workdir: Path) -> dict:
    """The noise floor of the comparison: vLLM running the float model against transformers running it, both in
    the case's dtype (and against transformers in float32)."""
    dtype = CASES[name][2]
    directory = workdir / name.replace(" ", "_")
    float_model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    scored, generated, seconds = vllm_logprobs(directory, ids, dtype)
    reference, same_dtype = lowbit_logprobs(float_model, ids), lowbit_logprobs(float_model, ids, getattr(torch, dtype))
    return {"case": name, "format": "save_pretrained", "vllm_dtype": dtype, "generated": len(generated),
            "vllm_vs_hf_same_dtype": (scored - same_dtype).abs().mean().item(),
            "vllm_vs_hf_float32": (scored - reference).abs().mean().item(),
            "hf_dtype_vs_hf_float32": (same_dtype - reference).abs().mean().item(), "vllm_seconds": seconds,
            "error": None}


def run_case(name: str, float_model, tokenizer, forward_loop, ids: list[int], workdir: Path) -> dict:
    make_config, target, dtype = CASES[name]
    if make_config is None:
        return float_case(name, float_model, tokenizer, ids, workdir)
    model = lowbit.quantize(copy.deepcopy(float_model), make_config(), forward_loop)
    directory = export(model, workdir / name.replace(" ", "_"), target, tokenizer=tokenizer)
    reference, float_reference = lowbit_logprobs(model, ids), lowbit_logprobs(float_model, ids)
    floor = (lowbit_logprobs(lowbit.load_quantized(directory), ids) - reference).abs().mean().item()
    scored, generated, seconds = vllm_logprobs(directory, ids, dtype)
    same_dtype = lowbit_logprobs(model, ids, getattr(torch, dtype))
    weights_only = copy.deepcopy(model)
    for module in weights_only.modules():
        if hasattr(module, "input_quantizer"):
            module.input_quantizer.disable()
    weights_only = lowbit_logprobs(weights_only, ids)
    to_lowbit = (scored - reference).abs().mean().item()
    to_float = (scored - float_reference).abs().mean().item()
    return {"case": name, "format": target, "vllm_dtype": dtype, "generated": len(generated),
            "vllm_vs_lowbit": to_lowbit, "vllm_vs_lowbit_same_dtype": (scored - same_dtype).abs().mean().item(),
            "vllm_vs_lowbit_weights_only": (scored - weights_only).abs().mean().item(),
            "lowbit_reload_vs_lowbit": floor, "lowbit_dtype_vs_lowbit": (same_dtype - reference).abs().mean().item(),
            "vllm_vs_float": to_float, "lowbit_vs_float": (reference - float_reference).abs().mean().item(),
            "holds": to_lowbit <= TOLERANCE and to_lowbit < to_float, "vllm_seconds": seconds, "error": None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", action="append", choices=sorted(CASES), help="run only these cases")
    parser.add_argument("--json", help="write the rows as JSON here")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    import vllm

    float_model, tokenizer = lowbit.assets.load_default_model()
    batches = calibration_batches(tokenizer, default_calibration_text(), num_samples=CALIB_SAMPLES, seq_len=SEQ_LEN)
    forward_loop = make_forward_loop(batches, progress=False)
    ids = prompt_ids(tokenizer)
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for name in args.case or list(CASES):
            try:
                rows.append(run_case(name, float_model, tokenizer, forward_loop, ids, Path(workdir)))
            except Exception as error:  # a failing case is a row, the others still run
                rows.append({"case": name, "format": CASES[name][1], "holds": False, "error": repr(error)[:400]})
            print(json.dumps(rows[-1]), flush=True)
    context = {"vllm": vllm.__version__, "torch": torch.__version__, "python": platform.python_version(),
               "machine": platform.machine(), "command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M")}
    if args.json:
        Path(args.json).write_text(json.dumps({**context, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
