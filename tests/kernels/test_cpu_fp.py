"""lowbit's C kernels for FP8 E4M3, INT8 and NVFP4 weights on the CPU (``lowbit.kernels.cpu_fp``).

References, written here in float64 from the stored codes (INT8: ``w = codes / scale``): the E4M3 value of every
byte (torch's own float8 cast, exact in float64), the E2M1 value of every nibble (the OCP table below),
``w = e4m3 / scale`` and ``w = fl32(e2m1 * fl32(block_scale * global_scale))`` (NVFP4's float32 products, as
the format forms them).

- Decoding: x = rows of the identity reads the weight back. Every E4M3 code but NaN and every E2M1 nibble must
  come out bit-identical to ``PackedWeight.dequantize(torch.float32)`` (one nonzero product, the sum exact).
- Products: ``|out - x @ W.T| <= (K + 2) * 2**-24 * (|x| @ |W|.T)`` elementwise: float32 sums of K products (the
  standard bound K u of a float32 dot product, one more u for the division by the scale / the block product).
- Compressed layers: the C kernels' error to the float64 product is within the bound above, far under the bf16
  dequantize-then-linear path they replace.
"""

from __future__ import annotations

import pytest
import torch

from lowbit.compress.packed import WeightFormat, quantize_weight
from lowbit.compress.packing import unpack_uint4
from lowbit.kernels import cpu_fp

pytestmark = pytest.mark.skipif(not cpu_fp.available(), reason="no C compiler: lowbit's CPU FP8 / NVFP4 kernels off")

E2M1_VALUES = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
FP8_PER_TENSOR = WeightFormat("float", (4, 3))
FP8_PER_CHANNEL = WeightFormat("float", (4, 3), per_channel=True)
NVFP4 = WeightFormat("nvfp4", (2, 1), block_size=16)
U = 2.0**-24


def _weight(shape: tuple[int, int], seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(shape, generator=generator) * 0.02
    outliers = torch.rand(shape, generator=generator) < 0.01
    return torch.where(outliers, weight * 40, weight)


def _reference_weight(packed) -> torch.Tensor:
    """float64 (N, K) weight from the stored codes and scales."""
    if packed.format.kind == "nvfp4":
        table = torch.tensor(E2M1_VALUES, dtype=torch.float64)
        values = table[unpack_uint4(packed.codes).long()]
        scale = (packed.scale.float() * packed.global_scale.float()).double()  # fl32, as the format forms it
        return (values * scale.repeat_interleave(16, dim=1)).float().double()  # the format's float32 product
    return packed.codes.double() / packed.scale.double()


def _rows(packed, x: torch.Tensor) -> torch.Tensor:
    function, operands = cpu_fp.weight_only_kernel(packed)
    return function(x, *operands)


@pytest.mark.parametrize("fmt", [FP8_PER_TENSOR, FP8_PER_CHANNEL])
def test_every_e4m3_code_decodes_exactly(fmt):
    n, k = 48, 272  # K not a multiple of 16: the last 16 columns run the scalar tail
    codes = torch.arange(n * k, dtype=torch.int64).remainder(256).to(torch.uint8).reshape(n, k)
    codes[(codes & 0x7F) == 0x7F] = 0x3C  # NaN codes never occur in saturating quantization
    scale = torch.rand(n if fmt.per_channel else 1, 1, generator=torch.Generator().manual_seed(1)) * 50 + 0.1
    packed = quantize_weight(torch.zeros(n, k), fmt).with_tensors(
        {"codes": codes.view(torch.float8_e4m3fn), "scale": scale})
    assert packed.codes.view(torch.uint8).unique().numel() == 254
    weight_t = torch.cat([_rows(packed, torch.eye(k)[i:i + 16]) for i in range(0, k, 16)])
    assert torch.equal(weight_t.T, packed.dequantize(torch.float32))
    assert torch.equal(weight_t.T.double(), (_reference_weight(packed).float()).double())


def test_every_e2m1_nibble_decodes_exactly():
    n, k = 32, 256
    generator = torch.Generator().manual_seed(2)
    packed = quantize_weight(_weight((n, k), seed=2), NVFP4)
    packed = packed.with_tensors({**packed.tensors(),
                                  "codes": torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=generator)})
    assert unpack_uint4(packed.codes).unique().numel() == 16
    weight_t = torch.cat([_rows(packed, torch.eye(k)[i:i + 16]) for i in range(0, k, 16)])
    assert torch.equal(weight_t.T, packed.dequantize(torch.float32))
    assert torch.equal(weight_t.T.double(), _reference_weight(packed))


@pytest.mark.parametrize("fmt", [FP8_PER_TENSOR, FP8_PER_CHANNEL, NVFP4])
@pytest.mark.parametrize("m", [1, 3, 8, 9, 16])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_products_within_float32_summation_bound(fmt, m, dtype):
    n, k = 80, 1024
    packed = quantize_weight(_weight((n, k), seed=m), fmt)
    generator = torch.Generator().manual_seed(10 + m)
    x = (torch.randn(m, k, generator=generator) * torch.where(torch.rand(m, k, generator=generator) < 0.01, 30, 1))
    x = x.to(dtype)
    out = _rows(packed, x)
    assert out.dtype == torch.float32 and out.shape == (m, n)
    weight = _reference_weight(packed)
    reference = x.double() @ weight.T
    bound = (k + 2) * U * (x.double().abs() @ weight.abs().T)
    assert ((out.double() - reference).abs() <= bound).all()


@pytest.mark.parametrize("static", [True, False])
def test_fp8_w8a8_rows_multiply_activation_codes(static):
    """W8A8: x's E4M3 codes (static per-tensor amax, or each row's) times the weight codes, divided by both scales;
    reference from the activation codes written here: fl32(x / fl32(amax / 448)) (float64 quotient of float32
    operands, rounded once to float32) to E4M3 by torch's float8 cast. x is bf16 and the static amax 6.125 (mantissa
    49/32, neither 448 / amax nor amax / 448 exact), so midpoints occur that x * (448 / amax) rounds apart."""
    n, k, m = 64, 512, 5
    packed = quantize_weight(_weight((n, k), seed=4), FP8_PER_CHANNEL)
    x = (torch.randn(m, k, generator=torch.Generator().manual_seed(5)) * 3).to(torch.bfloat16)
    amax = torch.tensor([[6.125]]) if static else x.float().abs().amax(dim=-1, keepdim=True)
    x_scale = 448.0 / amax
    x_step = (amax.double() / 448.0).float().double()
    x_codes = (x.double() / x_step).float().clamp(-448, 448).to(torch.float8_e4m3fn).double()
    if static:  # the fixture holds midpoints the two float32 rules round apart
        assert not torch.equal((x.float() * x_scale).clamp(-448, 448).to(torch.float8_e4m3fn).double(), x_codes)
    reference = (x_codes @ packed.codes.double().T) / packed.scale.double().T / x_scale.double()
    out = cpu_fp.fp8_w8a8_rows(x, *cpu_fp.fp8_w8a8_operands(packed, amax if static else None))
    bound = (k + 3) * U * ((x_codes.abs() @ packed.codes.double().abs().T) / packed.scale.double().T
                           / x_scale.double())
    assert ((out.double() - reference).abs() <= bound).all()


def test_other_formats_have_no_kernel():
    for fmt in (WeightFormat("float", (4, 3), block_size=32), WeightFormat("mx", (2, 1), block_size=32),
                WeightFormat("int", 4, block_size=16)):
        assert cpu_fp.weight_only_kernel(quantize_weight(_weight((32, 256), seed=6), fmt)) is None


@pytest.mark.parametrize("fmt", [FP8_PER_TENSOR, FP8_PER_CHANNEL, NVFP4])
def test_bf16_dequantization_equals_torch_bit_for_bit(fmt):
    """Many-row products dequantize in C: the bf16 weight of ``PackedWeight.dequantize`` (float32, then torch's
    round-to-nearest-even cast), every bit; float32 asks torch."""
    packed = quantize_weight(_weight((48, 272 if fmt.kind == "float" else 256), seed=7), fmt)
    _, operands = cpu_fp.weight_only_kernel(packed)
    assert torch.equal(cpu_fp.dequantized(packed, operands, torch.bfloat16).view(torch.int16),
                       _reference_weight(packed).float().to(torch.bfloat16).view(torch.int16))
    assert torch.equal(cpu_fp.dequantized(packed, operands, torch.float32), packed.dequantize(torch.float32))


def test_w8a8_activation_rounding_matches_torch_float8_cast():
    """Static scale: the C kernel rounds ``x * scale`` to E4M3 itself. Every E4M3 value, every midpoint between
    neighbours (ties to even), subnormals, values past 448 (saturate) and their negatives, read back through an
    identity weight (codes 1.0, scale 1; amax 448 gives scale 1), equal torch's cast of the clamped values."""
    positives = torch.arange(127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    midpoints = (positives[:-1] + positives[1:]) / 2
    extra = torch.tensor([448.5, 464.0, 1e6, 3e-3, 1e-4, 2.0**-10, 2.0**-11 * 3])
    values = torch.cat([positives, midpoints, extra])
    values = torch.cat([values, -values])
    k = 256
    x = torch.cat([values, torch.randn(-values.numel() % k, generator=torch.Generator().manual_seed(8)) * 100])
    x = x.reshape(-1, k)
    identity = (torch.eye(k, dtype=torch.uint8) * 0x38).view(torch.float8_e4m3fn)
    packed = quantize_weight(torch.zeros(k, k), FP8_PER_TENSOR).with_tensors(
        {"codes": identity, "scale": torch.ones(1, 1)})
    out = cpu_fp.fp8_w8a8_rows(x, *cpu_fp.fp8_w8a8_operands(packed, torch.tensor(448.0)))
    assert torch.equal(out, x.clamp(-448, 448).to(torch.float8_e4m3fn).float())


INT8_PER_TENSOR = WeightFormat("int", 8)
INT8_PER_CHANNEL = WeightFormat("int", 8, per_channel=True)


def _int8_rows(packed, x: torch.Tensor) -> torch.Tensor:
    return cpu_fp.int8_rows(x, *cpu_fp.int8_operands(packed))


@pytest.mark.parametrize("fmt", [INT8_PER_TENSOR, INT8_PER_CHANNEL])
def test_every_int8_code_decodes_exactly(fmt):
    n, k = 48, 272  # 4 chunks of 64, one of 16 (the single-chain tail)
    codes = (torch.arange(n * k, dtype=torch.int64).remainder(256) - 128).to(torch.int8).reshape(n, k)
    scale = torch.rand(n if fmt.per_channel else 1, 1, generator=torch.Generator().manual_seed(3)) * 50 + 0.1
    packed = quantize_weight(torch.zeros(n, k), fmt).with_tensors({"codes": codes, "scale": scale})
    weight_t = torch.cat([_int8_rows(packed, torch.eye(k)[i:i + 4]) for i in range(0, k, 4)])
    # one nonzero product, exact; then float32 division, correctly rounded: the float64 quotient rounded once
    assert torch.equal(weight_t.T.double(), (codes.double() / scale.double()).float().double())


@pytest.mark.parametrize("fmt", [INT8_PER_TENSOR, INT8_PER_CHANNEL])
@pytest.mark.parametrize("m", [1, 3, 4])
@pytest.mark.parametrize("k", [1024, 1040, 1030])  # chains only; one 16-wide tail; a scalar tail
def test_int8_products_within_float32_summation_bound(fmt, m, k):
    n = 80
    packed = quantize_weight(_weight((n, k), seed=m + k), fmt)
    generator = torch.Generator().manual_seed(20 + m)
    x = (torch.randn(m, k, generator=generator) * torch.where(torch.rand(m, k, generator=generator) < 0.01, 30, 1))
    x = x.to(torch.bfloat16)
    out = _int8_rows(packed, x)
    assert out.dtype == torch.float32 and out.shape == (m, n)
    weight = _reference_weight(packed)  # codes / scale in float64
    reference = x.double() @ weight.T
    bound = (k + 2) * U * (x.double().abs() @ weight.abs().T)
    assert ((out.double() - reference).abs() <= bound).all()


@pytest.mark.parametrize("rows", [1, 4, 5])
def test_prepared_int8_takes_the_c_kernel_up_to_gemv_rows(rows):
    from lowbit.kernels import cpu, prepare_linear

    n, k = 64, 512
    packed = quantize_weight(_weight((n, k), seed=9), INT8_PER_CHANNEL)
    prepared = prepare_linear(packed, torch.device("cpu"), torch.bfloat16)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows)).to(torch.bfloat16)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(99)).to(torch.bfloat16)
    if rows <= cpu_fp.GEMV_MAX_ROWS and cpu_fp.int8_available():
        expected = _int8_rows(packed, x).to(torch.bfloat16) + bias
    else:
        expected = cpu.int8_linear(x, packed.codes, cpu.int8_scales(packed, torch.bfloat16)) + bias
    assert torch.equal(prepared(x, bias), expected)
