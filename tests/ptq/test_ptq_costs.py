"""What ``lowbit ptq`` does to save time, each against a reference written here: the reload check's logits
difference at the last position (computed from full float64 logits here), and the AWQ search's loss precision
(bfloat16 exactly where the device multiplies bfloat16 natively, for AWQ scale searches alone)."""

import copy

import pytest
import torch

from lowbit.ptq import qformats
from lowbit.ptq.qformats import ptq_config, with_search_precision
from lowbit.ptq.reload import relative_difference
from tests.export.tiny import tiny_llama, token_batches


def test_logits_difference_is_the_last_positions():
    model = tiny_llama(seed=3)
    other = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in other.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=torch.Generator().manual_seed(5)) * 1e-3)
    ids = token_batches(seed=2)
    with torch.no_grad():
        expected = model(input_ids=ids[:1]).logits[0, -1].double()
        actual = other(input_ids=ids[:1]).logits[0, -1].double()
    reference = ((actual - expected).norm() / expected.norm()).item()
    assert reference > 1e-4  # the perturbation shows
    assert relative_difference(model, other, {"input_ids": ids}) == pytest.approx(reference, rel=1e-4)


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("qformat", ["int4_awq", "w4a8_awq", "nvfp4_awq", "int4_gptq", "fp8"])
def test_awq_searches_compare_in_bf16_where_native(monkeypatch, native, qformat):
    monkeypatch.setattr(qformats, "native_bf16_matmuls", lambda device: native)
    config = ptq_config(qformat)
    tuned = with_search_precision(config, "cpu")
    algorithm = config.get("algorithm")
    awq = isinstance(algorithm, dict) and algorithm.get("method") in ("awq_lite", "awq_full")
    if awq and native:
        assert tuned["algorithm"] == {**algorithm, "loss_dtype": "bfloat16"}
        assert "loss_dtype" not in algorithm  # the preset itself is left alone
    else:
        assert tuned == config
