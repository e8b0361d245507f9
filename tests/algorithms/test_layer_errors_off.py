"""lowbit.algorithms.layerwise.without_layer_errors: the passes that only measure are skipped, the result is
unchanged (against the same run with them), and the passes that also feed something still run."""

import math

import torch

import lowbit
from lowbit.algorithms.layerwise import without_layer_errors
from lowbit.algorithms.registry import run_algorithm
from tests.algorithms.tiny_llama import forward_loop_for, logits, tiny_llama

INT4_G32 = {"quant_cfg": {"*weight_quantizer": {"num_bits": 4, "block_sizes": {-1: 32}},
                          "*input_quantizer": {"enable": False}, "default": {"enable": False}}, "algorithm": None}


def batches(seed=3):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 96, (2, 16), generator=generator) for _ in range(2)]


def awq_lite(layer_inputs, measure):
    model = lowbit.quantize(tiny_llama(), INT4_G32)
    options = {"layer_inputs": layer_inputs, "scale_per_linear": True}
    if measure:
        report = run_algorithm("awq_lite", model, forward_loop_for(batches()), options)
    else:
        with without_layer_errors():
            report = run_algorithm("awq_lite", model, forward_loop_for(batches()), options)
    return model, report


def test_skipping_the_error_passes_keeps_the_result_and_reports_nan():
    measured, report = awq_lite("float", measure=True)
    skipped, quiet = awq_lite("float", measure=False)
    assert torch.equal(logits(measured, batches(4)), logits(skipped, batches(4)))
    for name, buffer in measured.state_dict().items():
        assert torch.equal(buffer, skipped.state_dict()[name]), name
    assert all(r.mse_after > 0 and r.mse_max > 0 for r in report)
    assert all(math.isnan(r.mse_after) and math.isnan(r.mse_max) for r in quiet)
    assert len(quiet) == len(report)


def test_quantized_layer_inputs_still_run_the_pass_that_feeds_the_next_layer():
    measured, report = awq_lite("quantized", measure=True)
    skipped, quiet = awq_lite("quantized", measure=False)
    assert torch.equal(logits(measured, batches(4)), logits(skipped, batches(4)))
    blocks = [r for r in report if r.name.startswith("model.layers.")]  # lm_head, after them, feeds no layer
    assert len(blocks) == 2
    assert [r.mse_after for r in quiet[:2]] == [r.mse_after for r in blocks]
    assert all(r.mse_after > 0 for r in blocks)
