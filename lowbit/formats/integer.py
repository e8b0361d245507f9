"""Integer formats: symmetric (ModelOpt's multiplicative scale) and asymmetric (scale + zero point).

Symmetric, per ModelOpt ``fake_tensor_quant``, codes formed as its exporter and the checkpoint readers do::

    step  = amax / qmax, scale = qmax / amax    (amax <= 2**-24: codes 0, scale 1)
    codes = clamp(round_half_even(x / step), qmin, qmax)
    x_hat = codes / scale

Asymmetric (affine, the range widened to contain 0 so 0 is exact)::

    xmin' = min(xmin, 0), xmax' = max(xmax, 0)
    scale = (xmax' - xmin') / (2**b - 1)          (range <= 2**-24: scale 1)
    zero_point = clamp(round_half_even(-xmin' / scale), 0, 2**b - 1)
    codes = clamp(round_half_even(x / scale) + zero_point, 0, 2**b - 1)
    x_hat = (codes - zero_point) * scale

Symmetric with a signed scale (NNCF's INT4_SYM / INT8_SYM, llama.cpp's Q4_0): the end of ``[xmin, xmax]``
of larger magnitude (``xmin`` on ties) maps exactly onto the code ``qmin = -2**(b-1)``, so a group whose
largest weight is positive gets a negative scale and uses the code range's long end all the same::

    xmin' = min(xmin, 0), xmax' = max(xmax, 0)
    extreme = xmin' if -xmin' >= xmax' else xmax'
    scale = qmin / extreme                       (|extreme| <= 2**-24: codes 0, scale 1)
    codes = clamp(round_half_even(x * scale), qmin, qmax)
    x_hat = codes / scale                        (step 1 / scale = -extreme / 2**(b-1), signed)

All math in float32; ``amax``/``xmin``/``xmax`` broadcast against ``x`` (scalar, per-channel keepdim
shape, or per-block on ``to_blocks(x)``). Codes are float32 tensors holding integers.
"""

from __future__ import annotations

import torch

from ._common import TINY_AMAX, as_float32, as_float32_like, divide, scale_and_step

MIN_BITS, MAX_BITS = 2, 8


def int_range(num_bits: int, unsigned: bool = False, narrow_range: bool = False) -> tuple[int, int]:
    """(qmin, qmax) of a ``num_bits`` integer.

    Signed: qmax = 2**(b-1) - 1, qmin = -qmax - 1 (or -qmax with ``narrow_range``).
    Unsigned: qmin = 0, qmax = 2**b - 1 (``narrow_range`` does not apply).
    """
    if isinstance(num_bits, bool) or not isinstance(num_bits, int) or not MIN_BITS <= num_bits <= MAX_BITS:
        raise ValueError(f"num_bits must be an int in {MIN_BITS}..{MAX_BITS}, got {num_bits!r}")
    if unsigned:
        return 0, 2**num_bits - 1
    qmax = 2 ** (num_bits - 1) - 1
    return (-qmax if narrow_range else -qmax - 1), qmax


def quantize_int(
    x: torch.Tensor,
    amax: torch.Tensor | float,
    num_bits: int,
    unsigned: bool = False,
    narrow_range: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric integer quantization: returns (codes, scale), both float32.

    ``codes = clamp(round_half_even(x / step), qmin, qmax)`` with ``step = amax / qmax`` (the divisor exports
    store, ``scale_and_step``) and ``scale = qmax / amax`` (``dequantize_int`` divides by it); unsigned
    formats clamp negative inputs to 0. Where ``amax <= 2**-24`` the codes are 0 and the scale is 1
    (ModelOpt's behaviour), so nothing is NaN. ``scale`` has the broadcast shape of ``amax``.
    """
    qmin, qmax = int_range(num_bits, unsigned, narrow_range)
    x32 = as_float32(x, "x")
    amax32 = as_float32_like(amax, x32, "amax")
    is_tiny = amax32 <= TINY_AMAX
    scale, step = scale_and_step(amax32, qmax)
    # in place on the one new tensor: each fresh (N, K) temporary costs page faults where large blocks are mapped
    codes = (x32 / step).round_().clamp_(qmin, qmax).masked_fill_(is_tiny, 0.0)
    return codes, scale


def dequantize_int(
    codes: torch.Tensor, scale: torch.Tensor | float, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``codes / scale`` (symmetric, multiplicative scale), computed in float32, returned as ``dtype``."""
    return (as_float32(codes, "codes") / as_float32_like(scale, codes, "scale")).to(dtype)


def fake_quant_int(
    x: torch.Tensor,
    amax: torch.Tensor | float,
    num_bits: int,
    unsigned: bool = False,
    narrow_range: bool = False,
) -> torch.Tensor:
    """``dequantize_int(*quantize_int(x, amax, ...))`` in ``x``'s dtype."""
    codes, scale = quantize_int(x, amax, num_bits, unsigned, narrow_range)
    return codes.div_(scale).to(x.dtype)  # dequantize_int in place: codes is this call's own temporary


def quantize_int_asym(
    x: torch.Tensor,
    xmin: torch.Tensor | float,
    xmax: torch.Tensor | float,
    num_bits: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric (affine) unsigned quantization: returns (codes, scale, zero_point), all float32.

    The range is widened to contain 0; ``scale = (xmax - xmin) / (2**b - 1)`` (a step size),
    ``zero_point = clamp(round(-xmin / scale), 0, 2**b - 1)``,
    ``codes = clamp(round(x / scale) + zero_point, 0, 2**b - 1)``; rounding is half-to-even.
    Where the widened range is <= 2**-24 the scale is 1 (then zero_point is 0).
    """
    _, qmax = int_range(num_bits, unsigned=True)
    x32 = as_float32(x, "x")
    low = torch.clamp(as_float32_like(xmin, x32, "xmin"), max=0.0)
    high = torch.clamp(as_float32_like(xmax, x32, "xmax"), min=0.0)
    span = high - low
    scale = torch.where(span <= TINY_AMAX, 1.0, divide(span, qmax))
    zero_point = torch.clamp(torch.round(-low / scale), 0, qmax)
    codes = torch.clamp(torch.round(x32 / scale) + zero_point, 0, qmax)
    return codes, scale, zero_point


def dequantize_int_asym(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``(codes - zero_point) * scale`` in float32, returned as ``dtype``."""
    codes32 = as_float32(codes, "codes")
    zero32 = as_float32_like(zero_point, codes32, "zero_point")
    return ((codes32 - zero32) * as_float32_like(scale, codes32, "scale")).to(dtype)


def fake_quant_int_asym(
    x: torch.Tensor,
    xmin: torch.Tensor | float,
    xmax: torch.Tensor | float,
    num_bits: int,
) -> torch.Tensor:
    """``dequantize_int_asym(*quantize_int_asym(x, xmin, xmax, num_bits))`` in ``x``'s dtype."""
    codes, scale, zero_point = quantize_int_asym(x, xmin, xmax, num_bits)
    return dequantize_int_asym(codes, scale, zero_point, x.dtype)


def signed_scale_extreme(xmin: torch.Tensor, xmax: torch.Tensor) -> torch.Tensor:
    """The end of ``[min(xmin, 0), max(xmax, 0)]`` of larger magnitude, ``xmin`` on ties (signed, float32)."""
    low = torch.clamp(xmin.float(), max=0.0)
    high = torch.clamp(xmax.float(), min=0.0)
    return torch.where(-low >= high, low, high)


def quantize_int_signed_scale(
    x: torch.Tensor,
    xmin: torch.Tensor | float,
    xmax: torch.Tensor | float,
    num_bits: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric integer quantization with a signed scale (module docstring): returns (codes, scale),
    float32, dequantized by :func:`dequantize_int` (``codes / scale``).

    ``scale = qmin / extreme`` with ``extreme = signed_scale_extreme(xmin, xmax)``: negative when the
    larger end is positive. ``codes = clamp(round_half_even(x * scale), qmin, qmax)``; where
    ``|extreme| <= 2**-24`` the codes are 0 and the scale is 1.
    """
    qmin, qmax = int_range(num_bits)
    x32 = as_float32(x, "x")
    extreme = signed_scale_extreme(as_float32_like(xmin, x32, "xmin"), as_float32_like(xmax, x32, "xmax"))
    is_tiny = extreme.abs() <= TINY_AMAX
    scale = divide(qmin, torch.where(is_tiny, 1.0, extreme))
    codes = torch.where(is_tiny, 0.0, torch.clamp(torch.round(x32 * scale), qmin, qmax))
    return codes, torch.where(is_tiny, 1.0, scale)


def fake_quant_int_signed_scale(
    x: torch.Tensor,
    xmin: torch.Tensor | float,
    xmax: torch.Tensor | float,
    num_bits: int,
) -> torch.Tensor:
    """``dequantize_int(*quantize_int_signed_scale(x, xmin, xmax, num_bits))`` in ``x``'s dtype."""
    codes, scale = quantize_int_signed_scale(x, xmin, xmax, num_bits)
    return dequantize_int(codes, scale, x.dtype)


def signed_scale_range(step: torch.Tensor, num_bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(xmin, xmax)`` that give the signed-scale grid of step ``step`` (``x_hat = codes * step``, any sign):
    the grid's own ends ``sorted(qmin * step, qmax * step)``, whose larger end is ``qmin * step``."""
    qmin, qmax = int_range(num_bits)
    ends = (qmin * step, qmax * step)
    return torch.minimum(*ends), torch.maximum(*ends)
