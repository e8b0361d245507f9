"""Q4_K / Q6_K blocks from lowbit's codes: after ``snap_k_quant_scales`` the blocks, decoded by a decoder
written here from llama.cpp's ``dequantize_row_q4_K`` / ``dequantize_row_q6_K`` loops, are lowbit's
fake-quantized weights up to float32 rounding (2 ulp); scales off the grid and rows that are not a multiple of
256 are refused with the layer named. (gguf's own dequantize and transformers: tests/consumers.)"""

import numpy as np
import pytest
import torch

from lowbit.export import snap_k_quant_scales
from lowbit.export.gguf import encode_blocks, gguf_type
from lowbit.export.weights import quantized_weight
from tests.export.test_gguf import quantized_linear


def decode_q6_k(block):
    """One 210-byte block -> 256 float64 values, following llama.cpp's loop element by element."""
    ql, qh, scales = block[:128], block[128:192], block[192:208].view(np.int8)
    d = float(block[208:210].view(np.float16)[0])
    out = np.zeros(256)
    for half in range(2):
        for lane in range(32):
            low, high, sc = ql[64 * half:], qh[32 * half + lane], scales[8 * half:]
            q = [(low[lane] & 15) | ((high >> 0) & 3) << 4, (low[lane + 32] & 15) | ((high >> 2) & 3) << 4,
                 (low[lane] >> 4) | ((high >> 4) & 3) << 4, (low[lane + 32] >> 4) | ((high >> 6) & 3) << 4]
            for i in range(4):
                out[128 * half + lane + 32 * i] = d * sc[lane // 16 + 2 * i] * (int(q[i]) - 32)
    return out


def decode_q4_k(block):
    """One 144-byte block -> 256 float64 values (llama.cpp's get_scale_min_k4 and dequantize loop)."""
    d, dmin = (float(v) for v in block[:4].view(np.float16))
    scales, qs = block[4:16], block[16:]

    def scale_min(j):
        if j < 4:
            return scales[j] & 63, scales[j + 4] & 63
        return (scales[j + 4] & 15) | ((scales[j - 4] >> 6) << 4), (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4)

    out = []
    for chunk in range(4):
        q = qs[32 * chunk:32 * chunk + 32]
        for nibbles, j in ((q & 15, 2 * chunk), (q >> 4, 2 * chunk + 1)):
            sc, m = scale_min(j)
            out.extend(d * sc * nibbles.astype(np.float64) - dmin * m)
    return np.array(out)


DECODERS = {"Q6_K": (decode_q6_k, 210), "Q4_K": (decode_q4_k, 144)}


@pytest.mark.parametrize("type_name,bits,group,magnitude", [("Q6_K", 6, 16, 0.05), ("Q6_K", 6, 16, 2e-4),
                                                            ("Q4_K", 4, 32, 0.05), ("Q4_K", 4, 32, 2e-4)])
def test_snapped_weights_are_the_file_values(type_name, bits, group, magnitude):
    # magnitude 2e-4: float16 d is subnormal there
    module = quantized_linear({"num_bits": bits, "block_sizes": {-1: group}}, seed=bits, shape=(6, 512))
    with torch.no_grad():
        module.weight.mul_(magnitude / 0.05)
    module.weight_quantizer.reset_amax()
    module.weight_quantizer.set_amax(module.weight_quantizer.compute_amax(module.weight))
    free = module.weight_quantizer(module.weight.detach()).double()
    assert snap_k_quant_scales(torch.nn.Sequential(module)) == ["0"]
    weight = quantized_weight("layer", module)
    assert gguf_type(weight) == type_name
    decode, size = DECODERS[type_name]
    blocks = encode_blocks(weight, type_name)
    assert blocks.shape == (6, 2 * size)
    values = np.stack([np.concatenate([decode(row[i * size:(i + 1) * size]) for i in range(2)]) for row in blocks])
    fake = module.weight_quantizer(module.weight.detach()).double().numpy()
    assert np.all(np.abs(values - fake) <= 2.0**-22 * np.abs(fake))  # lowbit divides by float32(1 / (d sc))
    codes = weight.codes.double().numpy()
    assert np.array_equal(np.sign(values), np.sign(codes))
    moved = np.linalg.norm(fake - free.numpy()) / np.linalg.norm(free.numpy())
    assert 0 < moved < 0.1  # the grid of scales moves the weights, a little


def test_unsnapped_int6_and_short_rows_are_refused():
    module = quantized_linear({"num_bits": 6, "block_sizes": {-1: 16}}, seed=1, shape=(4, 512))
    with pytest.raises(ValueError, match=r"layer 'blk\.1'.*not on Q6_K's grid.*snap_k_quant_scales"):
        encode_blocks(quantized_weight("blk.1", module), gguf_type(quantized_weight("blk.1", module)))
    int4 = quantized_linear({"num_bits": 4, "block_sizes": {-1: 32}}, seed=2, shape=(4, 512))
    assert gguf_type(quantized_weight("blk.2", int4)) == "Q4_0"  # off the k-grid: still exact as Q4_0
    short = quantized_linear({"num_bits": 6, "block_sizes": {-1: 16}}, seed=3, shape=(4, 128))
    with pytest.raises(ValueError, match=r"layer '0': Q6_K needs rows of a multiple of 256"):
        snap_k_quant_scales(torch.nn.Sequential(short))


def test_snapped_scales_are_float16_times_small_integers():
    module = quantized_linear({"num_bits": 6, "block_sizes": {-1: 16}}, seed=4, shape=(4, 256))
    snap_k_quant_scales(torch.nn.Sequential(module))
    steps = module.weight_quantizer.amax.double().reshape(4, 16) / 31
    d = (steps.amax(dim=1, keepdim=True) / 127).to(torch.float16).double()
    sc = steps / d
    assert torch.equal(sc, torch.round(sc)) and sc.min() >= 1 and torch.all(sc.amax(dim=1) == 127)
