"""Calibration: calibrators that propose an amax from collected tensors, and algorithms over models.

Only the calibrators are imported here; the model-level algorithms live in ``lowbit.calib.algorithms``
(imported by ``lowbit.convert``) so that the quantizer can import this package without a cycle.
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
