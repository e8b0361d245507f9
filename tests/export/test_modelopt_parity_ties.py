"""ModelOpt parity on bf16-valued weights: the exported codes are identical, rounding ties included.

``test_modelopt_parity`` uses float32-random weights, where ``w / weight_scale`` practically never lands on a
rounding midpoint, so a code rule that rounds differently from ModelOpt's exporter on ties passes there. Real
checkpoints hold bf16 values (8 significant bits), and then exact E4M3 / integer midpoints are common: the
bundled model's FP8 per-channel export had 1,233 of 6,291,456 codes on them. Here the tiny model's weights are
rounded to bf16 (outlier columns kept), quantized and calibrated by ModelOpt, copied into lowbit, and both
exporters write the same layers. The codes must then be bit-identical (tolerance 0), the scales equal to 1 ulp
of float32 as in ``test_modelopt_parity``, and the fixture must contain midpoints of ModelOpt's own rule
``w / weight_scale`` (so the test can fail): counted from that quotient in float64 against the format's grid.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from lowbit.export import export_hf_checkpoint
from lowbit.export.modelopt_hf import unpack_int4_rows

from .test_modelopt_parity import ULP, lowbit_copy, modelopt_quantized, quantized_layers
from .tiny import tiny_llama

pytestmark = pytest.mark.peer
# (ModelOpt preset, minimum number of midpoints the fixture must hold): the AWQ and SmoothQuant presets scale the
# weights by calibrated float32 factors before rounding, which removes most bf16 structure (0 allowed there).
# With algorithm "max" (``_max``) the weights stay bf16 values, so the INT grids meet midpoints too.
CASES = [("FP8_DEFAULT_CFG", 1), ("FP8_PER_CHANNEL_PER_TOKEN_CFG", 1), ("INT4_AWQ_CFG", 0), ("INT4_AWQ_CFG_max", 1),
         ("W4A8_AWQ_BETA_CFG", 0), ("W4A8_AWQ_BETA_CFG_max", 1), ("INT8_SMOOTHQUANT_CFG", 0),
         ("INT8_SMOOTHQUANT_CFG_max", 1)]
BLOCK = 128  # the INT4 presets' group size: every group's amax gets the short mantissa
AMAX_MANTISSA = 49 / 32


def bf16_valued_llama():
    """``tiny_llama()`` (outlier input columns x8) with every parameter rounded to bf16, kept in float32, and the
    largest |w| of each group of ``BLOCK`` inputs moved up to the next value ``AMAX_MANTISSA * 2**k`` (a bf16 value;
    so every per-tensor, per-channel and per-group amax has that mantissa). With bf16 weights and such an amax,
    ``w * bound / amax`` is often exactly a midpoint of the grid, and neither ``bound / amax`` nor ``amax / bound``
    is exact in float32, so ``w * scale`` and ``w / step`` can land on opposite sides of it. Of the 128 bf16
    mantissas, 49/32 splits the two rules most often for E4M3 (60 of the bf16 values below it; exhaustive table in
    bench/results/code_rule_ties_2026-12-07.md, where this test's before / after counts are too)."""
    model = tiny_llama()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            parameter.copy_(parameter.to(torch.bfloat16).float())
            if name.endswith("proj.weight"):
                groups = parameter.view(parameter.shape[0], -1, BLOCK)
                peak = groups.abs().argmax(dim=2, keepdim=True)
                largest = groups.gather(2, peak)
                short = AMAX_MANTISSA * torch.exp2(torch.ceil(torch.log2(largest.abs() / AMAX_MANTISSA)))
                groups.scatter_(2, peak, torch.copysign(short, largest))
    return model


def float_codes(tensors: dict[str, torch.Tensor], layer: str) -> torch.Tensor:
    """A layer's codes as float64 (FP8 values, or INT4 / INT8 integers)."""
    weight = tensors[f"{layer}.weight"]
    if weight.dtype == torch.uint8:
        return unpack_int4_rows(weight).double()
    return weight.double()


def per_element(scale: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """weight_scale () / (N,) / (N, K/g) broadcast to the (N, K) weight."""
    if scale.dim() == 0:
        return scale.expand(shape)
    if scale.dim() == 1:
        return scale[:, None].expand(shape)
    return scale.repeat_interleave(shape[1] // scale.shape[1], dim=1)


def midpoints(quotient: torch.Tensor, is_float: bool) -> torch.Tensor:
    """Where float32 ``quotient`` lies exactly halfway between two neighbours of the code grid (float64 math):
    integers for INT codes; for E4M3, spacing 2**(e - 3) in the binade [2**e, 2**(e+1)), e >= -6 (subnormals
    share 2**-9), and nothing at or beyond 448."""
    q = quotient.double().abs()
    if not is_float:
        return q - q.floor() == 0.5
    _, exponent = torch.frexp(q)  # q = m * 2**exponent, m in [0.5, 1): binade 2**(exponent - 1)
    spacing = torch.pow(2.0, (exponent - 1).clamp(min=-6).double() - 3)
    units = q / spacing
    return (units - units.floor() == 0.5) & (q < 448)


@pytest.mark.parametrize(("name", "min_midpoints"), CASES)
def test_bf16_valued_export_codes_equal_modelopt(tmp_path, name, min_midpoints):
    from modelopt.torch.export import export_hf_checkpoint as modelopt_export

    base = bf16_valued_llama()
    preset, _, algorithm = name.partition("_CFG")
    reference = modelopt_quantized(base, preset + "_CFG", algorithm.lstrip("_") or None)
    ours_model = lowbit_copy(base, preset + "_CFG", reference)
    export_hf_checkpoint(ours_model, tmp_path / "lowbit")
    modelopt_export(reference, export_dir=tmp_path / "modelopt")
    theirs = load_file(str(tmp_path / "modelopt" / "model.safetensors"))
    ours = load_file(str(tmp_path / "lowbit" / "model.safetensors"))
    differing = ties = total = 0
    for layer in sorted(quantized_layers(theirs)):
        their_codes, our_codes = float_codes(theirs, layer), float_codes(ours, layer)
        scale, our_scale = theirs[f"{layer}.weight_scale"], ours[f"{layer}.weight_scale"]
        assert ((our_scale.double() - scale.double()).abs() <= ULP * scale.double().abs()).all(), layer
        weight = ours_model.get_submodule(layer).weight.detach().float()  # ModelOpt's weights, copied
        quotient = weight / per_element(scale.float(), weight.shape)  # ModelOpt's exporter's rule, in float32
        ties += int(midpoints(quotient, theirs[f"{layer}.weight"].dtype == torch.float8_e4m3fn).sum())
        differing += int((their_codes != our_codes).sum())
        total += their_codes.numel()
    print(f"{name}: {differing} of {total} codes differ from ModelOpt's; {ties} midpoints of w / weight_scale")
    assert ties >= min_midpoints
    assert differing == 0
