"""NNCF-style weight compression: ``compress_weights(model, mode=CompressWeightsMode.INT4_ASYM, ratio=0.8)``.

Modules, in the order the work happens:
- ``modes``: the formats (CompressWeightsMode, BackupMode) as lowbit quantizer attributes, and their storage;
- ``layers``: which layers are compressed and which set the ratio (first/last layers);
- ``sensitivity``: NNCF's sensitivity metrics and ratio rule;
- ``plan``: validated options and the per-layer plan (no mutation);
- ``apply``: the plan carried out by ``lowbit.quantize`` / ``lowbit.calibrate``;
- ``summary``: the per-layer table and sizes.
"""

from lowbit.weight_compression.api import compress_weights
from lowbit.weight_compression.apply import apply_plan
from lowbit.weight_compression.modes import BackupMode, CompressWeightsMode, LayerFormat
from lowbit.weight_compression.plan import CompressionOptions, CompressionPlan, check_options, plan_compression
from lowbit.weight_compression.sensitivity import SensitivityMetric
from lowbit.weight_compression.summary import CompressionSummary

__all__ = [
    "BackupMode",
    "CompressWeightsMode",
    "CompressionOptions",
    "CompressionPlan",
    "CompressionSummary",
    "SensitivityMetric",
    "LayerFormat",
    "apply_plan",
    "check_options",
    "compress_weights",
    "plan_compression",
]
