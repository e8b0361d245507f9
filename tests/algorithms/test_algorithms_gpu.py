"""The calibration algorithms on CUDA against the same run on CPU (tiny Llama, float32): every tensor the
algorithms create (scales, Hessians, measured ranges) must live on the model's device, and the results
must agree with the CPU run up to float32 rounding (pre_quant_scales and amax to 1e-3 relative; weights
too, but for at most 0.1 % of elements that GPTQ rounds to a neighbouring code; float32 matmuls on both
sides, TF32 off)."""

import copy

import pytest
import torch

import lowbit.convert as convert
from lowbit.algorithms.registry import run_algorithm
from lowbit.presets import get_preset
from lowbit.quantizer import TensorQuantizer

from .tiny_llama import forward_loop_for

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

CASES = [
    ("W4A8_AWQ_BETA_CFG", "awq_lite", {"scale_per_linear": True, "alpha_step": 0.25}),
    ("INT4_AWQ_CFG", "awq_full", {"alpha_step": 0.25}),
    ("INT8_SMOOTHQUANT_CFG", "smoothquant", {}),
    ("INT4_BLOCKWISE_WEIGHT_ONLY_CFG", "gptq", {"scale_estimation": True}),
]


def calibrated(model, batches, preset, algorithm, options, device):
    config = get_preset(preset)
    for value in config["quant_cfg"].values():
        for stage in value if isinstance(value, list) else [value]:
            if isinstance(stage, dict) and "block_sizes" in stage:
                stage["block_sizes"] = {**stage["block_sizes"], -1: 16}
    config["algorithm"] = None
    result = copy.deepcopy(model).to(device)
    on_device = [batch.to(device) for batch in batches]
    convert.quantize(result, config, forward_loop_for(on_device))
    run_algorithm(algorithm, result, forward_loop_for(on_device), options)
    return result


@pytest.mark.parametrize("preset, algorithm, options", CASES, ids=[case[1] for case in CASES])
def test_algorithm_on_cuda_matches_cpu(model, batches, preset, algorithm, options):
    cpu = calibrated(model, batches, preset, algorithm, options, "cpu")
    allowed = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        cuda = calibrated(model, batches, preset, algorithm, options, "cuda")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allowed
    cpu_quantizers = dict((n, m) for n, m in cpu.named_modules() if isinstance(m, TensorQuantizer))
    compared = 0
    for name, quantizer in cuda.named_modules():
        if not isinstance(quantizer, TensorQuantizer):
            continue
        for key in ("amax", "pre_quant_scale"):
            value, expected = getattr(quantizer, key), getattr(cpu_quantizers[name], key)
            assert (value is None) == (expected is None), f"{name}.{key}"
            if value is not None:
                assert value.device.type == "cuda", f"{name}.{key} on {value.device}"
                torch.testing.assert_close(value.cpu(), expected, rtol=1e-3, atol=1e-6, msg=f"{name}.{key}")
                compared += 1
    assert compared > 0
    for (name, parameter), expected in zip(cuda.named_parameters(), cpu.parameters(), strict=True):
        differs = ~torch.isclose(parameter.detach().cpu(), expected.detach(), rtol=1e-3, atol=1e-5)
        # GPTQ's error feedback may round an element to the neighbouring code on one device (2 of 8192
        # in the last down_proj on an H100); anything systematic differs in far more elements
        assert differs.float().mean() <= 1e-3, f"{name}: {int(differs.sum())} of {differs.numel()} differ"
