"""Real low-bit storage for quantized models.

- ``compress(model)``: each fake-quantized Linear becomes a ``CompressedLinear`` over packed codes and
  scales; its forward runs ``lowbit.kernels`` and multiplies exactly the fake-quantized weight.
- ``init_quantized_weights(config)``: load a model straight into packed storage (weights packed as assigned);
  ``LowbitConfig(config)``: the same through ``from_pretrained(path, quantization_config=...)`` (``hf_quantizer``).
- ``save_compressed`` / ``load_compressed``: safetensors round trip of a compressed model.
- ``PackedWeight`` / ``WeightFormat`` / ``quantize_weight``: the storage of one weight (``packed``);
  ``pack_uint4`` / ``unpack_uint4``: two 4-bit codes per byte, low nibble first (``packing``).
- ``compressed_weight_bytes(model)``: packed bytes vs the same weights in bf16 (``lowbit.eval.model_size``
  counts the whole model's real bytes).
"""

from lowbit.compress.convert import compress, compressed_weight_bytes
from lowbit.compress.hf_quantizer import LowbitConfig
from lowbit.compress.linear import CompressedLinear
from lowbit.compress.loading import init_quantized_weights
from lowbit.compress.packed import PackedWeight, WeightFormat, quantize_weight
from lowbit.compress.packing import pack_uint4, unpack_uint4
from lowbit.compress.serialization import load_compressed, save_compressed

__all__ = [
    "CompressedLinear", "LowbitConfig", "PackedWeight", "WeightFormat", "compress", "compressed_weight_bytes",
    "init_quantized_weights", "load_compressed", "pack_uint4", "quantize_weight", "save_compressed", "unpack_uint4",
]
