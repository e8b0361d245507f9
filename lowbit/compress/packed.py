"""PackedWeight: a Linear weight (out_features N, in_features K) in real low-bit storage.

Every format quantizes and dequantizes through ``lowbit.formats`` (nibbles decoded from a byte table of
the same values; NVFP4 with ``formats.dequantize_nvfp4``'s products), on the same view of the weight as
the fake-quant TensorQuantizer, so ``packed.dequantize(w.dtype)`` equals the fake-quantized weight
bit for bit (for integer formats while the scale is stored in float32, the default).

Storage per format (``scale`` shapes: per-tensor (1, 1), per-channel (N, 1), blocks (N, K // block)):

| kind       | codes                                             | scale                | extra           |
|------------|---------------------------------------------------|----------------------|-----------------|
| int        | <= 4 bits: uint8 (N, K/2) nibbles of q + 2**(b-1) | float32 (or 16-bit); |                 |
|            | (q unsigned: q itself); else int8 / uint8 (N, K)   | signed_scale: signed |                 |
| int_asym   | <= 4 bits: uint8 (N, K/2) nibbles; else uint8     | float32 step         | zero_point uint8|
| float      | E4M3 / E5M2: float8 (N, K); E2M1: nibbles          | float32              |                 |
| nvfp4      | E2M1 nibbles uint8 (N, K/2)                        | float8_e4m3fn (N,K/16)| global_scale f32|
| mx         | E2M1 nibbles, or float8 E4M3 / E5M2 (N, K)         | uint8 E8M0 (N, K/32) |                 |

Nibbles are packed along K, low nibble first (``lowbit.compress.packing``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch

from lowbit import formats
from lowbit.attributes import QuantizerAttributeConfig
from lowbit.compress.packing import NIBBLE_MASK, pack_uint4

KINDS = ("int", "int_asym", "float", "nvfp4", "mx")
FLOAT8_DTYPES = {formats.E4M3: torch.float8_e4m3fn, formats.E5M2: torch.float8_e5m2}
SCALE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TENSOR_NAMES = ("codes", "scale", "zero_point", "global_scale")


@dataclass(frozen=True)
class WeightFormat:
    """How one weight is stored: ``kind``, bits, and the scale granularity along K.

    ``block_size`` is the number of K elements sharing a scale; ``None`` with ``per_channel`` gives one
    scale per output row, ``None`` without it one scale for the tensor.
    """

    kind: str
    num_bits: int | tuple[int, int]
    block_size: int | None = None
    per_channel: bool = False
    unsigned: bool = False
    narrow_range: bool = False
    signed_scale: bool = False  # int: the scale's sign maps the larger end onto qmin (formats.integer)

    @classmethod
    def from_config(cls, config: QuantizerAttributeConfig, shape: tuple[int, ...]) -> WeightFormat:
        """The storage format of a 2-D weight ``shape`` quantized with ``config``; ValueError if unsupported."""
        if len(shape) != 2:
            raise ValueError(f"weight shape {tuple(shape)}: compress() packs 2-D (out, in) weights only")
        if config.codebook is not None:
            raise ValueError(f"codebook={config.codebook!r}: compress() has no packed storage or kernel for "
                             "codebook formats; keep the layer fake-quantized")
        scale_bits = config.block_scale_bits
        if scale_bits == (4, 3):
            return cls("nvfp4", config.num_bits, block_size=config.block_axes[-1])
        if scale_bits == (8, 0):
            return cls("mx", config.num_bits, block_size=config.block_axes[-1])
        kind = "float" if config.is_float else ("int_asym" if config.asymmetric else "int")
        block_size, per_channel = _granularity(config, shape)
        return cls(kind, config.num_bits, block_size, per_channel, config.unsigned, config.narrow_range,
                   config.signed_scale)

    @property
    def packs_nibbles(self) -> bool:
        """Codes fit in 4 bits and are stored two per byte."""
        return self.num_bits == (2, 1) or (isinstance(self.num_bits, int) and self.num_bits <= 4)

    @property
    def keeps_amin(self) -> bool:
        """Quantized from the range ``[amin, amax]`` (asymmetric and signed-scale int), not from ``amax`` alone."""
        return self.kind == "int_asym" or self.signed_scale

    @property
    def code_offset(self) -> int:
        """Added to signed integer codes to store them unsigned in nibbles (offset binary)."""
        if self.kind != "int" or self.unsigned or not self.packs_nibbles:
            return 0
        return 2 ** (self.num_bits - 1)

    @property
    def element_format(self) -> formats.FloatFormat:
        return formats.float_format(self.num_bits)

    def to_dict(self) -> dict:
        """JSON-ready description (see ``from_dict``)."""
        bits = list(self.num_bits) if isinstance(self.num_bits, tuple) else self.num_bits
        return {"kind": self.kind, "num_bits": bits, "block_size": self.block_size,
                "per_channel": self.per_channel, "unsigned": self.unsigned, "narrow_range": self.narrow_range,
                "signed_scale": self.signed_scale}

    @classmethod
    def from_dict(cls, data: dict) -> WeightFormat:
        if data.get("kind") not in KINDS:
            raise ValueError(f"weight format kind {data.get('kind')!r}: allowed are {list(KINDS)}")
        bits = tuple(data["num_bits"]) if isinstance(data["num_bits"], list) else data["num_bits"]
        return cls(**{**data, "num_bits": bits})


def _granularity(config: QuantizerAttributeConfig, shape: tuple[int, ...]) -> tuple[int | None, bool]:
    """(block_size, per_channel) of an int/float config on a 2-D weight; ValueError if not along K."""
    blocks = config.block_axes
    if blocks:
        if len(blocks) != 1 or next(iter(blocks)) not in (-1, 1):
            raise ValueError(
                f"block_sizes={config.block_sizes!r}: compress() supports blocks along the input dim only "
                "({-1: size})"
            )
        size = next(iter(blocks.values()))
        return (shape[1] if size is None else size), False
    if config.axis is None:
        return None, False
    if config.axis in (0, -2, (0,), (-2,)):
        return None, True
    raise ValueError(f"axis={config.axis!r}: compress() supports per-tensor, axis=0 or blocks along -1")


@dataclass(frozen=True)
class PackedWeight:
    """Packed codes and scales of one (N, K) weight; see the module docstring for the layouts."""

    format: WeightFormat
    shape: tuple[int, int]
    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None = None
    global_scale: torch.Tensor | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors by name (absent ones left out)."""
        return {name: getattr(self, name) for name in TENSOR_NAMES if getattr(self, name) is not None}

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def with_tensors(self, tensors: dict[str, torch.Tensor]) -> PackedWeight:
        """The same format and shape over other tensors (moved, loaded, or viewed as buffers)."""
        return replace(self, **{name: tensors.get(name) for name in TENSOR_NAMES})

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (N, K) weight in ``dtype``, computed by lowbit.formats exactly as fake quantization does.

        Nibbles are decoded a byte at a time from a 256-entry table of value pairs (``nibble_values``):
        the same exact float32 element values as unpacking and ``formats.decode_e2m1`` or ``q - offset``,
        an order of magnitude faster on the CPU."""
        fmt = self.format
        if fmt.kind == "nvfp4":  # formats.dequantize_nvfp4's products, from the decoded values
            blocks = formats.to_blocks(self.element_values(), fmt.block_size)
            scale = self.scale.float() * self.global_scale.float()
            return (blocks * scale.unsqueeze(-1)).reshape(self.shape).to(dtype)
        if fmt.kind == "mx":
            elements = self.element_values() if fmt.packs_nibbles else self.codes.float()
            return formats.dequantize_mx(elements, self.scale, dtype)
        values = self.element_values() if fmt.packs_nibbles else self.codes.float() - fmt.code_offset
        view, scale = _scale_view(values, self.scale.float(), fmt.block_size)
        if fmt.kind == "int_asym":
            _, zero_point = _scale_view(values, self.zero_point.float(), fmt.block_size)
            out = formats.dequantize_int_asym(view, scale, zero_point, dtype)
        elif fmt.kind == "float":
            out = formats.dequantize_fp(view, scale, dtype)
        else:
            out = formats.dequantize_int(view, scale, dtype)
        return out.reshape(self.shape)

    def element_values(self) -> torch.Tensor:
        """Float32 (N, K) values of nibble codes: E2M1 values, or integer codes minus ``code_offset``."""
        is_e2m1 = self.format.num_bits == (2, 1)
        return nibble_values(self.codes, is_e2m1, self.format.code_offset)


def nibble_values(packed: torch.Tensor, is_e2m1: bool, offset: int) -> torch.Tensor:
    """Float32 (..., 2 L) values of uint8 nibbles (..., L): byte b gives (value(b & 15), value(b >> 4)).

    ``value(c)`` is ``formats.decode_e2m1(c)`` or ``c - offset``; a (256, 2) table looked up per byte."""
    table = _pair_table(str(packed.device), is_e2m1, offset)
    return torch.nn.functional.embedding(packed.int(), table).flatten(-2)


@functools.cache
def _pair_table(device: str, is_e2m1: bool, offset: int) -> torch.Tensor:
    codes = torch.arange(16, dtype=torch.int32)
    values = formats.decode_e2m1(codes) if is_e2m1 else (codes - offset).float()
    byte = torch.arange(256, dtype=torch.int32)
    return torch.stack((values[byte & NIBBLE_MASK], values[byte >> 4]), dim=-1).to(device)


def _scale_view(values: torch.Tensor, scale: torch.Tensor, block_size: int | None):
    """(values, scale) reshaped so that the scale broadcasts: blocks (N, K/b, b) with (N, K/b, 1)."""
    if block_size is None:
        return values, scale
    return formats.to_blocks(values, block_size), scale.unsqueeze(-1)


def quantize_weight(
    weight: torch.Tensor,
    fmt: WeightFormat,
    amax: torch.Tensor | None = None,
    amin: torch.Tensor | None = None,
    scale_dtype: torch.dtype = torch.float32,
    block_amax: torch.Tensor | None = None,
) -> PackedWeight:
    """Quantize a 2-D ``weight`` (N, K) into ``fmt`` storage.

    ``amax`` (and ``amin`` for int_asym and signed-scale int) are the quantizer's calibrated statistics in its view's
    shape ((1, 1), (N, 1) or (N, K/b, 1); NVFP4: the per-tensor global amax); ``None`` computes them
    from ``weight`` as dynamic fake quantization does. ``scale_dtype`` stores integer and float scales
    in float32 (bit-exact) or float16 / bfloat16 (smaller; dequantization then uses the rounded scale).
    ``block_amax``: NVFP4 / MX per-block maxima from a scale search (the quantizer's ``block_amax``).
    """
    if scale_dtype not in SCALE_DTYPES:
        raise ValueError(f"scale_dtype={scale_dtype}: allowed are {list(SCALE_DTYPES)}")
    if weight.dim() != 2:
        raise ValueError(f"weight shape {tuple(weight.shape)}: expected 2-D (out_features, in_features)")
    shape = tuple(weight.shape)
    if fmt.kind == "nvfp4":
        codes, block_scale, global_scale = formats.quantize_nvfp4(weight, amax, fmt.block_size, block_amax)
        return PackedWeight(fmt, shape, pack_uint4(codes), block_scale, global_scale=global_scale.reshape(()))
    if fmt.kind == "mx":
        elements, scale = formats.quantize_mx(weight, fmt.element_format, fmt.block_size, block_amax)
        return PackedWeight(fmt, shape, _store_float_codes(elements, fmt), scale)
    view = weight if fmt.block_size is None else formats.to_blocks(weight, fmt.block_size)
    reduce_dims = _reduce_dims(fmt, view.dim())
    if fmt.keeps_amin:
        low = view.float().amin(dim=reduce_dims, keepdim=True) if amin is None else amin
        high = view.float().amax(dim=reduce_dims, keepdim=True) if amax is None else amax
        if fmt.signed_scale:
            codes, scale = formats.quantize_int_signed_scale(view, low, high, fmt.num_bits)
            return PackedWeight(fmt, shape, _store_int_codes(codes, fmt, shape),
                                _flat_scale(scale, fmt).to(scale_dtype))
        codes, scale, zero_point = formats.quantize_int_asym(view, low, high, fmt.num_bits)
        zero_point = _flat_scale(zero_point, fmt).to(torch.uint8)
        return PackedWeight(fmt, shape, _store_int_codes(codes, fmt, shape), _flat_scale(scale, fmt).to(scale_dtype),
                            zero_point=zero_point)
    amax = view.float().abs().amax(dim=reduce_dims, keepdim=True) if amax is None else amax
    if fmt.kind == "float":
        codes, scale = formats.quantize_fp(view, amax, fmt.element_format)
        stored = _store_float_codes(codes.reshape(shape), fmt)
    else:
        codes, scale = formats.quantize_int(view, amax, fmt.num_bits, fmt.unsigned, fmt.narrow_range)
        stored = _store_int_codes(codes, fmt, shape)
    return PackedWeight(fmt, shape, stored, _flat_scale(scale, fmt).to(scale_dtype))


def storage_spec(
    fmt: WeightFormat, shape: tuple[int, int], scale_dtype: torch.dtype = torch.float32
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """{tensor name: (shape, dtype)} of the storage ``quantize_weight`` produces for ``fmt`` and ``shape``."""
    n, k = shape
    if fmt.packs_nibbles:
        codes = ((n, k // 2), torch.uint8)
    elif fmt.kind in ("float", "mx"):
        codes = ((n, k), FLOAT8_DTYPES[fmt.element_format])
    else:
        codes = ((n, k), torch.int8 if fmt.kind == "int" and not fmt.unsigned else torch.uint8)
    if fmt.block_size is not None:
        scale_shape = (n, k // fmt.block_size)
    else:
        scale_shape = (n, 1) if fmt.per_channel else (1, 1)
    spec = {"codes": codes}
    if fmt.kind == "nvfp4":
        spec["scale"] = (scale_shape, torch.float8_e4m3fn)
        spec["global_scale"] = ((), torch.float32)
    elif fmt.kind == "mx":
        spec["scale"] = (scale_shape, torch.uint8)
    else:
        spec["scale"] = (scale_shape, scale_dtype)
    if fmt.kind == "int_asym":
        spec["zero_point"] = (scale_shape, torch.uint8)
    return spec


def _reduce_dims(fmt: WeightFormat, view_dims: int) -> tuple[int, ...]:
    if fmt.block_size is not None:
        return (view_dims - 1,)
    return (1,) if fmt.per_channel else (0, 1)


def _flat_scale(scale: torch.Tensor, fmt: WeightFormat) -> torch.Tensor:
    """Scale in storage shape: (N, K/b) for blocks, (N, 1) per channel, (1, 1) per tensor."""
    if fmt.block_size is not None:
        return scale.squeeze(-1).contiguous()
    return scale.reshape(-1, 1).contiguous()


def _store_int_codes(codes: torch.Tensor, fmt: WeightFormat, shape: tuple[int, int]) -> torch.Tensor:
    codes = codes.reshape(shape) + fmt.code_offset
    if fmt.packs_nibbles:
        return pack_uint4(codes.to(torch.uint8))
    signed = fmt.kind == "int" and not fmt.unsigned
    return codes.to(torch.int8 if signed else torch.uint8)


def _store_float_codes(values: torch.Tensor, fmt: WeightFormat) -> torch.Tensor:
    if fmt.packs_nibbles:
        return pack_uint4(formats.encode_e2m1(values))
    return values.to(FLOAT8_DTYPES[fmt.element_format])
