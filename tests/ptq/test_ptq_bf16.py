"""``lowbit ptq --dtype bfloat16`` (what ``--dtype auto`` picks on CUDA for a bf16 checkpoint): the reload check
compares the export with the in-memory model in float32, before the model's own rounding to bf16 (2^-9 relative,
which alone put every qformat at ~1.6e-3, over ``WEIGHT_RTOL``, and made the run fail). W4A8's chained weight
quantizers are written dense in bf16, the weight the bf16 model computes with (its chain runs in float32 and
rounds once, ``SequentialQuantizer.forward``): that side compares after the same rounding, and must be equal.

Tolerance: ``WEIGHT_RTOL`` = 1e-5 relative (Frobenius) per layer. The float32 comparisons (int4_wo, fp8) differ
by the export's divisor scale, one float32 rounding (2^-24 ~ 6e-8). In bf16 one element one bf16 ulp off
(2^-8 of itself) moves a 256 x 256 layer by ~2^-8 / 256 ~ 1.5e-5 when the element is of typical size, so the
bound leaves no room for a bf16 ulp; W4A8 is asserted equal (0): its export and reload compute the chain from the
same stored numbers (``lowbit.formats.steps``; before, 209 exact E4M3 midpoints of the bundled q_proj rounded
differently in 70 elements: 5.9e-3)."""

import json

import pytest

from lowbit.ptq.reload import WEIGHT_RTOL
from lowbit.ptq.run import report_path

from .test_ptq_cli import SMALL, keep_the_allocator, run_cli  # noqa: F401 (keep_the_allocator: autouse fixture)


@pytest.mark.parametrize("qformat", [
    "int4_wo", "fp8",
    pytest.param("w4a8_awq", marks=pytest.mark.slow),
])
def test_bf16_run_reloads_within_tolerance(tmp_path, qformat):
    export_dir = tmp_path / "export"
    run_cli(["--model", "default", "--qformat", qformat, "--dtype", "bfloat16", "--tasks", "quant",
             "--export-path", str(export_dir), *SMALL])
    report = json.loads(report_path(export_dir).read_text())
    assert report["export"]["weights_difference"] <= WEIGHT_RTOL
    if qformat == "w4a8_awq":
        assert report["export"]["weights_difference"] == 0.0
    assert report["export"]["amax_difference"] <= 1e-6
