"""LSQ: learned step sizes (Esser et al. 2020, "Learned Step Size Quantization"), fine-tuned end to end against
the float model's next-token distribution, from the codes and grid of another algorithm (the ``start``).

Every weight ``W`` ``(out, in)`` with an enabled static integer weight quantizer (per channel or per group of
``g`` inputs, symmetric or asymmetric), seen as groups ``(out, n, g)``, with ``w`` its float value, ``w_hat0``
the start's fake-quantized value and ``d0`` the start grid's step (``amax0 / qmax`` symmetric; asymmetric
``(amax0 - amin0) / qmax`` with integer zero point ``z0 = clamp(round(-amin0 / d0), 0, qmax)``, as the format):

1. Latent weight ``v``, by ``latent`` (default ``"codes"``: on the bundled model's W4 g128 it lowered the KL from
   a GPTQ start where ``"float"`` did not, ``bench/results/frontier_lsq_2026-12-07.md``):
   - ``"float"`` (LSQ): ``v = v0 + d0 u`` with ``v0 = w`` where the start's code is round-to-nearest's, else the
     start's value ``w_hat0`` (a code AutoRound or GPTQ moved stays at its cell's centre, where a small change
     of the step keeps it); the codes re-round as the step moves;
   - ``"codes"`` (EfficientQAT's end-to-end step training): ``v = d (k0 + u)`` with ``k0 = w_hat0 / d0`` the
     start's integer codes (asymmetric: less the zero point), so the codes stay the start's while ``u = 0``.
   The offsets ``u`` (grid steps) are tuned only with ``weight_lr > 0`` (QAT of the weights); they start at 0.
2. Step ``d = d0 exp(l)``, one log-step ``l`` per group (start 0): symmetric ``amax = d qmax``; asymmetric
   ``amin = -z0 d``, ``amax = (qmax - z0) d`` (the integer zero point is kept, so the format reads back ``d``
   and ``z0``).
3. ``w_hat = Q(v; amin, amax)``, the format's own fake quantization (``autoround.fake_quant_ste`` with no
   rounding offset) with ``round`` passed straight through. With ``latent="float"`` its gradients are LSQ's:
   in the step, ``d w_hat / d d = round(v / d) - v / d`` where the code is inside the range and the clipped
   code (``qmin``, ``qmax``; asymmetric ``-z0``, ``qmax - z0``) outside; in ``v``, 1 inside and 0 outside.
   With ``latent="codes"``, ``d w_hat / d d`` is the code ``clamp(round(k0 + u))`` and ``d w_hat / d u = d``
   inside the range. LSQ's gradient scale ``1 / sqrt(N qmax)`` is for SGD: Adam divides each parameter's
   update by its own gradient's running RMS, so a constant factor per tensor drops out; it is not applied.
4. Loss: mean per-token ``T^2 KL(p_T || q_T)`` (``lowbit.eval.divergence.token_kl``) over every token of the
   step's calibration batches; ``p`` the float model's next-token distribution (every quantizer off), recorded
   once before the start algorithm runs and kept as float16 log-probabilities (``windows x seq x vocab x 2``
   bytes); ``q`` the model's with every ``w_hat`` and its other quantizers off (as AutoRound's blocks). At the
   distillation ``temperature`` ``T`` (Hinton et al. 2015; default 1: the plain KL) both are softened,
   ``p_T = softmax(log p / T)`` and ``q_T = softmax(z / T)`` for logits ``z``; the factor ``T^2`` keeps the
   gradient's size as ``T`` changes. ``T > 1`` weighs the less likely tokens more: the calibration text is the
   model's training text, where ``p`` is sharper than on unseen text.
5. Adam on ``l`` (rate ``lr``) and ``u`` (rate ``weight_lr``), both decaying linearly to 0 over ``iterations``
   steps; step ``t`` takes ``batches_per_step`` calibration batches, cycling (``autoround.step_batches``).
6. Kept: the tuned result if its loss (step 4, at ``T``) over every calibration batch is below the start's,
   else the start (never worse than the start on the calibration data). Written back as the weight ``w_hat`` and the
   quantizer's static ``(amin, amax)``: the format re-rounds ``w_hat`` to the same codes, so compress and export
   need nothing new.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call

from lowbit.algorithms.autoround import fake_quant_ste, grid_step, step_batches, tunable_weights
from lowbit.algorithms.layerwise import quantizers_disabled
from lowbit.algorithms.option_rules import STEP_RULES, check_option_rules
from lowbit.algorithms.scale_estimation import IntGrid, estimation_group_size, quantizer_range, store_range
from lowbit.calibration import ForwardLoop
from lowbit.eval.divergence import token_kl
from lowbit.structure.weights import QuantizableWeight

logger = logging.getLogger("lowbit")

LSQ_OPTIONS = {"iterations": 200, "lr": 0.001, "weight_lr": 0.0, "batches_per_step": 1, "latent": "codes",
               "temperature": 1.0, "start": "autoround", "start_options": {}}
LATENTS = ("float", "codes")
TEACHER_DTYPE = torch.float16


@dataclass
class Teacher:
    """The calibration calls ``(args, kwargs)`` of the model, the float model's log-probabilities on each
    ``(batch, seq, vocab)`` as ``TEACHER_DTYPE``, and the float weights ``{name: (out, in)}`` float32."""

    calls: list[tuple[tuple, dict]]
    log_probs: list[Tensor]
    float_weights: dict[str, Tensor]


def logits_of(output) -> Tensor:
    """The logits of a model's output: ``.logits``, the first entry of a tuple, or the tensor itself."""
    if hasattr(output, "logits"):
        return output.logits
    return output[0] if isinstance(output, (tuple, list)) else output


def record_teacher(model: nn.Module, weights: dict[str, QuantizableWeight], forward_loop: ForwardLoop) -> Teacher:
    """Run ``forward_loop`` on ``model`` with every quantizer off and keep each call, its log-probabilities and
    the float ``weights``."""
    calls, log_probs = [], []

    def keep_call(_module, args, kwargs):
        calls.append((args, kwargs))

    def keep_output(_module, _args, _kwargs, output):
        log_probs.append(torch.log_softmax(logits_of(output).detach().float(), dim=-1).to(TEACHER_DTYPE))

    handles = [model.register_forward_pre_hook(keep_call, with_kwargs=True),
               model.register_forward_hook(keep_output, with_kwargs=True)]
    try:
        with quantizers_disabled(model), torch.no_grad():
            forward_loop(model)
    finally:
        for handle in handles:
            handle.remove()
    if not calls:
        raise ValueError("lsq: forward_loop ran no batch through the model")
    float_weights = {name: weight.weight.detach().float().clone() for name, weight in weights.items()}
    return Teacher(calls, log_probs, float_weights)


def teacher_kl(reference_log_probs: Tensor, logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Mean over tokens of ``T^2 KL(softmax(log p / T) || softmax(logits / T))``: ``reference_log_probs``
    ``log p`` and ``logits`` ``(..., vocab)``, ``T`` = ``temperature``; step 4 of the module docstring (float32 at
    least). ``log p / T`` is re-normalised: ``log p`` differs from the float logits by a constant per token."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    log_probs = torch.log_softmax(logits.to(dtype) / temperature, dim=-1)
    if temperature == 1.0:
        return token_kl(reference_log_probs, log_probs).mean()
    reference = torch.log_softmax(reference_log_probs.to(dtype) / temperature, dim=-1)
    return temperature**2 * token_kl(reference, log_probs).mean()


@dataclass
class LearnedStep:
    """The tunables of one weight (module docstring, steps 1-3): ``log_step`` ``l`` ``(out, n, 1)`` and
    ``offset`` ``u`` ``(out, n, g)``, over the fixed ``latent`` ``v0``, start step ``d0`` and zero point
    ``z0`` (asymmetric; else None)."""

    grid: IntGrid
    latent: Tensor
    start_step: Tensor
    zero_point: Tensor | None
    log_step: Tensor
    offset: Tensor
    codes: bool = False

    @classmethod
    def start_at(cls, grid: IntGrid, w: Tensor, w_hat0: Tensor, start: tuple[Tensor | None, Tensor],
                 group_size: int, latent: str = "codes") -> LearnedStep:
        """From float weight ``w`` and the start's ``w_hat0`` ``(out, in)`` on the start range ``(amin0 or None,
        amax0)`` ``(out, n, 1)`` (step 1), in ``w``'s dtype."""
        groups = w.detach().reshape(w.shape[0], -1, group_size)
        w_hat0 = w_hat0.detach().reshape(groups.shape)
        amin0, amax0 = (None if bound is None else bound.to(w.dtype) for bound in start)
        step = grid_step(grid, amin0, amax0)
        zero = None
        if grid.asymmetric:
            zero = torch.clamp(torch.round(-amin0.clamp(max=0) / step), 0, grid.qmax)
        if latent == "codes":
            return cls(grid, torch.round(w_hat0 / step), step, zero, torch.zeros_like(step), torch.zeros_like(groups),
                       True)
        nearest = fake_quant_ste(grid, groups, torch.zeros(()), amin0, amax0)
        latent = torch.where(torch.round((nearest - w_hat0) / step) == 0, groups, w_hat0)  # same code: w
        return cls(grid, latent, step, zero, torch.zeros_like(step), torch.zeros_like(groups))

    def _range(self, step: Tensor) -> tuple[Tensor | None, Tensor]:
        if self.zero_point is None:
            qmax = float(self.grid.qmax)
            return None, step * qmax
        return -self.zero_point * step, (self.grid.qmax - self.zero_point) * step

    def step(self) -> Tensor:
        """``d = d0 exp(l)`` ``(out, n, 1)`` (step 2)."""
        return self.start_step * self.log_step.exp()

    def range(self) -> tuple[Tensor | None, Tensor]:
        """``(amin or None, amax)`` ``(out, n, 1)`` of the current step (step 2)."""
        return self._range(self.step())

    def quantized(self) -> Tensor:
        """``w_hat`` ``(out, in)`` (step 3), differentiable in ``log_step`` and ``offset``."""
        step = self.step()
        amin, amax = self._range(step)
        v = step * (self.latent + self.offset) if self.codes else self.latent + self.start_step * self.offset
        return fake_quant_ste(self.grid, v, torch.zeros(()), amin, amax).reshape(self.latent.shape[0], -1)


def lsq(model: nn.Module, teacher: Teacher, iterations: int = 200, lr: float = 0.001, weight_lr: float = 0.0,
        batches_per_step: int = 1, latent: str = "codes", temperature: float = 1.0) -> tuple[float, float]:
    """Steps 1-6 of the module docstring on ``model`` (after its start algorithm), against ``teacher``;
    writes the kept result back. Returns the calibration loss of step 4 (the plain KL at ``temperature`` 1)
    ``(start, kept)``."""
    weights = tunable_weights(model)
    steps = {}
    for name, weight in weights.items():
        group_size = estimation_group_size(weight, name)
        start = quantizer_range(weight.weight_quantizer, weight.weight, group_size)
        with torch.no_grad():
            w_hat0 = weight.weight_quantizer(weight.weight.detach()).float()
        steps[name] = LearnedStep.start_at(IntGrid.of(weight.weight_quantizer), teacher.float_weights[name], w_hat0,
                                           start, group_size, latent)

    def parameters() -> dict[str, Tensor]:
        return {f"{name}.weight": step.quantized().t() if weights[name].kind == "transposed" else step.quantized()
                for name, step in steps.items()}

    def loss_on(batches: list[int]) -> Tensor:
        quantized, total = parameters(), 0.0
        for index in batches:
            args, kwargs = teacher.calls[index]
            logits = logits_of(functional_call(model, quantized, args, kwargs))
            total = total + teacher_kl(teacher.log_probs[index], logits, temperature)
        return total / len(batches)

    every_batch = list(range(len(teacher.calls)))
    with quantizers_disabled(model):
        with torch.no_grad():
            start_kl = float(loss_on(every_batch))
        _descend(steps, loss_on, iterations, lr, weight_lr, batches_per_step, len(every_batch))
        with torch.no_grad():
            tuned_kl = float(loss_on(every_batch))
    logger.info("lsq: calibration KL (T = %g) %.6g at the start, %.6g tuned (%s)", temperature, start_kl, tuned_kl,
                "kept" if tuned_kl < start_kl else "start kept")
    if tuned_kl < start_kl:
        _write_back(weights, steps)
    return start_kl, min(start_kl, tuned_kl)


def _descend(steps: dict[str, LearnedStep], loss_on, iterations: int, lr: float, weight_lr: float,
             batches_per_step: int, batches: int) -> None:
    """Step 5: Adam on the log-steps (and offsets when ``weight_lr > 0``), rates decaying linearly to 0."""
    groups = [{"params": [s.log_step.requires_grad_() for s in steps.values()], "lr": lr}]
    if weight_lr > 0:
        groups.append({"params": [s.offset.requires_grad_() for s in steps.values()], "lr": weight_lr})
    optimizer = torch.optim.Adam(groups)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 1 - t / iterations)
    with torch.enable_grad():
        for t in range(iterations):
            optimizer.zero_grad(set_to_none=True)
            loss = loss_on(step_batches(t, batches_per_step, batches))
            loss.backward()
            logger.debug("lsq step %d: KL %.6g", t, float(loss.detach()))
            optimizer.step()
            schedule.step()
    for step in steps.values():
        step.log_step.requires_grad_(False)
        step.offset.requires_grad_(False)


def _write_back(weights: dict[str, QuantizableWeight], steps: dict[str, LearnedStep]) -> None:
    """Step 6: each weight becomes ``w_hat`` and its quantizer stores the learned range."""
    with torch.no_grad():
        for name, weight in weights.items():
            amin, amax = steps[name].range()
            weight.weight.copy_(steps[name].quantized())
            store_range(weight.weight_quantizer, weight.weight, amin, amax)


def check_lsq_options(options: dict) -> None:
    """ValueError naming the option unless iterations >= 1, lr > 0, weight_lr >= 0, batches_per_step >= 0,
    temperature > 0 and latent is one of ``LATENTS`` (the start and its options are checked by the registry)."""
    if options["latent"] not in LATENTS:
        raise ValueError(f"lsq: latent={options['latent']!r}; allowed: {list(LATENTS)}")
    check_option_rules("lsq", options, {**STEP_RULES, "weight_lr": (lambda value: value >= 0,
                                                                    ">= 0 (0: the steps only)"),
                                        "temperature": (lambda value: value > 0, "> 0 (1: the plain KL)")})
