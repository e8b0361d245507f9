"""Parity with NVIDIA ModelOpt's TensorQuantizer (skipped when ``modelopt`` is not importable).

Both quantizers are calibrated (max) on the same batch; the calibrated amax must be equal, and on a
second batch with values beyond that amax (so clamping is exercised) lowbit's output must equal
ModelOpt's within 1 float32 ulp of ModelOpt's value, elementwise. Integer formats come out bit-exact;
FP8 E4M3 differs by at most 1 ulp on some elements because ModelOpt's CPU path multiplies by
``1 / scale`` where lowbit divides by ``scale``. ModelOpt's NVFP4 and MX fake quant need CUDA: those
cases run only on a GPU machine.
"""

from __future__ import annotations

import math

import pytest
import torch

from lowbit import QuantizerAttributeConfig, TensorQuantizer

from .helpers import calibrate_quantizer
from .reference import random_with_outliers

pytestmark = [pytest.mark.peer, pytest.mark.filterwarnings("ignore::UserWarning")]
modelopt_nn = pytest.importorskip("modelopt.torch.quantization.nn", reason="nvidia-modelopt is not installed")
modelopt_config = pytest.importorskip("modelopt.torch.quantization.config")

CPU_CASES = {
    "int8 per-tensor": {"num_bits": 8, "axis": None},
    "int8 per-channel axis 0": {"num_bits": 8, "axis": 0},
    "int4 block 128": {"num_bits": 4, "block_sizes": {-1: 128}},
    "fp8 e4m3 per-tensor": {"num_bits": (4, 3), "axis": None},
    "int4 per-channel axis 1": {"num_bits": 4, "axis": 1},
    "int8 narrow_range": {"num_bits": 8, "narrow_range": True},
    "int8 unsigned": {"num_bits": 8, "unsigned": True},
}
CUDA_CASES = {
    "nvfp4": {"num_bits": (2, 1), "block_sizes": {-1: 16, "type": "dynamic", "scale_bits": (4, 3)}},
}
# MX: lowbit takes the OCP MX v1.0 shared exponent floor(log2 amax) - emax_elem (values above the element
# format's max in the block's top binade saturate); ModelOpt takes ceil(log2(amax / max_elem)) (no
# clipping, one binade coarser there). The two agree on blocks whose amax / 2**floor(log2 amax) is at most
# max_elem / 2**emax_elem (E2M1: 1.5, E4M3: 1.75); the test compares those blocks and checks the others
# are exactly the ones the rules split.
MX_CASES = {
    "mxfp4": ({"num_bits": (2, 1), "block_sizes": {-1: 32, "type": "dynamic", "scale_bits": (8, 0)}}, 6.0),
    "mxfp8": ({"num_bits": (4, 3), "block_sizes": {-1: 32, "type": "dynamic", "scale_bits": (8, 0)}}, 448.0),
}


def _ulps_apart(actual: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """|actual - expected| in units of the float32 spacing at |expected|."""
    magnitude = expected.abs().float()
    spacing = torch.nextafter(magnitude, torch.full_like(magnitude, float("inf"))) - magnitude
    return (actual.float() - expected.float()).abs() / spacing


def quantized_pair(attributes: dict, device: str = "cpu", seed: int = 0):
    """Both quantizers calibrated on one batch, and a second batch ``x`` (beyond the calibrated range)."""
    generator = torch.Generator().manual_seed(seed)
    calibration = random_with_outliers((64, 256), generator).to(device)
    x = (random_with_outliers((64, 256), generator) * 1.5).to(device)
    if attributes.get("unsigned"):  # ModelOpt raises on negative input to an unsigned quantizer
        calibration, x = calibration.abs(), x.abs()
    theirs = modelopt_nn.TensorQuantizer(modelopt_config.QuantizerAttributeConfig(**attributes)).to(device)
    ours = TensorQuantizer(QuantizerAttributeConfig(**attributes)).to(device)
    for quantizer in (theirs, ours):
        calibrate_quantizer(quantizer, calibration)
    return theirs, ours, x


def compare(attributes: dict, device: str = "cpu", seed: int = 0) -> dict:
    """Calibrate both on one batch, quantize another; returns the figures (amax equal, max abs diff, ulps)."""
    theirs, ours, x = quantized_pair(attributes, device, seed)
    if theirs.amax is None:
        amax_equal = ours.amax is None
    else:
        amax_equal = torch.equal(theirs.amax.reshape(-1), ours.amax.reshape(-1))
    with torch.no_grad():
        expected, actual = theirs(x), ours(x)
    difference = (actual - expected).abs()
    ulps = _ulps_apart(actual, expected)
    return {
        "amax_equal": amax_equal,
        "max_abs_diff": difference.max().item(),
        "max_ulps": ulps.max().item(),
        "elements_differing": int((difference > 0).sum()),
        "elements": difference.numel(),
    }


@pytest.mark.parametrize("case", list(CPU_CASES))
def test_matches_modelopt_on_cpu(case):
    figures = compare(CPU_CASES[case])
    print(f"{case}: {figures}")
    assert figures["amax_equal"], figures
    assert figures["max_ulps"] <= 1.0, figures


def test_pre_quant_scale_matches_modelopt():
    generator = torch.Generator().manual_seed(1)
    x = random_with_outliers((16, 64), generator)
    scale = torch.rand(64, generator=generator) + 0.5
    theirs = modelopt_nn.TensorQuantizer(modelopt_config.QuantizerAttributeConfig(num_bits=8, axis=0))
    ours = TensorQuantizer(QuantizerAttributeConfig(num_bits=8, axis=0))
    for quantizer in (theirs, ours):
        quantizer.pre_quant_scale = scale
        calibrate_quantizer(quantizer, x)
    assert torch.equal(theirs.amax.reshape(-1), ours.amax.reshape(-1))
    with torch.no_grad():
        assert _ulps_apart(ours(x), theirs(x)).max() <= 1.0
        theirs.disable()
        ours.disable()
        assert torch.equal(ours(x), theirs(x))


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(CUDA_CASES))
def test_matches_modelopt_on_cuda(case):
    if not torch.cuda.is_available():
        pytest.skip("ModelOpt's NVFP4 / MX fake quant needs CUDA (its CPU path asserts a CUDA amax)")
    figures = compare(CUDA_CASES[case], device="cuda")
    print(f"{case}: {figures}")
    assert figures["amax_equal"], figures
    assert figures["max_ulps"] <= 1.0, figures


def test_smoothquant_preset_matches_modelopt_on_tiny_llama():
    """INT8_SMOOTHQUANT_CFG of both, same calibration batch: the logits error vs float agrees to 0.1%.
    ModelOpt smooths each linear (alpha 1.0, pre_quant_scale, activations calibrated on the float model);
    lowbit folds one scale per input group into the norm where it can; at alpha 1.0 the scale
    ``max|X_j|`` is the same for every linear of a group. (Max calibration differs by design: lowbit
    calibrates activations through the quantized weights.)"""
    import copy

    import modelopt.torch.quantization as mtq

    import lowbit

    from .helpers import tiny_llama, token_batches

    base = tiny_llama()
    calibration = token_batches(512, count=1)
    test_tokens = token_batches(512, count=1, seed=99)[0]

    def forward_loop(model):
        for batch in calibration:
            model(batch)

    ours, theirs = copy.deepcopy(base), copy.deepcopy(base)
    lowbit.quantize(ours, lowbit.get_preset("INT8_SMOOTHQUANT_CFG"), forward_loop)
    mtq.quantize(theirs, copy.deepcopy(mtq.INT8_SMOOTHQUANT_CFG), forward_loop)
    with torch.no_grad():
        reference, ours_logits, theirs_logits = (m(test_tokens).logits for m in (base, ours, theirs))
    our_error = float((ours_logits - reference).norm() / reference.norm())
    their_error = float((theirs_logits - reference).norm() / reference.norm())
    assert our_error == pytest.approx(their_error, rel=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(MX_CASES))
def test_mx_matches_modelopt_where_the_scale_rules_agree(case):
    """Blocks where OCP's and ModelOpt's shared exponents agree (float64 in the test) match within 1 ulp;
    every block where they disagree is one of the "top of the binade" blocks the module comment names."""
    if not torch.cuda.is_available():
        pytest.skip("ModelOpt's MX fake quant needs CUDA (its CPU path asserts a CUDA amax)")
    attributes, max_elem = MX_CASES[case]
    theirs, ours, x = quantized_pair(attributes, device="cuda")
    with torch.no_grad():
        expected, actual = theirs(x).cpu(), ours(x).cpu()
    amax = x.cpu().double().reshape(64, -1, 32).abs().amax(dim=-1)
    emax = math.floor(math.log2(max_elem))
    ocp = torch.floor(torch.log2(amax)) - emax
    modelopt = torch.ceil(torch.log2(amax / max_elem))
    agree = (ocp == modelopt)[..., None].expand(64, -1, 32).reshape(64, 256)
    top_of_binade = amax / torch.exp2(torch.floor(torch.log2(amax))) > max_elem / 2**emax
    assert torch.equal(~(ocp == modelopt), top_of_binade)
    assert agree.any() and (~agree).any()  # both kinds of block are exercised
    assert _ulps_apart(actual[agree], expected[agree]).max() <= 1.0
