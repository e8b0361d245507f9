"""The estimate ``lowbit ptq`` prints before a run against the peak it measures in a real one (a fresh process, as
a user runs it): within 25 %. Host peak = the rise of VmHWM over the resident set at the start, from
/proc/self/status (lowbit.ptq.memory)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lowbit.ptq.run import report_path

TOLERANCE = 0.25


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="the exact peak needs Linux /proc")
def test_measured_peak_host_memory_is_within_25_percent_of_the_estimate(tmp_path):
    export_dir = tmp_path / "export"
    command = [sys.executable, "-m", "lowbit", "ptq", "--model", "default", "--qformat", "fp8",
               "--kv-cache-qformat", "fp8", "--calib-size", "8", "--seq-len", "64", "--eval-tokens", "1024",
               "--export-path", str(export_dir), "--no-progress"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(report_path(export_dir).read_text())
    measured, estimated = report["measured"], report["plan"]["estimates"]
    assert measured["host_method"].startswith("VmHWM")
    ratio = measured["host_peak_bytes"] / estimated["host_peak_bytes"]
    assert abs(ratio - 1) <= TOLERANCE, (ratio, measured, estimated)
    assert f"{measured['host_peak_bytes'] / 1e6:.1f} MB measured" in result.stdout
