"""When ``x @ W.T + bias`` must be recorded for autograd: the prepared kernels (Triton, ``_scaled_mm`` with its bias,
the CPU C kernels) and the CUDA graphs replaying them record no backward, so such calls take the autograd path."""

from __future__ import annotations

import torch


def needs_autograd(x: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Grad mode is on and ``x`` or ``bias`` requires grad."""
    return torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad))
