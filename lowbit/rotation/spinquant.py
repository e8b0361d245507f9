"""SpinQuant (Liu et al. 2024): rotations learned on the Stiefel manifold against the quantized model's loss,
then fused into the weights like QuaRot's (``lowbit.rotation.quarot``), with no online rotation left.

Row convention as in QuaRot: a linear computes ``y = x W^T``; ``R`` is orthogonal.

1. Fold each RMSNorm's scale into the linears that read it (QuaRot's step 1); the float model is unchanged.
2. ``R1`` (hidden x hidden, the residual stream) starts at QuaRot's randomised Hadamard (``seed``), and with
   ``heads=True`` one ``R2`` per layer (head_dim x head_dim, between v_proj and o_proj) at QuaRot's
   (``seed + 1``). For given rotations the weights are (:func:`rotated_weights`): embedding ``E R1``; q, k,
   gate, up, lm_head ``W R1``; v_proj ``R2^T W R1`` on each head's rows (bias ``b R2``); o_proj
   ``R1^T W R2`` on each head's columns; down_proj ``R1^T W``; writers' biases ``b R1``.
3. Loss: the mean per-token KL(float || quantized) over the calibration calls, the float log-probabilities
   taken once with every quantizer off (rotations do not change them); the quantized forward runs the model
   with the rotated weights substituted (``torch.func.functional_call``) and its quantizers on: weights with
   their range from the rotated weight itself (max, or the format's dynamic rule), activations as configured
   (``activations=False``: off, SpinQuant's weight-only variant; ``weights=False``: weights float, the
   variant that leaves the weights to GPTQ). Rounding passes the gradient straight through
   (``TensorQuantizer``'s rule). Each step takes one calibration call, in turn.
4. Cayley SGD (Li et al. 2020, as SpinQuant's optimiser, without momentum), for each ``R`` with the loss
   gradient ``G = dL/dR``: the skew-symmetric ``A = G R^T - R G^T``, the step
   ``a = min(lr_t, 1 / ||A||_1)`` (``lr_t`` decaying linearly from ``lr`` to 0 over ``steps``; the cap keeps a
   step within the rotation Cayley SGD's fixed-point loop can take) and
   ``R <- (I + a/2 A)^-1 (I - a/2 A) R``: orthogonal again (the Cayley transform of a skew matrix is) and,
   for small ``a``, ``R - a (G - R G^T R)``: a step down the Riemannian gradient. Rotations in float64.
5. Fuse: the weights of step 2 computed in float64 for the learned rotations and written in their dtype;
   the float model's logits are unchanged (float32: ~1e-6 relative) and the quantized model runs plain linears.

Calibrated ranges of the rotated modules' quantizers no longer apply and are dropped (the algorithm that follows
calibrates them); a ``pre_quant_scale`` (SmoothQuant / AWQ) on them is refused: rotate before scaling.
Supported models are QuaRot's (``check_rotatable``). Memory: the float log-probabilities of every call
(tokens x vocab float32) and one autograd graph of the whole model per step.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.func import functional_call

from lowbit.algorithms.layerwise import capture_layer_inputs
from lowbit.calibration import ForwardLoop, iter_quantizers
from lowbit.eval.divergence import token_kl
from lowbit.quantizer import quantization_off
from lowbit.rotation.hadamard import RandomHadamard
from lowbit.rotation.quarot import READERS, WRITERS, check_rotatable, fold_norms

logger = logging.getLogger("lowbit")

SPINQUANT_OPTIONS = {"seed": 0, "steps": 100, "lr": 1.5, "heads": True, "weights": True, "activations": True}


def skew_gradient(rotation: Tensor, gradient: Tensor) -> Tensor:
    """``A = G R^T - R G^T`` (n x n, skew-symmetric): ``A R = G - R G^T R`` is the loss gradient on the
    Stiefel manifold (canonical metric) at the orthogonal ``R``."""
    return gradient @ rotation.T - rotation @ gradient.T


def cayley_step(rotation: Tensor, skew: Tensor, lr: float) -> Tensor:
    """``(I + lr/2 A)^-1 (I - lr/2 A) R`` for the skew-symmetric ``A``: orthogonal for an orthogonal ``R``;
    a descent step for ``A`` from :func:`skew_gradient`."""
    eye = torch.eye(rotation.shape[0], dtype=rotation.dtype, device=rotation.device)
    return torch.linalg.solve(eye + lr / 2 * skew, (eye - lr / 2 * skew) @ rotation)


def hadamard_matrix(size: int, seed: int) -> Tensor:
    """QuaRot's randomised Hadamard ``R`` (:class:`RandomHadamard`) as a dense float64 matrix."""
    return RandomHadamard(size, seed).right(torch.eye(size, dtype=torch.float64))


def rotated_weights(model: nn.Module, r1: Tensor, r2s: list[Tensor] | None, dtype: torch.dtype) -> dict[str, Tensor]:
    """Every weight and bias step 2 of the module docstring rotates, by parameter name, computed in ``dtype``
    from the model's (norm-folded) parameters; differentiable in ``r1`` and ``r2s`` (one per layer, or None)."""
    r1 = r1.to(dtype)

    def value(module: nn.Module, name: str) -> Tensor | None:
        tensor = getattr(module, name, None)
        return None if tensor is None else tensor.detach().to(dtype)

    found = {"model.embed_tokens.weight": value(model.model.embed_tokens, "weight") @ r1,
             "lm_head.weight": value(model.lm_head, "weight") @ r1}
    for index, layer in enumerate(model.model.layers):
        prefix = f"model.layers.{index}."
        for path in (p for paths in READERS.values() for p in paths):
            found[f"{prefix}{path}.weight"] = value(layer.get_submodule(path), "weight") @ r1
        for path in WRITERS:
            found[f"{prefix}{path}.weight"] = r1.T @ value(layer.get_submodule(path), "weight")
            bias = value(layer.get_submodule(path), "bias")
            if bias is not None:
                found[f"{prefix}{path}.bias"] = bias @ r1
        if r2s is not None:
            _rotate_heads(found, prefix + "self_attn.", layer.self_attn, r2s[index].to(dtype))
    return found


def _rotate_heads(found: dict[str, Tensor], prefix: str, attention: nn.Module, r2: Tensor) -> None:
    """v_proj rows ``R2^T W`` and bias ``b R2`` per value head; o_proj columns ``W R2`` per head."""
    head_dim = r2.shape[0]
    v_weight = found[prefix + "v_proj.weight"]
    heads = v_weight.reshape(-1, head_dim, v_weight.shape[1])  # (kv_heads, head_dim, in)
    found[prefix + "v_proj.weight"] = torch.einsum("dk,hdi->hki", r2, heads).reshape(v_weight.shape)
    bias = getattr(attention.v_proj, "bias", None)
    if bias is not None:
        found[prefix + "v_proj.bias"] = (bias.detach().to(r2.dtype).reshape(-1, head_dim) @ r2).reshape(-1)
    o_weight = found[prefix + "o_proj.weight"]
    found[prefix + "o_proj.weight"] = (o_weight.reshape(o_weight.shape[0], -1, head_dim) @ r2).reshape(o_weight.shape)


def check_spinquant_options(options: dict) -> dict:
    """``options`` over ``SPINQUANT_OPTIONS`` merged with the defaults; errors name the key and what is allowed."""
    unknown = sorted(set(options) - set(SPINQUANT_OPTIONS))
    if unknown:
        raise ValueError(f"rotate (spinquant) got unknown options {unknown}; allowed: {sorted(SPINQUANT_OPTIONS)}")
    merged = {**SPINQUANT_OPTIONS, **options}
    for key in ("seed", "steps"):
        if isinstance(merged[key], bool) or not isinstance(merged[key], int) or merged[key] < 0:
            raise ValueError(f"rotate (spinquant): {key}={merged[key]!r} must be an int >= 0")
    if isinstance(merged["lr"], bool) or not isinstance(merged["lr"], (int, float)) or not merged["lr"] > 0:
        raise ValueError(f"rotate (spinquant): lr={merged['lr']!r} must be a number > 0")
    for key in ("heads", "weights", "activations"):
        if not isinstance(merged[key], bool):
            raise TypeError(f"rotate (spinquant): {key}={merged[key]!r} must be True or False")
    return merged


def _rotated_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    paths = [p for paths in READERS.values() for p in paths] + list(WRITERS)
    return [("model.embed_tokens", model.model.embed_tokens), ("lm_head", model.lm_head)] + [
        (f"model.layers.{i}.{p}", layer.get_submodule(p)) for i, layer in enumerate(model.model.layers) for p in paths]


def _drop_calibrated_ranges(model: nn.Module) -> None:
    """Reset the rotated modules' quantizers (their ranges belong to the unrotated tensors); ValueError for a
    ``pre_quant_scale``, which would not commute with the rotation."""
    for name, module in _rotated_modules(model):
        for quantizer_name, quantizer in iter_quantizers(module):
            if getattr(quantizer, "pre_quant_scale", None) is not None:
                raise ValueError(f"rotate (spinquant): {name}.{quantizer_name} has a pre_quant_scale (SmoothQuant / "
                                 "AWQ); rotate before scaling")
            quantizer.reset_amax()


@contextmanager
def _quantizers_for_loss(model: nn.Module, weights: bool, activations: bool) -> Iterator[None]:
    """Weight quantizers (``*weight_quantizer``) and the others (activations) in quant mode or not."""
    off = [q for name, q in iter_quantizers(model)
           if (not weights if name.endswith("weight_quantizer") else not activations)]
    with quantization_off(off):
        yield


def _log_probs(output) -> Tensor:
    logits = output.logits if hasattr(output, "logits") else output[0]
    return torch.log_softmax(logits.float(), dim=-1)


def _kl(reference: Tensor, log_probs: Tensor, mask: Tensor | None) -> Tensor:
    """Mean over tokens (those ``mask`` keeps) of ``KL(p || q)`` (``lowbit.eval.divergence.token_kl``)."""
    per_token = token_kl(reference, log_probs)
    if mask is None:
        return per_token.mean()
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum()


def learn_rotations(model: nn.Module, calls: list[tuple[tuple, dict]], seed: int = 0, steps: int = 100,
                    lr: float = 1.5, heads: bool = True, weights: bool = True,
                    activations: bool = True) -> tuple[Tensor, list[Tensor] | None, list[float]]:
    """Steps 2-4 of the module docstring on a norm-folded model: ``(R1, [R2 per layer] or None, losses)``, the
    loss of each step before its update. The model's parameters are not changed."""
    hidden = model.model.embed_tokens.weight.shape[1]
    head_dim = getattr(model.model.layers[0].self_attn, "head_dim", hidden // model.config.num_attention_heads)
    device = model.model.embed_tokens.weight.device
    rotations = [hadamard_matrix(hidden, seed).to(device)]
    if heads:
        rotations += [hadamard_matrix(head_dim, seed + 1).to(device) for _ in model.model.layers]
    all_quantizers = [q for _, q in iter_quantizers(model)]
    with torch.no_grad(), quantization_off(all_quantizers):
        references = [_log_probs(model(*args, **kwargs)) for args, kwargs in calls]
    dtype = model.model.embed_tokens.weight.dtype
    losses = []
    with _quantizers_for_loss(model, weights, activations):
        for step in range(steps):
            args, kwargs = calls[step % len(calls)]
            leaves = [r.detach().requires_grad_() for r in rotations]
            with torch.enable_grad():
                overrides = rotated_weights(model, leaves[0], leaves[1:] if heads else None, dtype)
                output = functional_call(model, overrides, args, kwargs)
                loss = _kl(references[step % len(calls)], _log_probs(output), kwargs.get("attention_mask"))
                gradients = torch.autograd.grad(loss, leaves)
            losses.append(loss.item())
            scheduled = lr * (1 - step / steps)
            with torch.no_grad():
                for index, (rotation, gradient) in enumerate(zip(rotations, gradients, strict=True)):
                    skew = skew_gradient(rotation, gradient.double())
                    norm = torch.linalg.matrix_norm(skew, ord=1).item()
                    rotations[index] = cayley_step(rotation, skew, min(scheduled, 1 / norm) if norm else 0.0)
            logger.debug("spinquant step %d: KL %.5g", step, losses[-1])
    return rotations[0], (rotations[1:] if heads else None), losses


def fuse_rotations(model: nn.Module, r1: Tensor, r2s: list[Tensor] | None) -> None:
    """Write the rotated weights (float64 products) into the model's parameters, in their dtype."""
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in rotated_weights(model, r1, r2s, torch.float64).items():
            parameters[name].copy_(value.to(parameters[name].dtype))


def spinquant(model: nn.Module, forward_loop: ForwardLoop | None, **options) -> list[float]:
    """SpinQuant's learned rotations fused into ``model`` in place (steps 1-5 of the module docstring);
    ``options`` over ``SPINQUANT_OPTIONS``. Returns the loss of each step (mean per-token KL to the float
    model on that step's calibration call). ``forward_loop`` runs the calibration batches through a model."""
    options = check_spinquant_options(options)
    check_rotatable(model)
    if forward_loop is None:
        raise ValueError("rotate (spinquant) learns its rotations on calibration data: forward_loop is required")
    _drop_calibrated_ranges(model)
    calls = capture_layer_inputs(model, model, forward_loop, full_pass=False, calibrate=False).calls
    fold_norms(model)
    r1, r2s, losses = learn_rotations(model, calls, **options)
    fuse_rotations(model, r1, r2s)
    if losses:
        logger.info("spinquant: %d steps, calibration KL %.5g at the Hadamard start, %.5g at the last step",
                    len(losses), losses[0], losses[-1])
    return losses
