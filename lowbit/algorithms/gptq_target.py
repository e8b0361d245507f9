"""GPTQ's target when the layer's inputs are quantized too (W4A4): fold the input quantization error into the
weight GPTQ rounds (the asymmetric calibration of GPTAQ, Li et al. 2025).

At run time the linear computes ``Q(X) Wq^T`` where the float layer computed ``X W^T``. With ``Xq = Q(X)``
(the linear's own input quantizer applied to the float inputs), ``n`` rows and the damping ``d`` of GPTQ:

1. ``H_q = 2 Xq^T Xq / n`` and ``C = 2 X^T Xq / n`` (``in x in``, summed in float64 over batches and ranks);
2. ``V = W C (H_q + d I)^-1``: the ridge least-squares weight for quantized inputs,
   ``argmin_V (2/n) ||X W^T - Xq V^T||^2 + d ||V||^2``;
3. GPTQ rounds ``V`` with the Hessian ``H_q``: since the least-squares residual is orthogonal to ``Xq``,
   ``||X W^T - Xq Q^T||^2 = ||X W^T - Xq V^T||^2 + ||Xq (V - Q)^T||^2`` (for d -> 0), and the second term is
   what GPTQ minimises.

With the input quantizer disabled ``Xq = X`` and ``V = W H (H + d I)^-1``, close to ``W``. Measured: on a tiny
Llama it lowers the W4A4 output error, on the bundled model it raised KL (NVFP4 GPTQ + block scale search 0.0686 ->
0.0970, ``bench/results/frontier_default_2026-12-07.md``), so it is opt-in (``gptq``'s ``input_error``).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn

from lowbit import distributed
from lowbit.algorithms.layerwise import LayerInputs, weights_reused
from lowbit.algorithms.weights import effective_input
from lowbit.structure.groups import find_input_groups
from lowbit.structure.weights import QuantizableWeight


class InputErrorAccumulator:
    """``H_q = 2 Xq^T Xq / n`` and ``C = 2 X^T Xq / n`` over the rows of every batch added (step 1), each batch's
    products in float32, their sums in float64."""

    def __init__(self, columns: int, device: torch.device | str | None = None) -> None:
        self.quantized_gram = torch.zeros(columns, columns, dtype=torch.float64, device=device)
        self.cross_gram = torch.zeros_like(self.quantized_gram)
        self.rows = 0

    def add(self, x: Tensor, xq: Tensor) -> None:
        x, xq = (t.detach().reshape(-1, t.shape[-1]).float() for t in (x, xq))
        self.quantized_gram += (xq.T @ xq).double()
        self.cross_gram += (x.T @ xq).double()
        self.rows += x.shape[0]

    def combine_ranks(self) -> None:
        self.quantized_gram = distributed.sum_tensor(self.quantized_gram)
        self.cross_gram = distributed.sum_tensor(self.cross_gram)
        self.rows = distributed.sum_count(self.rows)

    def result(self) -> tuple[Tensor, Tensor]:
        """``(H_q, C)`` in float32."""
        scale = 2.0 / max(self.rows, 1)
        return (self.quantized_gram * scale).float(), (self.cross_gram * scale).float()


def input_error_target(weight: Tensor, hessian_q: Tensor, cross: Tensor, percdamp: float) -> Tensor:
    """Step 2: ``V = W C (H_q + d I)^-1`` ``(out, in)``, ``d = percdamp * mean(diag H_q)``, in float64, returned
    in ``weight``'s dtype."""
    h = hessian_q.double()
    damped = h + percdamp * h.diagonal().mean() * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    right = cross.double().T @ weight.detach().double().T  # C^T W^T, (in, out)
    return torch.linalg.solve(damped, right).T.to(weight.dtype)


def linears_with_input_error(layer: nn.Module, inputs: LayerInputs
                             ) -> Iterator[tuple[str, QuantizableWeight, Tensor, Tensor]]:
    """``(name, linear, H_q, C)`` for every linear with an enabled weight quantizer, one input group at a time
    (as ``gptq.linears_with_hessians``); ``Xq`` comes from the group's first linear's input quantizer."""
    for group in find_input_groups(layer, inputs):
        linears = {n: w for n, w in group.linears.items() if w.weight_quantizer.is_enabled}
        if not linears:
            continue
        first_name, first = next(iter(group.linears.items()))
        accumulator = InputErrorAccumulator(first.in_features, first.weight.device)
        with weights_reused(layer):
            inputs.feed(layer, {first_name: first},
                        lambda _n, x, sums=accumulator, linear=first: sums.add(effective_input(linear, x),
                                                                                linear.input_quantizer(x)),
                        stop_after=first)
        accumulator.combine_ranks()
        hessian_q, cross = accumulator.result()
        for name, linear in linears.items():
            yield name, linear, hessian_q, cross
