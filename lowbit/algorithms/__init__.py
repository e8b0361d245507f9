"""Calibration algorithms over whole models, one file each: SmoothQuant, AWQ, GPTQ, scale estimation.

``registry`` maps an algorithm's name to its function and default options (``run_algorithm``,
``register_algorithm``); the algorithms share ``layerwise`` (the layer-by-layer runner), ``scaling`` (folding an
input scale into the layer before), ``weights`` (weight-quantizer helpers) and ``activation_ranges`` (per-channel
input ranges). They build on ``lowbit.calibration`` (a calibration pass, max calibration) and on the per-tensor
calibrators of ``lowbit.calib``.
"""

from lowbit.algorithms.registry import register_algorithm, run_algorithm, unregister_algorithm

__all__ = ["register_algorithm", "run_algorithm", "unregister_algorithm"]
