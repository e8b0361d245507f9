"""Per-tensor calibrators: each collects the tensors a quantizer sees and proposes an amax.

max (``base``), percentile and entropy (``histogram``), MSE (``mse``), by name through ``make_calibrator``
(``calibrators``). The algorithms that walk a model (SmoothQuant, AWQ, GPTQ, ...) and the per-channel input
ranges they read from quantizers are in ``lowbit.algorithms``.
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
