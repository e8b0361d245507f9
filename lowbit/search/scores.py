"""Sensitivity scores: how much the loss grows when one module (group) is quantized in one format.

``gradient`` (ModelOpt's estimate): with every searched module float, y = a module's output and
``dy_f = y_f - y`` the change when that module alone is in format f (same input). A second-order Taylor
expansion of the loss L around y, with the Hessian replaced by the empirical Fisher diag(g * g),
``g = dL/dy``:

    dL_f ~ g . dy_f + 1/2 dy_f^T H dy_f ~ 1/2 sum (g * dy_f)^2

(the first-order term vanishes in expectation at a trained minimum). The score sums ``(g * dy_f)^2`` over
the output's elements and the score batches (the 1/2 is dropped: only comparisons matter). One forward and
backward per batch, plus one extra forward of each module per format (its quantized weight computed once for
all batches: ``CalibratedModules.reusing_weights``); only activation gradients are taken (the input
embeddings' output requires grad, the parameters do not, when the model has ``get_input_embeddings``).

``dtype`` lower than the model's (bfloat16 for a float32 model): the forward and backward run under
``torch.autocast`` in that dtype, so ``g`` and the module inputs come from it; each linear's ``dy_f`` is
computed from its weight and input changes (``lowbit.search.output_change``: one or two matmuls in ``dtype``
instead of a float32 forward per format), other modules are called in float32 on their inputs cast up
(``dy_f = module_f(x) - module(x)``, both in float32). Scores move by bfloat16's rounding of ``g``, ``x`` and
``dy`` (~0.4 % each, relative), far below the gaps between formats that decide the choice.

``kl_div`` (backprop-free): per batch, the float model's next-token log-probabilities P, then for each
group and format, that group alone in the format: Q; the score is the mean over batches of the mean per-token
``KL(P || Q)`` (``lowbit.eval.divergence.token_kl``). One forward per (group, format, batch).

A group's score for a format is the sum of its modules' scores (``gradient``), or measured on the group
at once (``kl_div``); NONE scores 0.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch
from torch import Tensor, nn

from lowbit.eval.divergence import token_kl
from lowbit.search.calibrated import CalibratedModules
from lowbit.search.candidates import NONE
from lowbit.search.output_change import LinearChange, linear_change

ForwardStep = Callable[[nn.Module, object], object]
LossFunc = Callable[[object, object], Tensor]
METHODS = ("gradient", "kl_div")


def _first(output) -> Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def output_logits(output) -> Tensor:
    """The logits in a forward step's output: its ``.logits``, its first element, or the tensor itself."""
    logits = getattr(output, "logits", None)
    logits = _first(output) if logits is None else logits
    if not isinstance(logits, Tensor):
        raise TypeError(f"forward_step returned {type(output).__name__}: kl_div needs the logits (a tensor, a tuple "
                        "starting with one, or an object with .logits)")
    return logits


def gradient_scores(calibrated: CalibratedModules, formats: list[str], batches: Iterable,
                    forward_step: ForwardStep, loss_func: LossFunc, dtype: torch.dtype | None = None,
                    first_batch: AbstractContextManager | None = None) -> dict[str, dict[str, float]]:
    """{module: {format: score}} by the Fisher estimate (module docstring), over ``batches``.

    ``dtype``: the precision of the forward and backward (None: the model's own; a lower one: autocast and
    each linear's change from its weight and input changes, module docstring). ``first_batch``: a context
    entered around the first batch's forward (a trace riding on it)."""
    model = calibrated.model
    calibrated.apply({})
    model_dtype = next(model.parameters()).dtype
    lower = dtype if dtype is not None and dtype != model_dtype else None
    changes = _linear_changes(calibrated, formats, lower) if lower is not None else {}
    totals = {name: {f: torch.zeros((), dtype=torch.float64) for f in formats} for name in calibrated.modules}
    busy: set[str] = set()

    def called_diffs(name: str, module: nn.Module, args, kwargs, y: Tensor) -> dict[str, Tensor]:
        """``module_f(x) - module(x)`` per format; in float32 on inputs cast up when the pass is in ``lower``."""
        busy.add(name)
        try:
            with torch.no_grad(), torch.autocast(y.device.type, enabled=False) if lower is not None else nullcontext():
                if lower is not None:
                    args, kwargs = _cast_floats((args, kwargs), model_dtype)
                    y = _first(module(*args, **kwargs))
                diffs = {}
                for search_format in formats:
                    calibrated.apply_module(name, search_format)
                    diffs[search_format] = _first(module(*args, **kwargs)) - y.detach()
                calibrated.apply_module(name, NONE)
        finally:
            busy.discard(name)
        return diffs

    def hook_for(name: str):
        def on_output(module, args, kwargs, output):
            y = _first(output)
            if name in busy or not torch.is_grad_enabled() or not isinstance(y, Tensor) or not y.requires_grad:
                return
            x = args[0] if args else kwargs.get("input")
            if name in changes and isinstance(x, Tensor):
                with torch.no_grad():
                    diffs = {search_format: change(x) for search_format, change in changes[name].items()}
            else:
                diffs = called_diffs(name, module, args, kwargs, y)

            def on_grad(grad: Tensor) -> None:
                for search_format, diff in diffs.items():
                    # in ``lower`` the product is rounded once to it (~0.4 %, unbiased), then squared and summed
                    # in float32: one cast of the output size instead of two
                    product = grad * diff if lower is not None else grad.float() * diff.float()
                    totals[name][search_format] += product.float().square().sum().double().cpu()

            y.register_hook(on_grad)

        return on_output

    handles = [module.register_forward_hook(hook_for(name), with_kwargs=True)
               for name, module in calibrated.modules.items()]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device.type
    index = -1
    try:
        with _activation_gradients(model), calibrated.reusing_weights(), torch.enable_grad():
            for index, batch in enumerate(batches):
                with first_batch if index == 0 and first_batch is not None else nullcontext(), \
                        torch.autocast(device, dtype=lower or torch.bfloat16, enabled=lower is not None):
                    loss = loss_func(forward_step(model, batch), batch)
                if not isinstance(loss, Tensor) or loss.dim() != 0:
                    raise TypeError(f"loss_func must return a scalar tensor, got {loss!r:.80}")
                loss.backward()
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if index < 0:
        raise ValueError("data_loader gave no batch to score with")
    return {name: {f: float(value) for f, value in scores.items()} for name, scores in totals.items()}


def _linear_changes(calibrated: CalibratedModules, formats: list[str], dtype: torch.dtype
                    ) -> dict[str, dict[str, LinearChange]]:
    """{module: {format: LinearChange}} for the modules whose every format the formula describes
    (``lowbit.search.output_change``); the model is in NONE (float)."""
    changes = {}
    for name, module in calibrated.modules.items():
        float_weight = getattr(module, "weight", None)
        if not isinstance(float_weight, Tensor):
            continue
        per_format = {}
        for search_format in formats:
            state = calibrated.states[search_format][name]
            per_format[search_format] = linear_change(module, state.slots, state.tensors.get("weight", float_weight),
                                                      float_weight, dtype)
        if all(change is not None for change in per_format.values()):
            changes[name] = per_format
    return changes


def _cast_floats(tree, dtype: torch.dtype):
    """``tree`` (tuples, lists, dicts of tensors and others) with its floating tensors cast to ``dtype``."""
    if isinstance(tree, Tensor):
        return tree.to(dtype) if tree.is_floating_point() else tree
    if isinstance(tree, (tuple, list)):
        return type(tree)(_cast_floats(item, dtype) for item in tree)
    if isinstance(tree, dict):
        return {key: _cast_floats(value, dtype) for key, value in tree.items()}
    return tree


@contextmanager
def _activation_gradients(model: nn.Module):
    """Gradients flow to activations only: parameters stop requiring grad and the input embeddings' output
    starts (when the model has ``get_input_embeddings``); otherwise every float parameter requires grad and
    its ``.grad`` is dropped afterwards. Flags and grads are restored on exit."""
    flags = {p: p.requires_grad for p in model.parameters()}
    grads = {p: p.grad for p in model.parameters()}
    embeddings = getattr(model, "get_input_embeddings", lambda: None)()
    handle = None
    if isinstance(embeddings, nn.Module):
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        handle = embeddings.register_forward_hook(lambda _m, _a, output: output.detach().requires_grad_())
    else:
        for parameter in model.parameters():
            parameter.requires_grad_(parameter.is_floating_point())
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()
        for parameter, flag in flags.items():
            parameter.requires_grad_(flag)
            parameter.grad = grads[parameter]


def kl_scores(calibrated: CalibratedModules, groups: list[list[str]], formats: list[str], batches: Iterable,
              forward_step: ForwardStep) -> list[dict[str, float]]:
    """[{format: score}] per group: mean per-token KL of the output when that group alone is in the format."""
    model = calibrated.model
    totals = [{f: 0.0 for f in formats} for _ in groups]
    count = 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), calibrated.reusing_weights():
            for batch in batches:
                calibrated.apply({})
                reference = _log_probs(forward_step(model, batch))
                for index, group in enumerate(groups):
                    for search_format in formats:
                        calibrated.apply({name: search_format for name in group})
                        quantized = _log_probs(forward_step(model, batch))
                        totals[index][search_format] += token_kl(reference, quantized).mean().item()
                calibrated.apply({})
                count += 1
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("data_loader gave no batch to score with")
    return [{f: value / count for f, value in scores.items()} for scores in totals]


def _log_probs(output) -> Tensor:
    logits = output_logits(output)
    return torch.log_softmax(logits.float(), dim=-1)
