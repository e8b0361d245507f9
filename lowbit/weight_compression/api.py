"""``compress_weights``: NNCF-style weight-only compression of any torch model."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from torch import nn

from lowbit.convert import report_coverage
from lowbit.weight_compression.apply import apply_plan
from lowbit.weight_compression.data import materialize
from lowbit.weight_compression.layers import IgnoredScope
from lowbit.weight_compression.modes import BackupMode, CompressWeightsMode
from lowbit.weight_compression.plan import check_options, plan_compression
from lowbit.weight_compression.sensitivity import SensitivityMetric

logger = logging.getLogger(__name__)


def compress_weights(
    model: nn.Module,
    mode: CompressWeightsMode | str = CompressWeightsMode.INT8_ASYM,
    group_size: int | None = None,
    ratio: float | None = None,
    dataset: Iterable[Any] | None = None,
    sensitivity_metric: SensitivityMetric | str | None = None,
    all_layers: bool = False,
    awq: bool = False,
    scale_estimation: bool = False,
    gptq: bool = False,
    backup_mode: BackupMode | CompressWeightsMode | str | None = BackupMode.INT8_ASYM,
    ignored_scope: IgnoredScope = None,
    packed: bool = True,
) -> nn.Module:
    """Compress the weights of ``model`` (in place) and return it; activations stay in float.

    - ``mode``: the primary format (``lowbit.weight_compression.modes`` lists each one's formula and
      storage). INT8 modes put every compressible layer in 8 bits per output channel.
    - ``group_size``: inputs sharing one scale in the 4-bit modes (128, 64, 32 ...; -1 per channel);
      None: 128 (32 for MXFP4; per channel for INT8 modes).
    - ``ratio``: the share of the ratio-defining weights (matmuls but the last; with ``all_layers`` also
      the last and the embeddings) in ``mode``; the rest, and the embeddings, the last matmul and the
      convolutions, get ``backup_mode`` (INT8_ASYM, INT8_SYM per channel, or NONE: stays float).
      None: 1.
    - ``sensitivity_metric``: which layers take ``mode`` when ``ratio < 1``
      (``lowbit.weight_compression.sensitivity`` defines each); the data-aware ones need ``dataset``.
      None: WEIGHT_QUANTIZATION_ERROR without a dataset, MAX_ACTIVATION_VARIANCE with one.
    - ``dataset``: an iterable of model inputs (dicts as keyword arguments, tuples as positional, else
      one argument), read once for the statistics and again by each refinement.
    - ``awq``, ``scale_estimation``, ``gptq``: data-aware refinements of the primary layers by lowbit's
      calibration algorithms, in NNCF's order (AWQ, then scale estimation; with ``gptq`` the estimated
      grid is GPTQ's fixed grid); INT4_SYM and INT4_ASYM take all three, NF4 / FP4 get AWQ's clip
      search for ``scale_estimation``, MXFP4 only ``awq`` (``lowbit.weight_compression.apply``).
    - ``ignored_scope``: layer names or fnmatch wildcards (each must match a layer), or a callable
      ``name -> bool``; those layers stay float.

    - ``packed``: store the compressed Linear layers packed (``lowbit.compress.CompressedLinear``, float16
      scales); NF4, embedding, convolution and tied layers stay fake-quantized (lowbit QuantEmbedding /
      QuantLinear / QuantConv modules with calibrated weight quantizers), as every layer does with
      ``packed=False``.

    Everything is validated before the model changes. The summary of formats and sizes (computed
    storage: codes, fp16 scales and zero points) is logged at INFO; ``plan_compression(...).summary()``
    gives it without compressing. Returns the model (a new module only when ``model`` is itself a
    Linear that gets packed).
    """
    if not isinstance(packed, bool):
        raise TypeError(f"packed={packed!r}: expected True or False")
    items = materialize(dataset)
    options = check_options(mode, group_size, ratio, items is not None, sensitivity_metric, all_layers, awq,
                            scale_estimation, gptq, backup_mode)
    plan = plan_compression(model, options, items, ignored_scope)
    logger.info("weight compression plan:\n%s", plan.summary().table())
    compressed = apply_plan(model, plan, items, packed)
    report_coverage(compressed)
    return compressed
