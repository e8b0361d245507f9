"""Quantization beyond memory: ``quantize_layerwise`` reads, calibrates, packs and writes one decoder block at a
time (``runner``), from a model built on the meta device (``shards``), with the activations between blocks in
host memory up to a budget and on disk beyond it (``activations``), the output joined part by part
(``output``). Distributed calibration: ``lowbit.distributed``."""

from lowbit.scale.runner import LayerwiseResult, quantize_layerwise

__all__ = ["LayerwiseResult", "quantize_layerwise"]
