"""The two runners ``lowbit ptq`` hands work to when asked, each looked up where its owner puts it:

- ``--low-memory-mode``: the layer-wise runner for models larger than the device (issue #21 item 3),
  ``lowbit.scale.quantize_layerwise``: it reads the weights per decoder block from the model directory's
  safetensors, calibrates and quantizes one block at a time and writes lowbit's packed checkpoint itself.
- ``--auto-quantize-bits B --quant a,b``: ``lowbit.search.auto_quantize`` (a per-layer format search under an
  effective-bits budget). The budget is checked here first against the cheapest format (from shapes and
  configs alone, ``lowbit.ptq.plan``), so a budget no format can meet fails before any weight is read.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch
from torch import nn

from lowbit.ptq.plan import plan
from lowbit.ptq.qformats import QFORMATS

LAYERWISE_ENTRY = "lowbit.scale:quantize_layerwise"
AUTO_QUANTIZE_ENTRY = "lowbit.search:auto_quantize"


def _entry(entry: str) -> Callable | None:
    module_name, function_name = entry.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name is not None and module_name.startswith(error.name):
            return None  # the module itself is absent; an import error inside it propagates
        raise
    return getattr(module, function_name, None)


def check_layerwise_runner() -> Callable:
    """The layer-wise runner; ValueError saying it is not in this install yet."""
    runner = _entry(LAYERWISE_ENTRY)
    if runner is None:
        raise ValueError(f"--low-memory-mode needs the layer-wise runner {LAYERWISE_ENTRY} (one decoder block on "
                         "the device at a time, weights read per block), which this install of lowbit does not "
                         "have yet; run without --low-memory-mode")
    return runner


def check_layerwise_qformat(qformat: str, auto_quantize_bits: float | None) -> None:
    """ValueError when ``--low-memory-mode`` cannot run ``qformat`` (its algorithm needs the whole model) or is
    asked for an auto_quantize search (which scores the whole model at once)."""
    if auto_quantize_bits is not None:
        raise ValueError("--low-memory-mode with --auto-quantize-bits: the format search scores the whole model at "
                         "once; pass one of them")
    if _method(QFORMATS[qformat].config()) == "smoothquant":
        allowed = [name for name, q in QFORMATS.items() if _method(q.config()) != "smoothquant"]
        raise ValueError(f"--low-memory-mode with --qformat {qformat!r}: SmoothQuant runs on the whole model, not "
                         f"block by block; allowed with --low-memory-mode are {', '.join(allowed)}")


def _method(config: dict) -> str | None:
    algorithm = config.get("algorithm")
    return algorithm.get("method") if isinstance(algorithm, dict) else algorithm


def check_auto_quantize() -> Callable:
    """``lowbit.search.auto_quantize``; ValueError saying it is not in this install yet."""
    search = _entry(AUTO_QUANTIZE_ENTRY)
    if search is None:
        raise ValueError(f"--auto-quantize-bits needs {AUTO_QUANTIZE_ENTRY.replace(':', '.')} (per-layer format "
                         "search), which this install of lowbit does not have yet; pass --qformat alone")
    return search


def effective_bits(model: nn.Module, qformat: str) -> float:
    """Bits per weight of the matrices ``qformat`` quantizes (codes and scales), from the plan alone."""
    quantized = plan(model, QFORMATS[qformat].config()).quantized
    numel = sum(torch.Size(w.shape).numel() for w in quantized)
    return 8 * sum(w.bytes_after for w in quantized) / numel if numel else 16.0


def check_budget(model: nn.Module, bits: float, qformats: tuple[str, ...]) -> dict[str, float]:
    """{qformat: effective bits}; ValueError when ``bits`` is below the cheapest of them (or not positive)."""
    if not bits > 0:
        raise ValueError(f"--auto-quantize-bits {bits}: expected a positive number of bits per weight")
    costs = {name: effective_bits(model, name) for name in qformats}
    cheapest = min(costs, key=costs.get)
    if bits < costs[cheapest]:
        raise ValueError(f"--auto-quantize-bits {bits} is below the cheapest format of --quant: {cheapest} takes "
                         f"{costs[cheapest]:.3f} bits per quantized weight (codes and scales); allowed budgets are "
                         f">= {costs[cheapest]:.3f}")
    return costs


def run_auto_quantize(model: nn.Module, bits: float, qformats: tuple[str, ...],
                      batches: list[dict[str, torch.Tensor]]) -> dict:
    """Quantize ``model`` in place by ``lowbit.search.auto_quantize`` (KL scores: no gradients); returns what the
    report keeps of its search state: effective bits, total score, method, the format chosen per module."""
    search = check_auto_quantize()
    device = next(model.parameters()).device

    def forward_step(module: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return module(**{key: value.to(device) for key, value in batch.items()}).logits

    _, state = search(model, constraints={"effective_bits": bits},
                      quantization_formats=[QFORMATS[name].config() for name in qformats],
                      data_loader=batches, forward_step=forward_step, method="kl_div")
    return {"effective_bits": state.effective_bits, "score": state.score, "method": state.method,
            "assignment": state.assignment}
