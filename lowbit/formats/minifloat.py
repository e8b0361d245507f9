"""Small floating-point formats (FP8 E4M3 / E5M2, FP4 E2M1): rounding, fake quant, E2M1 codes.

A value of format ``E{e}M{m}`` with bias ``2**(e-1) - 1`` is ``(-1)**s * 2**(E - bias) * (1 + M / 2**m)``
for exponent field E >= 1 and ``(-1)**s * 2**(1 - bias) * (M / 2**m)`` (subnormal) for E == 0.
Rounding is to nearest, ties to even mantissa, and always saturating: finite values beyond the
format's largest magnitude and +-inf map to +-max (even for E5M2, which has an inf encoding); NaN
stays NaN. All math is float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._common import as_float32, as_float32_like, check_integer, pow2, scale_and_step


@dataclass(frozen=True)
class FloatFormat:
    """A sign + ``exponent_bits`` + ``mantissa_bits`` floating-point format.

    ``max_value`` is the largest finite magnitude (it is not always the all-ones pattern: E4M3 "fn"
    spends S.1111.111 on NaN, so its max is S.1111.110 = 448).
    """

    name: str
    exponent_bits: int
    mantissa_bits: int
    max_value: float
    has_inf: bool
    has_nan: bool

    @property
    def bias(self) -> int:
        """Exponent bias, 2**(exponent_bits - 1) - 1."""
        return 2 ** (self.exponent_bits - 1) - 1

    @property
    def min_exponent(self) -> int:
        """Exponent of the smallest normal value, 1 - bias (also the subnormals' exponent)."""
        return 1 - self.bias

    @property
    def max_exponent(self) -> int:
        """Exponent of the largest finite value, floor(log2(max_value)) (E2M1 2, E4M3 8, E5M2 15)."""
        return int(self.max_value).bit_length() - 1


E4M3 = FloatFormat("E4M3", 4, 3, 448.0, has_inf=False, has_nan=True)
E5M2 = FloatFormat("E5M2", 5, 2, 57344.0, has_inf=True, has_nan=True)
E2M1 = FloatFormat("E2M1", 2, 1, 6.0, has_inf=False, has_nan=False)

_FORMATS_BY_BITS = {(4, 3): E4M3, (5, 2): E5M2, (2, 1): E2M1}
# torch's float8 casts are round-to-nearest-even; tests check them against the generic rounding.
_TORCH_DTYPES = {E4M3: torch.float8_e4m3fn, E5M2: torch.float8_e5m2}


def float_format(num_bits: tuple[int, int]) -> FloatFormat:
    """The format for ModelOpt-style ``num_bits=(exponent_bits, mantissa_bits)``: (4,3), (5,2) or (2,1)."""
    fmt = _FORMATS_BY_BITS.get(tuple(num_bits)) if isinstance(num_bits, (tuple, list)) else None
    if fmt is None:
        raise ValueError(f"num_bits must be one of {sorted(_FORMATS_BY_BITS)}, got {num_bits!r}")
    return fmt


_FLOAT32_EXPONENT_MASK = 0x7F800000
_FLOAT32_MANTISSA_BITS = 23


def _round_generic(x32: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    """Nearest ``fmt`` value of float32 ``x32``, ties to even mantissa, saturating; NaN stays NaN."""
    magnitude = torch.clamp(x32.abs(), max=fmt.max_value)  # +inf -> max; clamp keeps NaN
    # The binade 2**floor(log2|x|) is |x| with its float32 mantissa bits cleared (exact, no log2);
    # subnormals of fmt share its smallest normal binade.
    binade_bits = torch.clamp(
        magnitude.view(torch.int32) & _FLOAT32_EXPONENT_MASK,
        min=(fmt.min_exponent + 127) << _FLOAT32_MANTISSA_BITS,
    )
    # Spacing of fmt's values in that binade: 2**(exponent - mantissa_bits).
    step = (binade_bits - (fmt.mantissa_bits << _FLOAT32_MANTISSA_BITS)).view(torch.float32)
    rounded = torch.round(magnitude / step) * step  # torch.round: half to even -> even mantissa
    return torch.copysign(rounded, x32)


def _round_float32(x32: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    torch_dtype = _TORCH_DTYPES.get(fmt)
    if torch_dtype is None:
        return _round_generic(x32, fmt)
    # torch's cast is not saturating (E4M3 overflow -> NaN), so clamp first; NaN passes through.
    return float8_to_float32(torch.clamp(x32, -fmt.max_value, fmt.max_value).to(torch_dtype))


_E4M3_VALUES = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()  # by code, torch's cast


def float8_to_float32(values: torch.Tensor) -> torch.Tensor:
    """``values.float()`` for a float8 tensor. On CPU, E4M3 goes through the 256-entry table of torch's own
    cast (same values, NaN included): torch's elementwise E4M3 -> float32 cast is ~2.5x slower there."""
    if values.dtype != torch.float8_e4m3fn or values.device.type != "cpu":
        return values.float()
    codes = values.reshape(-1).view(torch.uint8).int()
    return _E4M3_VALUES.index_select(0, codes).view(values.shape)


def round_to_format(x: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    """Round ``x`` to the nearest value of ``fmt`` (ties to even mantissa, subnormals included).

    Saturating: |x| > max_value and +-inf give +-max_value; NaN stays NaN; the sign of zero is kept.
    Computed in float32, returned in ``x``'s dtype (every E4M3/E5M2/E2M1 value is exact in
    bf16/fp16/fp32). E4M3 and E5M2 use torch's float8 casts after clamping, E2M1 the generic rule.
    """
    return _round_float32(as_float32(x, "x"), fmt).to(x.dtype)


def quantize_fp(
    x: torch.Tensor, amax: torch.Tensor | float, fmt: FloatFormat
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled rounding to ``fmt``: returns (values, scale), both float32.

    ``values = round_to_format(x / step, fmt)`` with ``step = amax / fmt.max_value``, the divisor exports store
    (``scale_and_step``), and ``scale = fmt.max_value / amax`` (``dequantize_fp`` divides by it); both 1 where
    ``amax <= 2**-24``, so nothing is NaN. ``values`` are on ``fmt``'s grid, same shape as ``x``. ``amax``
    broadcasts against ``x`` (scalar, per-channel keepdim, per-block on ``to_blocks(x)``); ``scale`` has
    ``amax``'s shape.
    """
    x32 = as_float32(x, "x")
    scale, step = scale_and_step(as_float32_like(amax, x32, "amax"), fmt.max_value)
    return _round_float32(x32 / step, fmt), scale


def dequantize_fp(
    values: torch.Tensor, scale: torch.Tensor | float, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``values / scale`` in float32, returned as ``dtype``."""
    values32 = as_float32(values, "values")
    return (values32 / as_float32_like(scale, values32, "scale")).to(dtype)


def fake_quant_fp(x: torch.Tensor, amax: torch.Tensor | float, fmt: FloatFormat) -> torch.Tensor:
    """``dequantize_fp(*quantize_fp(x, amax, fmt))``: ``round_to_format(x / step) / scale``, in ``x``'s dtype."""
    return dequantize_fp(*quantize_fp(x, amax, fmt), dtype=x.dtype)


_E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def encode_e2m1(x: torch.Tensor) -> torch.Tensor:
    """OCP E2M1 codes (uint8 0..15: bit 3 sign, bits 2-1 exponent, bit 0 mantissa) of ``x``.

    ``x`` is first rounded with ``round_to_format(x, E2M1)`` (nearest, ties to even, saturating), so
    off-grid inputs are rounded, not rejected. The sign bit is ``x``'s sign bit (-0.0 -> code 8).
    E2M1 has no NaN: NaN encodes as +-6 (code 7 or 15), as ModelOpt's searchsorted does.
    """
    rounded = _round_generic(as_float32(x, "x"), E2M1)
    grid = torch.tensor(_E2M1_MAGNITUDES, device=rounded.device)
    index = torch.searchsorted(grid, rounded.abs().contiguous()).clamp(max=len(_E2M1_MAGNITUDES) - 1)
    return (index + 8 * torch.signbit(rounded)).to(torch.uint8)


def decode_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """Float32 values of E2M1 ``codes`` (integer tensor, values 0..15), from the bit layout.

    Exponent field 0 is subnormal (0 or 0.5); otherwise ``2**(E - 1) * (1 + M / 2)``.
    """
    check_integer(codes, "codes")
    codes32 = codes.to(torch.int32)
    exponent_field = (codes32 >> 1) & 0b11
    mantissa = (codes32 & 1).float()
    normal = pow2(exponent_field - 1) * (1.0 + 0.5 * mantissa)
    magnitude = torch.where(exponent_field == 0, 0.5 * mantissa, normal)
    return torch.where((codes32 & 0b1000) != 0, -magnitude, magnitude)
