"""Low-bit matmul kernels and their dispatch (see ``dispatch`` for which runs where).

- ``weight_only_linear(x, packed, bias)``: 16-bit activations x packed 4/8-bit weights.
- ``fp8_matmul`` / ``int8_matmul``: W8A8 on 8-bit activation and weight codes.
- ``fp8_linear``: W8A8 FP8 from 16-bit activations (Triton activation quantization + ``_scaled_mm``).
- ``triton_w4``, ``nibbles``, ``fp8_quant``: the Triton kernels (imported lazily; CPU never needs triton).
"""

from lowbit.kernels.dispatch import weight_only_linear
from lowbit.kernels.scaled import Fp8Weight, fp8_linear, fp8_matmul, int8_matmul

__all__ = ["Fp8Weight", "fp8_linear", "fp8_matmul", "int8_matmul", "weight_only_linear"]
