"""``lowbit ptq --dtype bfloat16`` (what ``--dtype auto`` picks on CUDA for a bf16 checkpoint): the reload check
compares the export with the in-memory model in float32, before the model's own rounding to bf16 (2^-9 relative,
which alone put every qformat at ~1.6e-3, over ``WEIGHT_RTOL``, and made the run fail). W4A8's chained weight
quantizers are written dense in bf16, the weight the bf16 model computes with (its chain runs in float32 and
rounds once, ``SequentialQuantizer.forward``): that side compares after the same rounding."""

import json

import pytest

from lowbit.ptq.reload import WEIGHT_RTOL
from lowbit.ptq.run import report_path

from .test_ptq_cli import SMALL, keep_the_allocator, run_cli  # noqa: F401 (keep_the_allocator: autouse fixture)


@pytest.mark.parametrize("qformat", [
    "int4_wo", "fp8",
    pytest.param("w4a8_awq", marks=[pytest.mark.slow, pytest.mark.xfail(
        strict=True, raises=RuntimeError,
        reason="W4A8 through lowbit ptq in bf16: the export's weights are 5.9e-3 from the model's (quantize() then "
               "export alone: equal; the ptq path's difference is not found yet)")]),
])
def test_bf16_run_reloads_within_tolerance(tmp_path, qformat):
    export_dir = tmp_path / "export"
    run_cli(["--model", "default", "--qformat", qformat, "--dtype", "bfloat16", "--tasks", "quant",
             "--export-path", str(export_dir), *SMALL])
    report = json.loads(report_path(export_dir).read_text())
    assert report["export"]["weights_difference"] <= WEIGHT_RTOL
    assert report["export"]["amax_difference"] <= 1e-6
