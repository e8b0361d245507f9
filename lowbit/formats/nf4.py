"""NF4 (4-bit NormalFloat, Dettmers et al. 2023, "QLoRA"): 16 levels at normal quantiles in [-1, 1].

    normalized = x / amax                                  (amax = max |x| of the group; <= 2**-24: 1)
    code       = index of the NF4 value nearest to normalized  (a value exactly halfway between two
                                                             levels takes the lower one, as NNCF's
                                                             searchsorted on the midpoints)
    x_hat      = NF4_VALUES[code] * amax

The table is not a lowbit format yet (``lowbit.formats`` has none), so it lives here with the
quantizer that applies it; the weight-compression modes use it for ``CompressWeightsMode.NF4``.
"""

from __future__ import annotations

import torch

from lowbit.formats._common import TINY_AMAX, as_float32, as_float32_like, check_integer
from lowbit.quantizer import TensorQuantizer

NF4_VALUES = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)


def _table(device: torch.device) -> torch.Tensor:
    return torch.tensor(NF4_VALUES, dtype=torch.float32, device=device)


def quantize_nf4(x: torch.Tensor, amax: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
    """NF4 codes (uint8 0..15, same shape as ``x``) and the float32 scale (``amax``, tiny -> 1).

    ``amax`` broadcasts against ``x`` (per group on a block view). Inputs beyond ``[-amax, amax]``
    saturate to codes 0 / 15.
    """
    x32 = as_float32(x, "x")
    scale = as_float32_like(amax, x32, "amax")
    scale = torch.where(scale <= TINY_AMAX, 1.0, scale)
    table = _table(x32.device)
    midpoints = (table[1:] + table[:-1]) / 2
    codes = torch.searchsorted(midpoints, (x32 / scale).contiguous(), side="left")
    return codes.to(torch.uint8), scale


def dequantize_nf4(codes: torch.Tensor, scale: torch.Tensor | float, dtype: torch.dtype = torch.float32):
    """``NF4_VALUES[codes] * scale`` in float32, returned as ``dtype``."""
    check_integer(codes, "codes")
    values = _table(codes.device)[codes.long()]
    return (values * as_float32_like(scale, values, "scale")).to(dtype)


def fake_quant_nf4(x: torch.Tensor, amax: torch.Tensor | float) -> torch.Tensor:
    """``dequantize_nf4(*quantize_nf4(x, amax))`` in ``x``'s dtype."""
    codes, scale = quantize_nf4(x, amax)
    return dequantize_nf4(codes, scale, x.dtype)


class NF4Quantizer(TensorQuantizer):
    """A TensorQuantizer whose 4-bit symmetric grid is replaced by the NF4 table.

    Give it the int4 attributes of the granularity wanted (``num_bits=4, block_sizes={-1: 64}``):
    calibration, the block view and ``amax`` (max |w| per group) are TensorQuantizer's; only the rounding
    of a block view differs.
    """

    def fake_quant_view(self, view: torch.Tensor, amax: torch.Tensor | None, amin=None) -> torch.Tensor:
        return fake_quant_nf4(view, amax)

    def extra_repr(self) -> str:
        return "nf4 " + super().extra_repr().removeprefix(self.config.format_name + " ")
