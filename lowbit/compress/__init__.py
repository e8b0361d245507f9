"""Real low-bit storage: packed codes and scales, and their dequantization through lowbit.formats."""

from lowbit.compress.packed import PackedWeight, WeightFormat, quantize_weight
from lowbit.compress.packing import pack_uint4, unpack_uint4

__all__ = ["PackedWeight", "WeightFormat", "pack_uint4", "quantize_weight", "unpack_uint4"]
