"""Low-bit matmul kernels and their dispatch (see ``dispatch`` for which runs where).

- ``weight_only_linear(x, packed, bias)``: 16-bit activations x packed 4/8-bit weights, decided per call;
  ``prepare_linear(packed, device, dtype)``: the same decided once (``PreparedLinear``).
- ``cpu``: torch's CPU INT4 / INT8 weight-only kernels; ``cpu_fp``: FP8 / NVFP4 few-row kernels in C, compiled at
  run time where a C compiler exists; ``ops``: the Triton kernels as custom ops.
- ``fp8_matmul`` / ``int8_matmul``: W8A8 on 8-bit activation and weight codes.
- ``fp8_linear``: W8A8 FP8 from 16-bit activations (Triton activation quantization + ``_scaled_mm``).
- ``triton_w4``: the Triton W4A16 kernels, one file each (``w4_matmul``, ``w4_gemv``, ``w4_dequantize``, sharing
  ``w4_shared`` and the nibble decoders of ``nibbles``); ``fp8_quant``: FP8 activation codes (imported lazily; CPU
  never needs triton).
"""

from lowbit.kernels import ops  # noqa: F401  (registers the lowbit:: custom ops; triton is imported on first call)
from lowbit.kernels.dispatch import PreparedLinear, prepare_linear, weight_only_linear
from lowbit.kernels.scaled import Fp8Weight, fp8_linear, fp8_matmul, int8_matmul

__all__ = ["Fp8Weight", "PreparedLinear", "fp8_linear", "fp8_matmul", "int8_matmul", "prepare_linear",
           "weight_only_linear"]
