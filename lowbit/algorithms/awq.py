"""AWQ (Lin et al. 2024, llm-awq): activation-aware weight quantization.

*Scale search* (``awq_lite``): for the linears sharing an input ``X``, try
``s = mean|X|^alpha / w_mean^(1 - alpha)`` per input channel (ModelOpt's awq_lite), where
``w_mean_j = mean over rows of |W_ij| / max|W_i, group of j|`` (each weight normalised by its own
quantization group's max, rows of every linear of the group together), clamped to ``[1e-4, 1e4]`` and
divided by ``sqrt(max s * min s)``, for ``alpha`` on a grid in ``[0, 1]``; the identity ``s = 1``
(plain rounding) is a candidate too, so the search never does worse on its sample. The candidate whose
quantized output ``X @ (Q(W * s) / s)^T`` is closest (MSE) to ``X @ W^T`` wins. The weights keep
``W * s``; the input gets ``1/s`` (``lowbit.algorithms.scaling``).

*Clip search* (``awq_clip``): per output row and group of ``g`` input columns, try
``amax = r * max|W_group|`` for ``r`` from 1 down to ``min_clip_ratio`` and keep the ``r`` with the
smallest error of that group's contribution to the output, ``mean_t (X_t,group . (Q(W) - W)_group)^2``.

``awq_full`` does both. The searches quantize weights only (activation quantizers are off).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from lowbit import distributed
from lowbit.algorithms.layerwise import LayerInputs, quantizers_disabled, recalibrate_weights
from lowbit.algorithms.scale_estimation import IntGrid
from lowbit.algorithms.scaling import apply_input_scale
from lowbit.algorithms.weights import (
    effective_input,
    quantize_with_amax,
    sample_rows,
    set_weight_amax,
    shrink_ratios,
    weight_group_size,
)
from lowbit.quantizer import SequentialQuantizer
from lowbit.structure.groups import GroupTracer, InputGroup, row_weights, same_tensor
from lowbit.structure.weights import QuantizableWeight

FakeQuantWeight = Callable[[Tensor], Tensor]  # weight -> fake-quantized weight (its own amax)
ERROR_CHUNK_ELEMENTS = 2**26  # bound on the (tokens, rows, groups) error tensor of the clip search
LOSS_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # awq_lite's loss_dtype option
logger = logging.getLogger(__name__)


def awq_scale(activation_mean: Tensor, alpha: float, weight_mean: Tensor | None = None) -> Tensor:
    """``s = clamp(mean|X|^alpha / w_mean^(1 - alpha), 1e-4, 1e4)`` divided by ``sqrt(max(s) * min(s))``;
    shape ``(in,)``, float32. ``weight_mean`` None: ``w_mean = 1`` (llm-awq's ``mean|X|^alpha``)."""
    scale = activation_mean.float().pow(alpha)
    if weight_mean is not None:
        scale = scale / (weight_mean.float().to(scale.device).pow(1 - alpha) + torch.finfo(torch.float32).tiny)
    scale = scale.clamp(1e-4, 1e4)
    return scale / (scale.max() * scale.min()).sqrt()


def normalised_weight_mean(weights: list[Tensor], group_size: int) -> Tensor:
    """``mean_i |W_ij| / max|W_i, group(j)|`` over the rows ``i`` of every weight ``(out_k, in)``, groups of
    ``group_size`` input columns (``in`` must be a multiple); shape ``(in,)``, float32, in ``[0, 1]``."""
    rows = torch.cat([w.detach().float().abs() for w in weights])
    groups = rows.reshape(rows.shape[0], -1, group_size)
    normalised = groups / (groups.amax(dim=-1, keepdim=True) + torch.finfo(torch.float32).tiny)
    return normalised.reshape(rows.shape).mean(dim=0)


def search_awq_scale(
    gram: Tensor,
    tokens: int,
    weights: list[Tensor],
    fake_quant: list[FakeQuantWeight],
    activation_mean: Tensor,
    alphas: list[float],
    weight_mean: Tensor | None = None,
    loss_dtype: torch.dtype = torch.float32,
) -> tuple[float | None, Tensor, dict[float | None, float]]:
    """The scale minimising ``sum_i ||X (Q_i(W_i s)/s)^T - X W_i^T||^2 / count`` over the identity and
    ``awq_scale(activation_mean, alpha, weight_mean)`` for each ``alpha``.

    ``gram``: ``G = X^T X`` (``(in, in)``, float32) of the ``tokens`` input rows ``X``; ``weights[i]``:
    ``(out_i, in)``; ``fake_quant[i]`` quantizes a weight of that shape; ``count = tokens * sum_i out_i``.
    Returns (best alpha, None for the identity; its scale; the loss of every candidate, the identity
    under key None). Ties keep the identity, then the smaller alpha.

    Computed as ``sum_i sum((D_i G) * D_i)`` with ``D_i = Q_i(W_i s)/s - W_i``, the same sum without
    forming the ``(tokens, out)`` outputs: ``out * in^2`` per candidate instead of ``tokens * out * in``;
    the linears reading one input share ``G``. ``loss_dtype``: the dtype of the product ``D_i G`` (float32
    accumulation, then ``* D_i`` and the sum in float32); bfloat16 runs it ~4x faster where the device has native
    bf16 matmuls, each loss off by ~0.1 %, so candidates closer than that may swap (none of the bundled
    model's 57 did).
    """
    count = tokens * sum(w.shape[0] for w in weights)
    candidates = {None: torch.ones_like(activation_mean, dtype=torch.float32)}
    candidates.update({alpha: awq_scale(activation_mean, alpha, weight_mean) for alpha in alphas})
    gram_in = gram.to(loss_dtype)
    errors = []  # float64 sums on the device: one synchronisation for all candidates, not one per weight
    for scale in candidates.values():
        scale = scale.to(gram.device)
        error = torch.zeros((), dtype=torch.float64, device=gram.device)
        for weight, quantize in zip(weights, fake_quant, strict=True):
            delta = quantize(weight.float() * scale).div_(scale).sub_(weight)  # in place on the fresh output
            error = error + (delta.to(loss_dtype) @ gram_in).float().mul_(delta).sum().double()
        errors.append(error)
    losses = dict(zip(candidates, (torch.stack(errors) / count).tolist(), strict=True))
    best = min(losses, key=losses.__getitem__)
    return best, candidates[best], losses


def search_clip_amax(
    weight: Tensor,
    x: Tensor,
    group_size: int,
    quantize: Callable[[Tensor, Tensor], Tensor],
    ratios: list[float],
) -> Tensor:
    """Per (row, group) amax ``r * max|W_group|`` minimising the group's output error (module docstring).

    ``weight``: ``(out, in)``; ``x``: ``(tokens, in)``; ``quantize(weight, amax)`` with amax
    ``(out, in / group_size)``. Returns that amax, float32; ties keep the larger ratio (listed first).
    """
    out_features, in_features = weight.shape
    groups = in_features // group_size
    weight = weight.float()
    base = weight.abs().reshape(out_features, groups, group_size).amax(dim=-1)
    x_groups = x.float().reshape(-1, groups, group_size)
    best_amax, best_error = base.clone(), torch.full_like(base, float("inf"))
    for ratio in ratios:
        amax = base * ratio
        delta = (quantize(weight, amax) - weight).reshape(out_features, groups, group_size)
        error = group_output_error(x_groups, delta)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_amax = torch.where(better, amax, best_amax)
    return best_amax


def group_output_error(x_groups: Tensor, delta: Tensor) -> Tensor:
    """``mean_t (sum_k x[t, n, k] * delta[o, n, k])^2`` as ``(out, groups)``, in chunks of output rows."""
    tokens, groups, _ = x_groups.shape
    rows_per_chunk = max(1, ERROR_CHUNK_ELEMENTS // max(1, tokens * groups))
    chunks = []
    for start in range(0, delta.shape[0], rows_per_chunk):
        contribution = torch.einsum("tnk,onk->ton", x_groups, delta[start : start + rows_per_chunk])
        chunks.append(contribution.square().mean(dim=0))
    return torch.cat(chunks)


def clip_ratios(min_clip_ratio: float, shrink_step: float) -> list[float]:
    """``1, 1 - step, ...`` down to ``min_clip_ratio`` (llm-awq: 1.0 to 0.5 by 0.05)."""
    return shrink_ratios(min_clip_ratio, shrink_step, "min_clip_ratio", "shrink_step")


def alpha_grid(alpha_step: float) -> list[float]:
    if not 0 < alpha_step <= 1:
        raise ValueError(f"alpha_step={alpha_step!r} must be in (0, 1]")
    steps = int(round(1 / alpha_step + 1e-9))
    return [min(1.0, i * alpha_step) for i in range(steps + 1)]


# ---- layer passes ---------------------------------------------------------------------------------------


def _weight_fake_quant(linear: QuantizableWeight) -> FakeQuantWeight:
    """The weight quantizer with ranges from the weight it is given, as ModelOpt's search quantizes:
    max |w| per group (min/max if asymmetric); a SequentialQuantizer (W4A8: INT4 then FP8) chains its
    stages, each with the range of what it receives, so the FP8 stage follows the scaled weight."""
    quantizer = linear.weight_quantizer
    stages = list(quantizer) if isinstance(quantizer, SequentialQuantizer) else [quantizer]
    group_size = _scale_group_size(linear)

    def own_range_fake_quant(weight: Tensor) -> Tensor:
        for stage in stages:
            if stage.config.keeps_amin:
                grid, groups = IntGrid.of(stage), weight.reshape(weight.shape[0], -1, group_size)
                weight = grid.fake_quant(groups, *grid.own_range(groups)).reshape(weight.shape)
            else:
                weight = stage.fake_quant(weight, stage.compute_amax(weight))
        return weight

    return own_range_fake_quant


class AwqInputStatistics:
    """What the scale search needs of one decoder layer's float inputs, gathered by hooks while the layer
    runs (:meth:`watching`), so that it can ride on a pass made anyway (the layer-wise runner's float
    reference pass): the input groups (traced call by call until every linear was seen) and, per group,
    ``mean_t |x_tj|`` over all tokens plus up to ``max_tokens`` input rows (evenly spaced in each call).
    Each group's statistics are kept under its first linear (the first to read the input)."""

    def __init__(self, max_tokens: int) -> None:
        self.max_tokens = max_tokens
        self.layer: nn.Module | None = None
        self.tracer: GroupTracer | None = None  # the input groups of the last layer watched
        self.sums: dict[str, Tensor] = {}
        self.counts: dict[str, int] = {}
        self.samples: dict[str, list[Tensor]] = {}

    @contextmanager
    def watching(self, layer: nn.Module, inputs: LayerInputs) -> Iterator[None]:
        """Collect afresh from every call of ``layer`` (one per batch of ``inputs``) while the block runs."""
        self.layer, self.sums, self.counts, self.samples = layer, {}, {}, {}
        per_batch = -(-self.max_tokens // distributed.sum_count(len(inputs)))  # the union's, when distributed
        read_in_call: list[Tensor] = []  # inputs recorded in the current call (kept alive: storages unique)

        def new_call(*_) -> None:
            read_in_call.clear()

        def record(name: str, x: Tensor) -> None:
            if any(same_tensor(x, seen) for seen in read_in_call):
                return  # another linear of the group read it first
            read_in_call.append(x)
            rows = x.detach().reshape(-1, x.shape[-1]).float()
            self.sums[name] = self.sums.get(name, 0) + rows.abs().sum(dim=0)
            self.counts[name] = self.counts.get(name, 0) + rows.shape[0]
            self.samples.setdefault(name, []).append(sample_rows(rows, per_batch))

        self.tracer = GroupTracer(layer)
        handles = [layer.register_forward_pre_hook(new_call), layer.register_forward_hook(new_call)]
        handles += [linear.observe_inputs(lambda x, name=name: record(name, x))
                    for name, linear in self.tracer.linears.items()]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            self.tracer.close()

    @property
    def groups(self) -> list[InputGroup]:
        return self.tracer.groups if self.tracer is not None else []

    def group_input(self, group: InputGroup) -> tuple[Tensor, int, Tensor]:
        """``(X^T X, rows, mean|X|)`` of the group's sampled input rows ``X`` (a traced group was read), summed
        over ranks (``lowbit.distributed``)."""
        name = next(iter(group.linears))
        x = torch.cat(self.samples.pop(name))
        sums, counts = distributed.sum_tensor(self.sums[name]), distributed.sum_count(self.counts[name])
        return distributed.sum_tensor(x.T @ x), distributed.sum_count(x.shape[0]), sums / counts


def awq_scale_layer(layer: nn.Module, inputs: LayerInputs, alpha_step: float = 0.1, max_tokens: int = 4096,
                    scale_per_linear: bool = False, statistics: AwqInputStatistics | None = None,
                    loss_dtype: str = "float32") -> None:
    """Scale search for every group of linears with enabled weight quantizers in ``layer``.

    ``statistics``: collected on this layer's float inputs already (the runner's reference pass);
    otherwise one float pass of ``inputs`` collects them here.
    ``scale_per_linear``: each linear of a group gets its own search and scale, kept as its input
    quantizer's ``pre_quant_scale`` (as ModelOpt's awq_lite does; an extra input multiply per linear at
    inference), instead of one scale per group that can fold into the producing norm.
    ``loss_dtype``: a key of :data:`LOSS_DTYPES`, the search's product dtype (:func:`search_awq_scale`).
    """
    if statistics is None or statistics.layer is not layer:
        statistics = AwqInputStatistics(max_tokens)
        with statistics.watching(layer, inputs), quantizers_disabled(layer):
            inputs.feed(layer, {}, lambda *_: None)
    statistics.tracer.warn_unseen()
    groups = [g for g in statistics.groups if all(w.weight_quantizer.is_enabled for w in g.linears.values())]
    for group in groups:
        gram, tokens, activation_mean = statistics.group_input(group)
        units = [InputGroup({n: w}, None) for n, w in group.linears.items()] if scale_per_linear else [group]
        for unit in units:
            linears = list(unit.linears.values())
            weights = [w.weight.detach() for w in linears]
            alpha, scale, losses = search_awq_scale(
                gram,
                tokens,
                weights,
                [_weight_fake_quant(w) for w in linears],
                activation_mean,
                alpha_grid(alpha_step),
                normalised_weight_mean(weights, _scale_group_size(linears[0])),
                LOSS_DTYPES[loss_dtype],
            )
            placement = apply_input_scale(unit, scale, inputs.ranges)
            logger.debug("awq_lite %s: alpha %s (%s), output MSE %.4g unscaled, %.4g chosen",
                         list(unit.linears), alpha, placement, losses[None], losses[alpha])
            for linear in linears:
                recalibrate_weights(linear)


def _scale_group_size(linear: QuantizableWeight) -> int:
    """Input columns sharing one weight scale: the block along the input dim of the (first) weight
    quantizer, else the whole row."""
    quantizer = linear.weight_quantizer
    first = quantizer[0] if isinstance(quantizer, SequentialQuantizer) else quantizer
    block = first.config.block_axes.get(-1) if first.config.block_sizes is not None else None
    return block if block and linear.in_features % block == 0 else linear.in_features


def awq_clip_layer(layer: nn.Module, inputs: LayerInputs, min_clip_ratio: float = 0.5,
                   shrink_step: float = 0.05, max_clip_tokens: int = 512) -> None:
    """Clip search for every linear with an enabled weight quantizer in ``layer``; sets its amax."""
    linears = {n: w for n, w in row_weights(layer).items() if w.weight_quantizer.is_enabled}
    per_batch = -(-max_clip_tokens // distributed.sum_count(len(inputs)))
    samples: dict[str, list[Tensor]] = {}

    def record(name: str, x: Tensor) -> None:
        samples.setdefault(name, []).append(sample_rows(effective_input(linears[name], x), per_batch))

    with quantizers_disabled(layer):
        inputs.feed(layer, linears, record)
    ratios = clip_ratios(min_clip_ratio, shrink_step)
    for name, linear in linears.items():
        quantizer, weight = linear.weight_quantizer, linear.weight.detach()
        rows = distributed.gather_rows(torch.cat(samples.pop(name)))
        amax = search_clip_amax(
            weight, rows, weight_group_size(linear, name, per_row=True),
            lambda w, a, q=quantizer: quantize_with_amax(q, w, a), ratios,
        )
        set_weight_amax(quantizer, weight, amax)
