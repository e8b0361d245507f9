"""The support matrix in CI: tiny seeded models of every family x presets x max / AWQ / GPTQ / SmoothQuant.

Each cell (``tests.structure.matrix.run_case``) must finish with finite outputs, every quantizable
weight converted, exactly the weights the preset's rules name (lm_head, routers) left float, and for
AWQ and GPTQ every block's output MSE at most max calibration's with the same format (float64, on the
same calibration batches; measured over the full matrix: AWQ at most 0.90x, GPTQ at most 0.30x of it).
Where a family cannot take a cell the config error says so before the model is touched: block-wise
algorithms on a model without repeated blocks (the CNN), block formats on convolutions whose kernel
dims the block does not divide (the CNN, ViT's patch embedding).

``LOWBIT_MATRIX=full`` runs every family x every preset (``tools/support_matrix.py`` does, to write
the README's support matrix from the rows this test collects into ``LOWBIT_MATRIX_JSON``).
"""

from __future__ import annotations

import json
import os

import pytest

from lowbit.presets import PRESETS
from tests.structure.families import FAMILIES
from tests.structure.matrix import all_cases, ci_cases, expected_float, run_case

CONV_FAMILIES = ("vit", "cnn")
ROWS: list[dict] = []
CASES = all_cases() if os.environ.get("LOWBIT_MATRIX") == "full" else ci_cases()


@pytest.fixture(scope="module", autouse=True)
def write_rows():
    yield
    path = os.environ.get("LOWBIT_MATRIX_JSON")
    if path:
        with open(path, "w", encoding="utf-8") as file:
            json.dump(ROWS, file, indent=1)


def expected_error(family: str, preset: str, algorithm: str) -> str | None:
    """The config error a cell must give, or None when it must run."""
    weight_config = PRESETS[preset]["quant_cfg"].get("*weight_quantizer", {})
    stages = weight_config if isinstance(weight_config, list) else [weight_config]
    if family in CONV_FAMILIES and (algorithm == "gptq" or any("block_sizes" in stage for stage in stages)):
        return "does not divide"  # checked first: the weight shapes, then the algorithm
    if not FAMILIES[family].blocks and algorithm in ("awq", "gptq", "smoothquant"):
        return "has no repeated blocks"
    return None


@pytest.mark.slow
@pytest.mark.parametrize(("family", "preset", "algorithm"), CASES, ids=["-".join(case) for case in CASES])
def test_family_preset_algorithm(family, preset, algorithm):
    row = run_case(family, preset, algorithm)
    ROWS.append(row)
    check_row(row)


def check_row(row: dict) -> None:
    """The module docstring's expectations for one cell (AssertionError naming what failed)."""
    family, preset, algorithm = row["family"], row["preset"], row["algorithm"]
    error = expected_error(family, preset, algorithm)
    if error is not None:
        assert row["status"] == "error" and error in row["error"], row
        assert not row["quantized"], "the config error must come before the model is touched"
        return
    assert row["status"] == "ok", row.get("error")
    assert row["finite"]
    assert row["unconverted"] == [], f"quantizable modules left without quantizers: {row['unconverted']}"
    if preset != "FP8_KV_CFG":  # the KV preset quantizes no weight
        assert row["float_weights"] == expected_float(family, preset, row["weights"])
    for name, mse_max, mse_after in row.get("blocks", []):
        assert mse_after <= mse_max, f"{name}: output MSE {mse_after:.4g} after, {mse_max:.4g} with max"
