"""GPTQ for micro-scaled weights: NVFP4 (E2M1 elements, an E4M3 scale per 16 input columns and a float32
global scale) and MX (E2M1 / FP6 / FP8 elements, an E8M0 scale per 32 columns). Each block of columns is one
GPTQ group (``lowbit.algorithms.gptq.gptq_quantize``) whose scale is fixed before its first column is
quantized, as GPTQ fixes a group's integer scale (llm-compressor's GPTQ on NVFP4 and MR-GPTQ, Egiazarian et al.
2025, do the same; ModelOpt's NVFP4 GPTQ likewise keeps the global scale of the original weight).

For a weight ``W`` ``(out, in)`` with blocks of ``b`` columns:

1. NVFP4's global amax is ``max |W|`` of the weight before GPTQ, kept for the whole run (the quantizer's
   ``amax``); MX has no global scale.
2. When the column loop reaches a block's first column, the block's ``block_amax`` ``(out, 1)`` is chosen from
   the block's current, error-updated weights ``(out, b)`` (or, with ``static_groups``, from the weights before
   GPTQ, up front, as ``act_order`` needs): ``"max"`` its own max |w| (the format's default scale), ``"mse"`` or
   ``"4over6"`` the per-block scale search of ``lowbit.formats.scale_search`` on those weights (least squared
   error of the block rounded alone), ``"loss"`` the same ``"mse"`` candidates ranked per row by GPTQ's own loss
   over the block, ``sum_j e_j^2`` with ``e_j = (w_j - q_j) / U_jj`` and each error pushed onto the block's
   later columns as the loop will (``U`` the Cholesky factor of the inverse Hessian; dynamic blocks only).
3. Each column ``w_j`` of the block is quantized by the format's own function on blocks of one element with
   the block's ``block_amax``: ``fake_quant_nvfp4(w_j[:, None], global_amax, 1, block_amax)`` (the scale formula
   reads only ``block_amax``, so this is the value the ``b``-wide block gives that element); its error goes onto
   the later columns as in GPTQ.
4. The weight becomes GPTQ's result and the quantizer keeps the block maxima as ``block_amax``
   ``(out, in / b)``: fake quantization recomputes the same block scales from them, and a value already on a
   block's grid quantizes to itself, so the codes GPTQ chose are the ones the model runs with and exports.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lowbit import formats
from lowbit.formats.minifloat import FloatFormat
from lowbit.formats.scale_search import (
    MX_METHODS,
    NVFP4_METHODS,
    mx_block_amax,
    mx_candidates,
    nvfp4_block_amax,
    nvfp4_candidates,
)
from lowbit.quantizer import TensorQuantizer
from lowbit.structure.weights import QuantizableWeight

BLOCK_SCALE_CHOICES = ("max", *sorted(set(NVFP4_METHODS) | set(MX_METHODS)), "loss")  # gptq's block_scales
NVFP4_SCALE_BITS, MX_SCALE_BITS = (4, 3), (8, 0)


def is_micro_scaled(quantizer: object) -> bool:
    """True for one TensorQuantizer of NVFP4 or MX format (E4M3 or E8M0 block scales)."""
    config = getattr(quantizer, "config", None)
    return isinstance(quantizer, TensorQuantizer) and config.block_scale_bits in (NVFP4_SCALE_BITS, MX_SCALE_BITS)


def micro_block_size(linear: QuantizableWeight, name: str, block_scales: str = "max") -> int:
    """Columns per block of ``linear``'s NVFP4 / MX weight quantizer; ValueError naming ``name`` when GPTQ cannot
    fix its scales (not 2-D, a weight pre_quant_scale, blocks along another dim, ``block_scales`` the format
    lacks)."""
    quantizer = linear.weight_quantizer
    config = quantizer.config
    allowed = ("max", *(NVFP4_METHODS if config.block_scale_bits == NVFP4_SCALE_BITS else MX_METHODS), "loss")
    if block_scales not in allowed:
        raise ValueError(f"{name}: gptq block_scales={block_scales!r} is not defined for {config.format_name}; "
                         f"allowed are {list(allowed)}")
    if linear.weight.dim() != 2 or set(config.block_axes) - {-1, 1}:
        raise ValueError(f"{name}: GPTQ needs a 2-D weight blocked along its input dim, got shape "
                         f"{tuple(linear.weight.shape)} with {config.granularity}")
    if quantizer.pre_quant_scale is not None:
        raise ValueError(f"{name}: GPTQ on {config.format_name} weights does not take a weight pre_quant_scale")
    size = config.block_axes[-1]
    if linear.weight.shape[1] % size:
        raise ValueError(f"{name}: in_features={linear.weight.shape[1]} is not a multiple of the block size {size}")
    return size


@dataclass(frozen=True)
class MicroScaleGrid:
    """One weight's NVFP4 or MX grid as GPTQ sees it: ``block_amax(slab)`` fixes a block's scale (step 2 of the
    module docstring), ``quantize_column(column, block_amax)`` rounds one column on it (step 3)."""

    block_size: int
    block_scales: str  # "max", "mse", "4over6" or "loss"
    global_amax: Tensor | None  # NVFP4: () float32; MX: None
    element_format: FloatFormat | None  # MX: the element format; NVFP4: None (E2M1)

    @classmethod
    def of(cls, quantizer: TensorQuantizer, weight: Tensor, block_size: int, block_scales: str) -> MicroScaleGrid:
        config = quantizer.config
        if config.block_scale_bits == NVFP4_SCALE_BITS:
            return cls(block_size, block_scales, weight.detach().float().abs().amax(), None)
        return cls(block_size, block_scales, None, formats.float_format(config.num_bits))

    def block_amax(self, slab: Tensor) -> Tensor:
        """``(out, 1)`` block maxima of the block ``slab`` ``(out, block_size)``."""
        if self.block_scales == "max":
            return slab.detach().float().abs().amax(dim=1, keepdim=True)
        if self.element_format is None:
            return nvfp4_block_amax(slab, self.global_amax, self.block_scales, self.block_size)
        return mx_block_amax(slab, self.element_format, self.block_scales, self.block_size)

    def block_amax_by_loss(self, slab: Tensor, upper: Tensor) -> Tensor:
        """``(out, 1)`` block maxima among the ``"mse"`` candidates of ``slab`` ``(out, b)``, each row's with the least
        GPTQ loss over the block (module docstring, step 2; ``upper`` is the block's ``(b, b)`` part of ``U``)."""
        if self.element_format is None:
            found = nvfp4_candidates(slab, self.global_amax, "mse", self.block_size)
        else:
            found = mx_candidates(slab, self.element_format, "mse", self.block_size)
        candidates = torch.stack(found)  # (C, out, 1)
        w = slab.detach().to(upper.dtype).expand(len(found), *slab.shape).clone()  # (C, out, b)
        loss = torch.zeros(w.shape[:2], dtype=upper.dtype, device=w.device)
        for i in range(w.shape[2]):
            column = w[:, :, i]
            q = self.quantize_column(column.reshape(-1), candidates.reshape(-1, 1)).reshape(column.shape)
            error = (column - q) / upper[i, i]
            w[:, :, i:] -= error[:, :, None] * upper[i, i:]
            loss += error.square()
        choice = loss.argmin(dim=0)  # the first minimum: the default scale wins ties
        return candidates.gather(0, choice[None, :, None])[0]

    def quantize_column(self, column: Tensor, block_amax: Tensor) -> Tensor:
        """``column`` ``(out,)`` quantize-dequantized with its block's scale from ``block_amax`` ``(out, 1)``."""
        one = column[:, None]
        if self.element_format is None:
            return formats.fake_quant_nvfp4(one, self.global_amax, 1, block_amax.reshape(-1, 1))[:, 0]
        return formats.fake_quant_mx(one, self.element_format, 1, block_amax.reshape(-1, 1))[:, 0]

    def store(self, quantizer: TensorQuantizer, weight: Tensor, blocks: list[Tensor]) -> None:
        """Step 4: ``blocks`` (one ``(out, 1)`` per block, in column order) as the quantizer's ``block_amax``
        ``(out, in / block_size)``, and NVFP4's global amax as its ``amax``."""
        quantizer.block_amax = torch.cat(blocks, dim=1).float().contiguous()
        if self.global_amax is not None:
            quantizer.amax = self.global_amax.reshape(quantizer.compute_amax(weight).shape).clone()
