"""Host memory one decoder block takes at its peak while ``quantize_layerwise`` calibrates and packs it on the CPU,
per calibration algorithm: what the runner reserves from ``host_memory_budget`` for the block (the activations
between blocks get the rest).

``need = W_b + TEMPORARIES[algorithm] 4 n_b + max(forward, kept) + RUN_OVERHEAD``, in bytes, where

- ``W_b``: the block's weights in the calibration dtype, ``n_b`` their number;
- ``TEMPORARIES[algorithm] 4 n_b``: what scales with the weights, in float32 copies of them: their fake-quantized
  copies reused over a pass, the algorithm's float32 temporaries (AWQ's scaled, quantized and error copies of a
  group's weights per candidate; GPTQ's working copy, codes and errors of a weight) and packing's. Measured, not
  derived: the block's peak resident set less ``W_b`` and ``max(forward, kept)``, over ``4 n_b``, on random Llama
  blocks of two shapes (bf16, 2048 tokens), the larger, rounded up (bench/block_memory.py,
  bench/results/block_memory_2026-12-07.md);
- ``forward``: one batch through the block, ``tokens_per_batch (5 I + 8 H) max(e, 4)`` (``lowbit.ptq.estimate``'s
  per-token activations of a decoder block; float32 where statistics are taken);
- ``kept``: what the algorithm holds of the block's inputs while it runs, counted from the tensors it keeps:
  AWQ (scale search) the sampled input rows of every input group, ``min(tokens, max_tokens) sum_g in_g 4`` (float32),
  plus one group's copy of them and its Gram matrix ``in_g^2 4``; GPTQ one input group's Hessian at a time: its
  float64 sum, the float32 Hessian, its damped copy and Cholesky factors, ``in^2 (8 + 8 + 4 4)`` for the widest
  input; ``max`` nothing. The larger of ``forward`` and ``kept`` counts, not their sum: the algorithms take
  their statistics during the forward passes and search once those are done (measured: the sum over-counted
  AWQ's block by half).
- ``RUN_OVERHEAD``: what a run keeps resident besides its tensors: torch's first-forward buffers (8 MB,
  ``lowbit.ptq.estimate``), the model code transformers imports lazily (7 MB for Llama) and the heap's small
  blocks the first block leaves behind (13.6 MB at hidden 256, not returned by ``malloc_trim``). Measured: INT4 AWQ
  and NVFP4 runs (hidden 512, 14-15 blocks, bench/layerwise_memory.py) went 13 and 11 MB over a plan that counted
  8 MB here; 24 MB is that, rounded up. A one-block run shows only the first 8 MB (bench/block_memory.py).

Besides the block, the runner reserves the modules outside the blocks and ``SKELETON_BYTES_PER_BLOCK`` per block:
the model built on the meta device with its quantizers is Python objects, 0.10-0.11 MB a Llama block (measured:
resident growth of building and quantizing 4 and 40 blocks at hidden 256); an INT4 AWQ run of 40 small blocks went
1.14x over its budget without it.

The figures hold with glibc's mmap threshold fixed (``lowbit.ptq.memory.return_large_frees``, which the runner
sets when given a budget): with glibc's default the heap kept the block's freed float32 temporaries until the
block's end, and AWQ's block peaked at 13.2 ``W_b`` above its weights instead of 4.0 (measured).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from torch import nn

from lowbit.algorithms.registry import AWQ_LITE_OPTIONS
from lowbit.structure.groups import row_weights

logger = logging.getLogger(__name__)
FLOAT32, FLOAT64 = 4, 8
RUN_OVERHEAD = 24_000_000
SKELETON_BYTES_PER_BLOCK = 150_000  # the meta model's modules and quantizers: 0.10-0.11 MB a Llama block, measured
TEMPORARIES = {"max": 1.25, "awq_lite": 1.0, "gptq": 1.5}  # measured, in float32 copies of the block's weights
GPTQ_HESSIAN_BYTES = 2 * FLOAT64 + 4 * FLOAT32  # per in^2: float64 sum and scaled copy, float32 H, 3 factors


@dataclass(frozen=True)
class BlockMemory:
    """A block's peak host bytes by term (module docstring); ``total`` is what the runner reserves."""

    weights: int
    temporaries: int
    forward: int
    kept: int
    fixed: int = RUN_OVERHEAD

    @property
    def total(self) -> int:
        return self.weights + self.temporaries + max(self.forward, self.kept) + self.fixed


def kept_bytes(layer: nn.Module, algorithm: str, options: dict, tokens: int) -> int:
    """What ``algorithm`` holds of the block's inputs while it runs (module docstring); 0 for max."""
    linears = list(row_weights(layer).values())
    widest = max(w.in_features for w in linears)
    if algorithm == "awq_lite":  # every linear's input counted: q/k/v (gate/up) share theirs, an upper bound
        rows = min(tokens, options.get("max_tokens", AWQ_LITE_OPTIONS["max_tokens"]))
        return rows * (sum(w.in_features for w in linears) + widest) * FLOAT32 + widest ** 2 * FLOAT32
    if algorithm == "gptq":
        return widest ** 2 * GPTQ_HESSIAN_BYTES
    return 0


def block_memory(layer: nn.Module, algorithm: str, options: dict, tokens: int, batch_tokens: int) -> BlockMemory:
    """The peak of ``layer`` (its parameters' dtype is the calibration dtype; the meta device will do) under
    ``algorithm`` ("max" or a layer-wise algorithm, with its ``options``) with ``tokens`` calibration tokens in
    batches of at most ``batch_tokens``. An algorithm not measured (``TEMPORARIES``) gets the largest measured
    figures, with a warning."""
    numel = sum(p.numel() for p in layer.parameters())
    weights = sum(p.numel() * p.element_size() for p in layer.parameters())
    element = max(next(layer.parameters()).element_size(), FLOAT32)
    linears = list(row_weights(layer).values())
    widest, hidden = max(w.in_features for w in linears), min(w.in_features for w in linears)
    if algorithm in TEMPORARIES:
        factor, kept = TEMPORARIES[algorithm], kept_bytes(layer, algorithm, options, tokens)
    else:
        logger.warning("quantize_layerwise: the host memory of algorithm %r per block is not measured "
                       "(lowbit.scale.memory measures %s): reserving the largest measured figures", algorithm,
                       sorted(TEMPORARIES))
        factor = max(TEMPORARIES.values())
        kept = max(kept_bytes(layer, name, options, tokens) for name in TEMPORARIES)
    return BlockMemory(weights, int(factor * numel * FLOAT32), batch_tokens * (5 * widest + 8 * hidden) * element,
                       kept)
