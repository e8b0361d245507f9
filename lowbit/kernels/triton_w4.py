"""lowbit's Triton W4A16 kernels, one file each, gathered for ``lowbit.kernels.dispatch`` (which imports this
module only on CUDA: it imports triton at import time).

- ``w4_matmul`` (``w4_matmul.py``): tensor cores, any number of rows; ``default_config``, ``CONFIG_KEYS``.
- ``w4_gemv`` (``w4_gemv.py``): one row on the CUDA cores; ``prefers_gemv`` says for which shapes it wins.
- ``w4_dequantize`` (``w4_dequantize.py``): the dequantized weight, bit-exact, for dequantize-then-cuBLAS.

What they share (operand decode of a step, split-K epilogue, activation permutation, launch checks) is in
``w4_shared.py``; the nibble decoders in ``nibbles.py``.
"""

from lowbit.kernels.w4_dequantize import DEQUANTIZE_CONFIG_KEYS, w4_dequantize
from lowbit.kernels.w4_gemv import GEMV_CONFIG_KEYS, default_gemv_config, prefers_gemv, w4_gemv
from lowbit.kernels.w4_matmul import CONFIG_KEYS, default_config, w4_matmul

__all__ = ["CONFIG_KEYS", "DEQUANTIZE_CONFIG_KEYS", "GEMV_CONFIG_KEYS", "default_config", "default_gemv_config",
           "prefers_gemv", "w4_dequantize", "w4_gemv", "w4_matmul"]
