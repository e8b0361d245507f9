"""Number formats of lowbit: pure float32 functions on tensors (CPU and CUDA alike).

- INT symmetric (ModelOpt): scale = qmax / amax; codes = clamp(round_half_even(x * scale), qmin, qmax);
  x_hat = codes / scale; amax <= 2**-24 -> codes 0, scale 1.            (integer.py)
- INT asymmetric: scale = (max(xmax,0) - min(xmin,0)) / (2**b - 1); zp = clamp(round(-xmin/scale));
  codes = clamp(round(x / scale) + zp, 0, 2**b - 1); x_hat = (codes - zp) * scale.   (integer.py)
- FP8 E4M3 (max 448, no inf) / E5M2 (max 57344) / FP4 E2M1 (max 6): nearest value, ties to even,
  saturating (+-inf -> +-max), NaN kept; fake quant: scale = max / amax, round(x * scale) / scale.
                                                                                     (minifloat.py)
- NVFP4 (ModelOpt): blocks of 16; g = global_amax / 2688; s = e4m3(block_amax / (6 g));
  codes = e2m1(x / (s g)); x_hat = e2m1 value * s * g.                                 (nvfp4.py)
- MX (OCP v1.0): blocks of 32; e = clamp(floor(log2(block_amax)) - emax_elem, -127, 127);
  elements = round_to_format(x / 2**e); scale stored as uint8 e + 127 (0xFF NaN).       (mx.py)
- Blocking: to_blocks(x, b, axis) -> (..., L // b, b), axis moved last; from_blocks inverts. (blocks.py)
"""

from .blocks import block_amax, from_blocks, to_blocks
from .integer import (
    dequantize_int,
    dequantize_int_asym,
    fake_quant_int,
    fake_quant_int_asym,
    int_range,
    quantize_int,
    quantize_int_asym,
)
from .minifloat import (
    E2M1,
    E4M3,
    E5M2,
    FloatFormat,
    decode_e2m1,
    encode_e2m1,
    fake_quant_fp,
    float_format,
    round_to_format,
)
from .mx import dequantize_mx, e8m0_to_float, fake_quant_mx, float_to_e8m0, quantize_mx
from .nvfp4 import dequantize_nvfp4, fake_quant_nvfp4, quantize_nvfp4

__all__ = [
    "E2M1",
    "E4M3",
    "E5M2",
    "FloatFormat",
    "block_amax",
    "decode_e2m1",
    "dequantize_int",
    "dequantize_int_asym",
    "dequantize_mx",
    "dequantize_nvfp4",
    "e8m0_to_float",
    "encode_e2m1",
    "fake_quant_fp",
    "fake_quant_int",
    "fake_quant_int_asym",
    "fake_quant_mx",
    "fake_quant_nvfp4",
    "float_format",
    "float_to_e8m0",
    "from_blocks",
    "int_range",
    "quantize_int",
    "quantize_int_asym",
    "quantize_mx",
    "quantize_nvfp4",
    "round_to_format",
    "to_blocks",
]
