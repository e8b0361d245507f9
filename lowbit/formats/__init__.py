"""Number formats of lowbit: pure float32 functions on tensors, identical on CPU and CUDA.

One line of math per format (amax <= 2**-24 always means scale 1, so nothing is NaN):

- INT symmetric (integer.py, ModelOpt): step = amax / qmax, scale = qmax / amax; codes =
  clamp(round_half_even(x / step), qmin, qmax); x_hat = codes / scale (codes 0 where amax <= 2**-24). Codes
  divide by the step exports store, as checkpoint writers and readers do (scale_and_step).
- INT asymmetric (integer.py): scale = (max(xmax, 0) - min(xmin, 0)) / (2**b - 1);
  zp = clamp(round(-min(xmin, 0) / scale)); codes = clamp(round(x / scale) + zp, 0, 2**b - 1);
  x_hat = (codes - zp) * scale.
- INT symmetric, signed scale (integer.py, NNCF / llama.cpp Q4_0): the larger-magnitude end e of [xmin, xmax]
  maps onto qmin: scale = qmin / e (negative when e > 0); codes as symmetric; x_hat = codes / scale.
- FP8 E4M3 (max 448) / E5M2 (max 57344) / FP4 E2M1 (max 6) (minifloat.py): round_to_format = nearest,
  ties to even, saturating (+-inf -> +-max), NaN kept; step = amax / max, scale = max / amax;
  x_hat = round(x / step) / scale.
- NVFP4 (nvfp4.py, ModelOpt): blocks of 16; g = global_amax / 2688; s = e4m3(block_amax / (6 g));
  codes = e2m1(x / (s g)); x_hat = e2m1 value * s * g.
- MX (mx.py, OCP v1.0): blocks of 32; e = clamp(floor(log2(block_amax)) - emax_elem, -127, 127);
  elements = round_to_format(x / 2**e); scale = uint8 e + 127 (0xFF NaN); x_hat = elements * 2**e.
- Codebooks (codebook.py; NF4 in nf4.py): code = nearest of a table of levels in [-1, 1] to x / amax (a tie takes
  the lower level); x_hat = level * amax. ``register_codebook(name, levels)`` adds one.
- Chains (steps.py, W4A8's stages): first stage x_hat = codes * step, later ones round(x / step) * step, with a
  checkpoint's divisor step = amax / maxbound.
- Blocks (blocks.py): to_blocks(x, b, axis) -> (..., L // b, b) with axis moved last; from_blocks inverts.
"""

from ._common import scale_and_step
from .blocks import block_amax, from_blocks, to_blocks
from .codebook import (
    CODEBOOKS,
    codebook_levels,
    dequantize_codebook,
    fake_quant_codebook,
    quantize_codebook,
    register_codebook,
)
from .integer import (
    dequantize_int,
    dequantize_int_asym,
    fake_quant_int,
    fake_quant_int_asym,
    fake_quant_int_signed_scale,
    int_range,
    quantize_int,
    quantize_int_asym,
    quantize_int_signed_scale,
    signed_scale_extreme,
    signed_scale_range,
)
from .minifloat import (
    E2M1,
    E4M3,
    E5M2,
    FloatFormat,
    decode_e2m1,
    dequantize_fp,
    encode_e2m1,
    fake_quant_fp,
    float_format,
    quantize_fp,
    round_to_format,
)
from .mx import dequantize_mx, e8m0_to_float, fake_quant_mx, float_to_e8m0, quantize_mx
from .nf4 import NF4_VALUES, dequantize_nf4, fake_quant_nf4, quantize_nf4
from .nvfp4 import dequantize_nvfp4, fake_quant_nvfp4, quantize_nvfp4
from .steps import dequantize_by_step, divisor_step, fake_quant_by_step, grid_maxbound

__all__ = [
    "CODEBOOKS",
    "E2M1",
    "E4M3",
    "E5M2",
    "FloatFormat",
    "NF4_VALUES",
    "block_amax",
    "codebook_levels",
    "decode_e2m1",
    "dequantize_codebook",
    "dequantize_by_step",
    "dequantize_fp",
    "dequantize_int",
    "dequantize_int_asym",
    "dequantize_mx",
    "dequantize_nf4",
    "dequantize_nvfp4",
    "divisor_step",
    "e8m0_to_float",
    "encode_e2m1",
    "fake_quant_by_step",
    "fake_quant_codebook",
    "fake_quant_fp",
    "fake_quant_int",
    "fake_quant_int_asym",
    "fake_quant_int_signed_scale",
    "fake_quant_mx",
    "fake_quant_nf4",
    "fake_quant_nvfp4",
    "float_format",
    "float_to_e8m0",
    "from_blocks",
    "grid_maxbound",
    "int_range",
    "quantize_codebook",
    "quantize_fp",
    "quantize_int",
    "quantize_int_asym",
    "quantize_int_signed_scale",
    "quantize_mx",
    "quantize_nf4",
    "quantize_nvfp4",
    "register_codebook",
    "round_to_format",
    "scale_and_step",
    "signed_scale_extreme",
    "signed_scale_range",
    "to_blocks",
]
