"""NVFP4 / MXFP4 per-block scale search against brute-force float64 references written here: E2M1 rounding
to the nearest grid value, every candidate scale of every block scored, the best one kept; then the algorithm
through a quantizer, and the packed (exported) weight carrying the searched scales."""

import pytest
import torch
from torch import nn

import lowbit
from lowbit.compress.convert import pack_module_weight
from lowbit.formats import E2M1, fake_quant_mx, fake_quant_nvfp4
from lowbit.formats.scale_search import mx_block_amax, nvfp4_block_amax

E2M1_GRID = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)
E4M3_VALUES = torch.arange(1, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).double()  # positive, ascending


def e2m1_round(v):
    """Nearest E2M1 value (saturating at 6), float64; ties do not occur on random data."""
    magnitude = v.abs().clamp(max=6.0)
    nearest = E2M1_GRID[(magnitude[..., None] - E2M1_GRID).abs().argmin(-1)]
    return torch.sign(v) * nearest


def e4m3_round(v):
    return E4M3_VALUES[(v[..., None] - E4M3_VALUES).abs().argmin(-1)]


def weights(rows=8, columns=128, seed=0):
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, columns, generator=generator)
    w[torch.rand(rows, columns, generator=generator) < 0.03] *= 6
    return w


def nvfp4_reference(x, method):
    """Per block: every candidate E4M3 scale in float64, the one with the smallest squared error."""
    blocks = x.double().reshape(x.shape[0], -1, 16)
    g = x.double().abs().max() / (6 * 448)
    amax = blocks.abs().amax(-1)
    s6 = e4m3_round(amax / (6 * g))
    if method == "4over6":
        candidates = torch.stack([s6, e4m3_round(amax / (4 * g))])
    else:
        index = (E4M3_VALUES[None, None, :] == s6[..., None]).double().argmax(-1)
        offsets = torch.tensor([0, -3, -2, -1, 1, 2, 3, 4])
        candidates = E4M3_VALUES[(index[None] + offsets[:, None, None]).clamp(0, 125)]
    unit = (candidates * g)[..., None]
    fake = e2m1_round(blocks[None] / unit) * unit
    errors = (fake - blocks[None]).square().sum(-1)
    return fake.gather(0, errors.argmin(0)[None, ..., None].expand(1, *blocks.shape))[0].reshape(x.shape), errors


@pytest.mark.parametrize("method", ["4over6", "mse"])
def test_nvfp4_search_matches_brute_force(method):
    x = weights(seed=1)
    block_amax = nvfp4_block_amax(x, method=method)
    fake = fake_quant_nvfp4(x, block_amax=block_amax).double()
    reference, errors = nvfp4_reference(x, method)
    chosen = (fake - x.double()).reshape(8, -1, 16).square().sum(-1)
    torch.testing.assert_close(chosen, errors.min(0).values, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(fake, reference, rtol=1e-6, atol=1e-7)
    default = (fake_quant_nvfp4(x).double() - x.double()).reshape(8, -1, 16).square().sum(-1)
    assert (chosen <= default * (1 + 1e-6)).all() and chosen.sum() < 0.97 * default.sum()


def test_mxfp4_search_matches_brute_force():
    x = weights(seed=2)
    fake = fake_quant_mx(x, E2M1, block_amax=mx_block_amax(x, E2M1)).double()
    blocks = x.double().reshape(8, -1, 32)
    e0 = torch.floor(torch.log2(blocks.abs().amax(-1))) - 2
    unit = torch.stack([2.0 ** (e0 + k) for k in (0, -1, 1)])[..., None]
    candidates = e2m1_round(blocks[None] / unit) * unit
    errors = (candidates - blocks[None]).square().sum(-1)
    chosen = (fake.reshape(8, -1, 32) - blocks).square().sum(-1)
    torch.testing.assert_close(chosen, errors.min(0).values, rtol=1e-6, atol=1e-9)
    assert chosen.sum() < errors[0].sum()


@pytest.mark.parametrize("preset", ["W4A16_NVFP4_CFG", "MXFP4_DEFAULT_CFG"])
def test_algorithm_stores_searched_scales_and_packing_keeps_them(preset):
    x = weights(16, 128, seed=3)
    model = nn.Sequential(nn.Linear(128, 16, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(x)
    config = lowbit.get_preset(preset)
    config["algorithm"] = {"method": "block_scale_search", "search": "mse"}
    lowbit.quantize(model, config)
    quantizer = model[0].weight_quantizer
    assert quantizer.block_amax is not None
    fake = quantizer(model[0].weight).detach()
    default = fake_quant_nvfp4(x) if preset.startswith("W4A16") else fake_quant_mx(x, E2M1)
    assert (fake - x).square().sum() < 0.97 * (default - x).square().sum()
    torch.testing.assert_close(pack_module_weight(model[0]).dequantize(), fake, rtol=0, atol=0)


def test_block_scale_search_errors_name_the_problem():
    model = nn.Sequential(nn.Linear(128, 16, bias=False))
    with pytest.raises(ValueError, match="0.weight_quantizer: block_scale_search needs an NVFP4 or MX"):
        lowbit.quantize(model, {**lowbit.get_preset("INT4_BLOCKWISE_WEIGHT_ONLY_CFG"),
                                "algorithm": "block_scale_search"})
    with pytest.raises(ValueError, match="search='4over6' is not defined for mxfp4"):
        lowbit.quantize(model, {**lowbit.get_preset("MXFP4_DEFAULT_CFG"),
                                "algorithm": {"method": "block_scale_search", "search": "4over6"}})



def test_packed_experts_keep_each_experts_searched_scales():
    from lowbit.compress.experts import pack_experts
    from lowbit.expert_quantizer import ExpertQuantizer

    weight = torch.stack([weights(16, 64, seed=7), weights(16, 64, seed=8) * 3])
    quantizer = ExpertQuantizer(lowbit.get_preset("W4A16_NVFP4_CFG")["quant_cfg"]["*weight_quantizer"], num_experts=2)
    global_amax = weight.abs().amax(dim=(1, 2))
    quantizer.amax = global_amax
    quantizer.block_amax = torch.stack([nvfp4_block_amax(weight[e], global_amax[e]) for e in range(2)])
    packed = pack_experts(weight, quantizer)
    for expert in range(2):
        expected = fake_quant_nvfp4(weight[expert], global_amax[expert], block_amax=quantizer.block_amax[expert])
        assert not torch.equal(expected, fake_quant_nvfp4(weight[expert], global_amax[expert]))
        torch.testing.assert_close(packed.expert(expert).dequantize(), expected, rtol=0, atol=0)
