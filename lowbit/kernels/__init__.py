"""Low-bit matmul kernels and their dispatch (see ``dispatch`` for which runs where).

- ``weight_only_linear(x, packed, bias)``: 16-bit activations x packed 4/8-bit weights.
- ``fp8_matmul`` / ``int8_matmul``: W8A8 on 8-bit activation and weight codes.
- ``triton_w4``: the Triton W4A16 kernels (imported lazily; CPU never needs triton).
"""

from lowbit.kernels.dispatch import weight_only_linear
from lowbit.kernels.scaled import fp8_matmul, int8_matmul

__all__ = ["fp8_matmul", "int8_matmul", "weight_only_linear"]
