"""LoRA correction (the objective of NNCF's ``lora_correction``): low-rank float adapters fitted, on calibration
data, to the error the weight quantization leaves in each linear's output.

For a linear with weight ``W`` ``(out, in)``, its quantized weight ``Q(W)`` (the weight quantizer as calibrated),
the quantization error ``R = W - Q(W)`` and the inputs ``X`` ``(n, in)`` reaching it in the block (earlier groups
already quantized and corrected), the adapters ``B`` ``(out, r)``, ``A`` ``(r, in)`` minimise the output error::

    || X R^T - X A^T B^T ||_F^2 = || (R - B A) C ||_F^2,     C C^T = H = X^T X + d I

(``d = percdamp * mean(diag X^T X)``, GPTQ's damping, keeps ``C`` invertible for dead or collinear inputs). The
minimum over rank ``r`` is the truncated SVD of ``R C = U S V^T`` (Eckart-Young): ``B = U_r S_r``,
``A = V_r^T C^{-1}`` (a triangular solve), in float64. NNCF reaches the same objective by a few rounds of
alternating least squares from an SVD start; the closed form is its fixed point.

The adapters run in float on the linear's raw input (``lowbit.modules.low_rank``):
``y = x_q Q(W)^T + b + (x A^T) B^T``. A ``pre_quant_scale`` ``p`` on the input quantizer (AWQ) is taken into
account: the fit is in the scaled space, and ``A diag(p)`` is stored.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lowbit.algorithms.gptq import linears_with_hessians
from lowbit.algorithms.layerwise import LayerInputs, tensor_quantizers
from lowbit.modules.low_rank import add_low_rank

LORA_CORRECTION_OPTIONS = {"rank": 8, "percdamp": 0.01}


def lora_factors(residual: Tensor, hessian: Tensor, rank: int, percdamp: float = 0.01) -> tuple[Tensor, Tensor]:
    """``(B (out, r), A (r, in))`` minimising ``||(R - B A) C||_F`` (module docstring) for the error ``residual``
    R ``(out, in)`` and the input Hessian ``hessian`` ``(in, in)`` (any positive multiple of ``X^T X``);
    ``r = min(rank, out, in)``. Float64 inside, returned in ``residual``'s dtype."""
    h = hessian.detach().double()
    h = h + percdamp * h.diagonal().mean().clamp_min(torch.finfo(torch.float64).tiny) * torch.eye(
        h.shape[0], dtype=h.dtype, device=h.device)
    lower = torch.linalg.cholesky(h)  # C
    u, singular, vh = torch.linalg.svd(residual.detach().double() @ lower, full_matrices=False)
    r = min(rank, singular.numel())
    b = u[:, :r] * singular[:r]
    a = torch.linalg.solve_triangular(lower.T, vh[:r].T, upper=True).T  # A C = V_r^T
    return b.to(residual.dtype), a.to(residual.dtype)


def lora_correction_layer(layer: nn.Module, inputs: LayerInputs, rank: int = 8, percdamp: float = 0.01) -> None:
    """LoRA correction of every linear with an enabled weight quantizer in ``layer``, one input group at a time."""
    for name, linear, hessian in linears_with_hessians(layer, inputs):
        with torch.no_grad():
            residual = linear.weight.float() - linear.weight_quantizer(linear.weight).float()
        b, a = lora_factors(residual, hessian, rank, percdamp)  # W and the Hessian both see the scaled input x p
        pre_quant_scale = tensor_quantizers(linear.input_quantizer)[0].pre_quant_scale
        if pre_quant_scale is not None:  # the adapters read the raw x: (x p) A^T = x (A diag(p))^T
            a = a * pre_quant_scale.float().to(a.device)
        add_low_rank(linear.module, a, b, name=name)


def check_lora_correction_options(options: dict) -> None:
    """ValueError naming the option unless rank >= 1 and percdamp > 0."""
    if options["rank"] < 1:
        raise ValueError(f"lora_correction: rank={options['rank']!r} must be an int >= 1")
    if not options["percdamp"] > 0:
        raise ValueError(f"lora_correction: percdamp={options['percdamp']!r} must be > 0")
