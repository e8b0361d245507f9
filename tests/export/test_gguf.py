"""GGUF blocks from lowbit's codes: decoded by a decoder written here from the GGUF block layouts, the
values are lowbit's codes times float16 steps; grids no GGUF type holds are refused with the layer named.
(The file itself, read back by gguf's reader and transformers: tests/consumers/test_gguf_consumer.py.)"""

import copy

import numpy as np
import pytest
import torch
from torch import nn

import lowbit
from lowbit.export.gguf import encode_blocks, gguf_type, rope_permute
from lowbit.export.weights import quantized_weight


def weight_with_outliers(shape, seed):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(shape, generator=generator) * 0.05
    weight[3, 7] = 1.5
    weight[:, 40] *= 20
    return weight


def quantized_linear(weight_cfg, seed=0, shape=(16, 128)):
    layer = nn.Sequential(nn.Linear(shape[1], shape[0], bias=False))
    with torch.no_grad():
        layer[0].weight.copy_(weight_with_outliers(shape, seed))
    cfg = {"quant_cfg": {"*weight_quantizer": weight_cfg, "*input_quantizer": {"enable": False},
                         "default": {"enable": False}}, "algorithm": "max"}
    return lowbit.quantize(layer, cfg)[0]


def decode(blocks, type_name, columns):
    """GGUF block bytes -> float64 (N, K), from the layouts: Q8_0 = f16 d, 32 int8; Q4_0 = f16 d, 16 bytes of
    nibbles (element j low, j + 16 high), value (q - 8) d; Q4_1 = f16 d, f16 m, nibbles, value q d + m."""
    rows = blocks.shape[0]
    size = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}[type_name]
    raw = blocks.reshape(rows, columns // 32, size)
    d = raw[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float64)[..., None]
    if type_name == "Q8_0":
        return (raw[..., 2:].view(np.int8).astype(np.float64) * d).reshape(rows, columns)
    start = 2 if type_name == "Q4_0" else 4
    nibbles = raw[..., start:]
    q = np.concatenate([nibbles & 15, nibbles >> 4], axis=-1).astype(np.float64)
    if type_name == "Q4_0":
        return ((q - 8) * d).reshape(rows, columns)
    m = raw[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float64)[..., None]
    return (q * d + m).reshape(rows, columns)


def reference_codes(weight, bits, group, unsigned=False):
    """lowbit's symmetric codes from the definition, float64: round_half_even(w * qmax / amax), clamped."""
    w = weight.double().reshape(weight.shape[0], -1, group)
    amax = w.abs().amax(dim=-1, keepdim=True)
    qmax = 2**bits - 1 if unsigned else 2 ** (bits - 1) - 1
    qmin = 0 if unsigned else -(2 ** (bits - 1))
    scale = (qmax / amax.float()).double()  # lowbit's float32 scale
    return torch.clamp(torch.round(w * scale), qmin, qmax).reshape(weight.shape), scale


@pytest.mark.parametrize("bits,group,type_name", [(8, None, "Q8_0"), (8, 64, "Q8_0"), (4, 32, "Q4_0"),
                                                  (4, 128, "Q4_0")])
def test_symmetric_blocks_hold_lowbit_codes(bits, group, type_name):
    cfg = {"num_bits": bits, "axis": 0} if group is None else {"num_bits": bits, "block_sizes": {-1: group}}
    module = quantized_linear(cfg, seed=bits + (group or 0))
    weight = quantized_weight("layer", module)
    assert gguf_type(weight) == type_name
    values = decode(encode_blocks(weight, type_name), type_name, 128)
    codes, scale = reference_codes(module.weight.detach(), bits, group or 128)
    assert torch.equal(weight.codes.double(), codes)
    step = (1.0 / scale.float()).to(torch.float16).double()  # the float16 d the file holds
    expected = (codes.reshape(16, -1, group or 128) * step).reshape(16, 128)
    assert np.array_equal(values, expected.numpy())
    fake = module.weight_quantizer(module.weight.detach()).double().numpy()
    assert np.abs(values - fake).max() <= 2.0**-11 * np.abs(fake).max()  # only d's float16 rounding


def test_asymmetric_int4_is_q4_1():
    module = quantized_linear({"num_bits": 4, "asymmetric": True, "block_sizes": {-1: 32}}, seed=3)
    weight = quantized_weight("layer", module)
    assert gguf_type(weight) == "Q4_1"
    values = decode(encode_blocks(weight, "Q4_1"), "Q4_1", 128)
    w = module.weight.detach().double().reshape(16, 4, 32)
    low, high = w.amin(-1, keepdim=True).clamp(max=0), w.amax(-1, keepdim=True).clamp(min=0)
    step = ((high - low).float() / 15).double()
    zero = torch.clamp(torch.round(-low / step), 0, 15)
    q = torch.clamp(torch.round(w / step) + zero, 0, 15)
    d, m = step.to(torch.float16).double(), (-zero * step).to(torch.float16).double()
    assert np.array_equal(values, (q * d + m).reshape(16, 128).numpy())
    fake = module.weight_quantizer(module.weight.detach()).double().numpy()
    assert np.abs(values - fake).max() <= 2.0**-10 * np.abs(fake).max()


@pytest.mark.parametrize("cfg,message", [
    ({"num_bits": 4, "block_sizes": {-1: 16}}, "multiple of 32"),
    ({"num_bits": (4, 3), "axis": None}, "no GGUF type"),
    ({"num_bits": 8, "asymmetric": True, "axis": 0}, "no GGUF type"),
    ({"num_bits": (2, 1), "block_sizes": {-1: 16, "type": "dynamic", "scale_bits": (4, 3)}}, "nvfp4"),
])
def test_grids_without_a_gguf_type_are_refused(cfg, message):
    module = quantized_linear(cfg, seed=5)
    with pytest.raises(ValueError, match=rf"layer 'blk\.0'.*{message}"):
        gguf_type(quantized_weight("blk.0", module))


def test_rope_permutation_interleaves_each_heads_halves():
    heads, head_dim = 3, 8
    rows = np.arange(heads * head_dim * 2).reshape(heads * head_dim, 2)
    permuted = rope_permute(rows, heads)
    for h in range(heads):
        for i in range(head_dim // 2):  # llama.cpp row 2i / 2i+1 = transformers row i / i + head_dim/2
            assert np.array_equal(permuted[h * head_dim + 2 * i], rows[h * head_dim + i])
            assert np.array_equal(permuted[h * head_dim + 2 * i + 1], rows[h * head_dim + i + head_dim // 2])


def test_activation_quantization_is_refused_before_writing(tmp_path):
    pytest.importorskip("gguf")
    from lowbit.export.gguf import export_gguf

    model, tokenizer = lowbit.assets.load_default_model()
    quantized = lowbit.quantize(copy.deepcopy(model), copy.deepcopy(lowbit.INT8_DEFAULT_CFG),
                                lambda m: m(tokenizer("a b c", return_tensors="pt").input_ids))
    with pytest.raises(ValueError, match=r"layer 'model\.layers\.0\.self_attn\.q_proj': input_quantizer"):
        export_gguf(quantized, tmp_path / "out", tokenizer=tokenizer)
    assert not (tmp_path / "out").exists()
