"""Each compression mode's fake-quantized weights against a float64 reference written from its definition."""

from __future__ import annotations

import pytest
import torch

from lowbit.formats.nf4 import NF4_VALUES, dequantize_nf4, fake_quant_nf4, quantize_nf4
from lowbit.weight_compression import CompressWeightsMode, LayerFormat, compress_weights

from . import reference

SIZES = [64, 128, 64, 32]  # three Linear layers; in_features multiples of 64


def _compressed_weights(mode: str, group_size: int | None, seed: int = 0):
    """(original weights, fake-quantized weights) of every Linear after compress_weights, all in ``mode``."""
    model = reference.linear_stack(SIZES, torch.Generator().manual_seed(seed))
    originals = [m.weight.detach().clone() for m in model if isinstance(m, torch.nn.Linear)]
    compress_weights(model, mode=mode, group_size=group_size, all_layers=mode not in ("int8_asym", "int8_sym"),
                     packed=False)
    quantized = [m.quantized_weight().detach() for m in model if isinstance(m, torch.nn.Linear)]
    return originals, quantized


CASES = [
    ("int8_asym", None, lambda w: reference.int_asym(w, 8, -1)),
    ("int8_sym", None, lambda w: reference.int_sym(w, 8, -1)),
    ("int4_asym", 32, lambda w: reference.int_asym_searched(w, 4, 32)),
    ("int4_asym", -1, lambda w: reference.int_asym_searched(w, 4, -1)),
    ("int4_sym", 32, lambda w: reference.int_sym_searched(w, 4, 32)),
    ("int4_sym", 64, lambda w: reference.int_sym_searched(w, 4, 64)),
    ("nf4", 32, lambda w: reference.nf4(w, 32)),
    ("fp4", 32, lambda w: reference.scaled_float(w, 32, reference.float_grid(2, 1, 6.0))),
    ("fp8_e4m3", 32, lambda w: reference.scaled_float(w, 32, reference.float_grid(4, 3, 448.0))),
    ("mxfp4", None, reference.mxfp4),
]


@pytest.mark.parametrize(("mode", "group_size", "expected"), CASES, ids=[f"{m}-g{g}" for m, g, _ in CASES])
def test_mode_matches_reference(mode, group_size, expected):
    # The float32 formula and the float64 reference may round a value lying within float32 noise of a
    # rounding boundary differently; none does for these seeds, so the tolerance is float32 rounding.
    for original, quantized in zip(*_compressed_weights(mode, group_size), strict=True):
        reference_weight = expected(original).float()
        torch.testing.assert_close(quantized, reference_weight, rtol=1e-6, atol=1e-7)
        assert not torch.equal(quantized, original)


def test_int4_search_is_never_worse_than_plain_calibration():
    """Per group, the searched range's error (squared for asym, largest absolute for sym) is <= min/max
    calibration (asym) or NNCF's plain signed step (sym); float32 noise allowed. The sym search does shrink."""
    squared, largest = (lambda d: d.square().sum(-1)), (lambda d: d.abs().amax(-1))
    for mode, plain, error_of in (("int4_asym", lambda w: reference.int_asym(w, 4, 32), squared),
                                  ("int4_sym", lambda w: reference.int_sym(w, 4, 32), largest)):
        original, quantized = (t[0] for t in _compressed_weights(mode, 32, seed=3))
        groups = reference.groups(original, 32)
        error = error_of(quantized.double().reshape(groups.shape) - groups)
        plain_error = error_of(plain(original).reshape(groups.shape) - groups)
        assert torch.all(error <= plain_error * (1 + 1e-5))
        assert (error < plain_error * (1 - 1e-3)).any()


def test_nf4_functions_match_table():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(40, 64, generator=generator) * 3
    amax = x.abs().amax(-1, keepdim=True)
    codes, scale = quantize_nf4(x, amax)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 15
    table = torch.tensor(NF4_VALUES, dtype=torch.float64)
    expected_codes = ((x.double() / amax.double()).unsqueeze(-1) - table).abs().argmin(-1)
    assert torch.equal(codes.long(), expected_codes)
    torch.testing.assert_close(dequantize_nf4(codes, scale), (table[expected_codes] * amax.double()).float())
    assert fake_quant_nf4(x.to(torch.bfloat16), amax).dtype == torch.bfloat16
    # every table value is a fixed point; a zero amax gives scale 1
    levels = torch.tensor(NF4_VALUES)
    assert torch.equal(fake_quant_nf4(levels, 1.0), levels)
    assert torch.equal(quantize_nf4(torch.zeros(3), torch.zeros(()))[1], torch.tensor(1.0))


def test_storage_bits_per_mode():
    out, n_in = 8, 256
    bits = {mode: LayerFormat(mode, group).storage_bits(out, n_in) for mode, group in [
        (CompressWeightsMode.INT8_ASYM, -1), (CompressWeightsMode.INT8_SYM, -1), (CompressWeightsMode.INT4_ASYM, 64),
        (CompressWeightsMode.INT4_SYM, 128), (CompressWeightsMode.NF4, 128), (CompressWeightsMode.MXFP4, 32),
        (CompressWeightsMode.FP8_E4M3, 128)]}
    assert bits[CompressWeightsMode.INT8_ASYM] == out * n_in * 8 + out * (16 + 8)
    assert bits[CompressWeightsMode.INT8_SYM] == out * n_in * 8 + out * 16
    assert bits[CompressWeightsMode.INT4_ASYM] == out * n_in * 4 + out * 4 * (16 + 4)
    assert bits[CompressWeightsMode.INT4_SYM] == bits[CompressWeightsMode.NF4] == out * n_in * 4 + out * 2 * 16
    assert bits[CompressWeightsMode.MXFP4] == out * n_in * 4 + out * 8 * 8
    assert bits[CompressWeightsMode.FP8_E4M3] == out * n_in * 8 + out * 2 * 16
    assert CompressWeightsMode.E2M1 is CompressWeightsMode.MXFP4
