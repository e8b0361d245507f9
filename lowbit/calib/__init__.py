"""Per-tensor calibrators: each collects the tensors a quantizer sees and proposes an amax.

max (``base``), percentile and entropy (``histogram``), MSE (``mse``), by name through ``make_calibrator``
(``calibrators``); per-channel activation ranges for the algorithms (``activation_ranges``). The algorithms
that walk a model (SmoothQuant, AWQ, GPTQ, ...) are in ``lowbit.algorithms``.
"""

from lowbit.calib.calibrators import (
    Calibrator,
    EntropyCalibrator,
    HistogramCalibrator,
    MaxCalibrator,
    MseCalibrator,
    PercentileCalibrator,
    make_calibrator,
)

__all__ = [
    "Calibrator",
    "EntropyCalibrator",
    "HistogramCalibrator",
    "MaxCalibrator",
    "MseCalibrator",
    "PercentileCalibrator",
    "make_calibrator",
]
