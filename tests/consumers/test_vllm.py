"""vLLM (CPU build) loads and generates from lowbit's exports of the bundled model and computes its model.

Runs ``bench/export_vllm.py`` (its docstring has the protocol) in a subprocess and checks every case:
8 tokens generated, and vLLM's 128 prompt log-probabilities within 0.05 nats mean absolute of lowbit's
quantized model and closer to it than to the float model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")
pytestmark = [pytest.mark.consumer, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


def test_vllm_loads_generates_and_agrees(tmp_path):
    out = tmp_path / "rows.json"
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, str(ROOT / "bench" / "export_vllm.py"), "--json", str(out)], check=True,
                   env=environment, timeout=1800)
    rows = json.loads(out.read_text())["rows"]
    failures = [row for row in rows if row.get("error") or row["generated"] != 8 or not row["holds"]]
    assert not failures, json.dumps(failures, indent=1)
