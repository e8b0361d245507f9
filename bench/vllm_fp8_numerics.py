"""Where do vLLM CPU's FP8 numerics leave lowbit's in-memory model, and how far can any two FP8 models differ?

Case: the bundled model, FP8_PER_CHANNEL_PER_TOKEN_CFG (E4M3 weights per output channel, E4M3 activations with a
dynamic per-token scale), calibrated as in ``export_vllm.py``, exported as compressed-tensors, run by vLLM in
float32 (its FP8 path on a CPU without AMX: ``QuantFP8.forward_native`` then
``ChannelWiseTorchFP8ScaledMMLinearKernel``, vllm/model_executor/kernels/linear/scaled_mm/pytorch.py).
Per row x of a linear's input (vLLM's arithmetic, read from those two files):

    s_x = max(amax(|x|) / 448, 1 / (448 * 512))          float32 divisor, per token
    codes_x = e4m3(clamp(x * reciprocal(s_x), -448, 448))
    out = float32(codes_x @ codes_w.T) * s_x * s_w.T      torch._scaled_mm with unit scales, then the scales

with ``codes_w`` and the divisor ``s_w = amax_w / 448`` read from the export. lowbit's fake quantization computes
``codes_x = e4m3(x * (448 / amax))`` and ``out = (codes_x / (448 / amax)) @ (codes_w / (448 / amax_w)).T``:
the same codes and values up to one float32 rounding.

Reported (mean |d log p| over the 128 held-out tokens of ``export_vllm.py``, nats):
1. vLLM against lowbit's fake-quantized model, lowbit's ``load_quantized`` of the export, and three
   re-implementations built from the export's codes and divisors (``ReferenceFp8Linear`` swapped in for each
   quantized Linear of the float model): vLLM's arithmetic above; lowbit's activation codes with the GEMM on
   codes; vLLM's codes dequantized before a float GEMM; compressed-tensors' own forward (codes from a true
   division x / s, dequantized operands, a float GEMM) and its codes with the GEMM on codes.
2. The chaos floor: lowbit's model against itself with the embeddings multiplied by (1 + 1e-7 * N(0, 1)), and
   the vLLM-arithmetic reference and the float model each against itself under the same perturbation.
3. Per layer and linear: the fraction of activation E4M3 codes (vLLM's rule applied to both inputs) that differ
   between vLLM's input to that linear (captured with a forward pre-hook through ``LLM.apply_model``) and
   lowbit's / the vLLM-arithmetic reference's.

    PYTHONPATH=$PWD /work/venvs/<vllm venv>/bin/python bench/vllm_fp8_numerics.py [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # apply_model's hooks then run in this process

import torch
from export_vllm import CALIB_SAMPLES, MEMORY_FRACTION, SEQ_LEN, lowbit_logprobs, prompt_ids
from safetensors.torch import load_file
from torch import nn

import lowbit
from lowbit.data import calibration_batches, default_calibration_text, make_forward_loop
from lowbit.export import export

E4M3_MAX = 448.0
MIN_SCALE = 1.0 / (E4M3_MAX * 512.0)  # vLLM's _FP8_MIN_SCALING_FACTOR
SITES = {"q_proj": "qkv_proj", "o_proj": "o_proj", "gate_proj": "gate_up_proj", "down_proj": "down_proj"}
PERTURBATION, PERTURBATION_SEEDS = 1e-7, 3


def vllm_codes(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(E4M3 codes, float32 divisor (rows, 1)) of x (rows, K) by vLLM's dynamic per-token rule (docstring)."""
    divisor = (x.abs().amax(-1, keepdim=True).float() / E4M3_MAX).clamp(min=MIN_SCALE)
    return (x.float() * divisor.reciprocal()).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), divisor


def division_codes(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(E4M3 codes, float32 divisor) of x by compressed-tensors' own forward (``forward_helpers._quantize``):
    codes = e4m3(clamp(x / (amax / 448), -448, 448)), a true division where vLLM multiplies by the reciprocal."""
    divisor = (x.abs().amax(-1, keepdim=True).float() / E4M3_MAX).clamp(min=MIN_SCALE)
    return (x.float() / divisor).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), divisor


def lowbit_codes(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(E4M3 codes, float32 divisor 1 / (448 / amax)) of x by lowbit.formats.quantize_fp's multiplier rule."""
    multiplier = E4M3_MAX / x.abs().amax(-1, keepdim=True).float()
    return (x.float() * multiplier).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), multiplier.reciprocal()


class ReferenceFp8Linear(nn.Module):
    """An FP8 W8A8 linear from exported codes (N, K) and divisors (N, 1): activation codes by ``rule``
    (vllm_codes or lowbit_codes), then either the GEMM on codes (float32 ``torch._scaled_mm``, unit scales)
    times s_x * s_w.T, or (``gemm_on_codes=False``) the dequantized operands through a float32 GEMM."""

    def __init__(self, codes: torch.Tensor, divisor: torch.Tensor, rule, gemm_on_codes: bool):
        super().__init__()
        self.codes, self.divisor, self.rule, self.gemm_on_codes = codes, divisor.float(), rule, gemm_on_codes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        codes, divisor = self.rule(rows)
        if self.gemm_on_codes:
            one = torch.ones(1)
            out = torch._scaled_mm(codes, self.codes.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
            out = out * divisor * self.divisor.t()
        else:
            out = (codes.float() * divisor) @ (self.codes.float() * self.divisor).t()
        return out.reshape(*x.shape[:-1], -1).to(x.dtype)


def reference_model(float_model: nn.Module, tensors: dict, rule, gemm_on_codes: bool) -> nn.Module:
    """A copy of the float model with each exported FP8 linear replaced by a ReferenceFp8Linear."""
    model = copy.deepcopy(float_model)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and f"{name}.weight_scale" in tensors:
            parent, _, child = name.rpartition(".")
            swapped = ReferenceFp8Linear(tensors[f"{name}.weight"], tensors[f"{name}.weight_scale"], rule,
                                         gemm_on_codes)
            setattr(model.get_submodule(parent), child, swapped)
    return model


def linear_inputs(model: nn.Module, ids: list[int]) -> tuple[torch.Tensor, dict]:
    """(log-probabilities, {(layer, site): input (tokens, K)}) of a transformers Llama-style model."""
    captured, hooks = {}, []
    for index, layer in enumerate(model.model.layers):
        for site in SITES:
            module = getattr(layer.self_attn if site in ("q_proj", "o_proj") else layer.mlp, site)
            hooks.append(module.register_forward_pre_hook(
                lambda _, args, key=(index, site): captured.__setitem__(key, args[0][0].detach().float())))
    try:
        return lowbit_logprobs(model, ids), captured
    finally:
        for hook in hooks:
            hook.remove()


def vllm_run(directory: Path, ids: list[int], dtype: str = "float32") -> tuple[torch.Tensor, dict]:
    """(vLLM's prompt log-probabilities of ids[1:] with the engine in ``dtype``, {(layer, site): vLLM's input to
    that linear, as float32})."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=str(directory), dtype=dtype, max_model_len=512, seed=0, enforce_eager=True,
              gpu_memory_utilization=MEMORY_FRACTION)
    captured = {}

    def install(model: nn.Module) -> None:
        for index, layer in enumerate(model.model.layers):
            for site, name in SITES.items():
                module = getattr(layer.self_attn if name in ("qkv_proj", "o_proj") else layer.mlp, name)
                module.register_forward_pre_hook(
                    lambda _, args, key=(index, site): captured.__setitem__(key, args[0].detach().float().clone())
                    if args[0].shape[0] == len(ids) else None)

    llm.apply_model(install)
    output = llm.generate([TokensPrompt(prompt_token_ids=ids)],
                          SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0))[0]
    scored = [entry[token].logprob for entry, token in zip(output.prompt_logprobs[1:], ids[1:], strict=True)]
    del llm
    return torch.tensor(scored, dtype=torch.float64), captured


def perturbed_distance(model: nn.Module, ids: list[int], unperturbed: torch.Tensor) -> list[float]:
    """Mean |d log p| of ``model`` with its embeddings multiplied by (1 + PERTURBATION * N(0, 1)), per seed."""
    embeddings, distances = model.get_input_embeddings(), []
    for seed in range(PERTURBATION_SEEDS):
        generator = torch.Generator().manual_seed(seed)
        hook = embeddings.register_forward_hook(
            lambda _, __, out, noise=generator: out * (1 + PERTURBATION * torch.randn(out.shape, generator=noise)))
        distances.append(mean_abs(lowbit_logprobs(model, ids), unperturbed))
        hook.remove()
    return distances


def code_flips(a: dict, b: dict) -> dict:
    """{(layer, site): fraction of vLLM-rule E4M3 activation codes that differ between a and b}."""
    return {key: (vllm_codes(a[key])[0].float() != vllm_codes(b[key])[0].float()).float().mean().item()
            for key in sorted(a)}


def mean_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().mean().item()


def fp8_per_token_model():
    """(bundled float model, tokenizer, its FP8_PER_CHANNEL_PER_TOKEN quantization, the held-out prompt ids), seed 0."""
    torch.manual_seed(0)
    float_model, tokenizer = lowbit.assets.load_default_model()
    batches = calibration_batches(tokenizer, default_calibration_text(), num_samples=CALIB_SAMPLES, seq_len=SEQ_LEN)
    model = lowbit.quantize(copy.deepcopy(float_model), lowbit.get_preset("FP8_PER_CHANNEL_PER_TOKEN_CFG"),
                            make_forward_loop(batches, progress=False))
    return float_model, tokenizer, model, prompt_ids(tokenizer)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the figures as JSON here")
    args = parser.parse_args(argv)
    import vllm

    float_model, tokenizer, model, ids = fp8_per_token_model()
    with tempfile.TemporaryDirectory() as workdir:
        directory = export(model, Path(workdir) / "fp8", "compressed-tensors", tokenizer=tokenizer)
        tensors = load_file(directory / "model.safetensors")
        reloaded = lowbit_logprobs(lowbit.load_quantized(directory), ids)
        scored, vllm_inputs = vllm_run(directory, ids)
    lowbit_lp, lowbit_inputs = linear_inputs(model, ids)
    references = {"vLLM arithmetic (vLLM codes, GEMM on codes)": (vllm_codes, True),
                  "lowbit codes, GEMM on codes": (lowbit_codes, True),
                  "vLLM codes, dequantize then float GEMM": (vllm_codes, False),
                  "compressed-tensors' forward (x / s, dequantize, float GEMM)": (division_codes, False),
                  "x / s codes, GEMM on codes": (division_codes, True)}
    models = {"lowbit fake quant (in-memory)": (lowbit_lp, lowbit_inputs),
              "lowbit load_quantized(export)": (reloaded, None)}
    for name, (rule, on_codes) in references.items():
        models[name] = linear_inputs(reference_model(float_model, tensors, rule, on_codes), ids)
    rows = [{"model": name, "vs_vllm": mean_abs(lp, scored), "vs_lowbit": mean_abs(lp, lowbit_lp)}
            for name, (lp, _) in models.items()]
    floor = perturbed_distance(model, ids, lowbit_lp)
    float_floor = perturbed_distance(float_model, ids, lowbit_logprobs(float_model, ids))
    arithmetic = reference_model(float_model, tensors, vllm_codes, True)
    arithmetic_floor = perturbed_distance(arithmetic, ids, models["vLLM arithmetic (vLLM codes, GEMM on codes)"][0])
    vllm_reference = models["vLLM arithmetic (vLLM codes, GEMM on codes)"][1]
    flips = {"vllm_vs_lowbit": code_flips(vllm_inputs, lowbit_inputs),
             "vllm_vs_vllm_arithmetic": code_flips(vllm_inputs, vllm_reference)}
    print(f"{'model':60s} {'vs vLLM':>9s} {'vs lowbit':>9s}")
    for row in rows:
        print(f"{row['model']:60s} {row['vs_vllm']:9.4f} {row['vs_lowbit']:9.4f}")
    print(f"chaos floor: lowbit vs lowbit with embeddings x (1 + {PERTURBATION:g} N(0,1)), seeds 0..2:",
          " ".join(f"{value:.4f}" for value in floor))
    print("the same for the vLLM-arithmetic reference:", " ".join(f"{value:.4f}" for value in arithmetic_floor))
    print("the same for the float model:", " ".join(f"{value:.1e}" for value in float_floor))
    print(f"{'layer':>5s} {'linear':10s} {'codes differing: vLLM vs lowbit':>32s} {'vLLM vs vLLM arithmetic':>24s}")
    for key in sorted(flips["vllm_vs_lowbit"]):
        print(f"{key[0]:5d} {key[1]:10s} {flips['vllm_vs_lowbit'][key]:32.2e} "
              f"{flips['vllm_vs_vllm_arithmetic'][key]:24.2e}")
    if args.json:
        context = {"vllm": vllm.__version__, "torch": torch.__version__, "python": platform.python_version(),
                   "command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M")}
        flat = {kind: {f"{layer}.{site}": value for (layer, site), value in table.items()}
                for kind, table in flips.items()}
        Path(args.json).write_text(json.dumps({**context, "rows": rows, "chaos_floor": floor,
                                              "vllm_arithmetic_floor": arithmetic_floor,
                                              "float_model_floor": float_floor, "code_flips": flat},
                                              indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
