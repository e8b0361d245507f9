"""Write README.md's support matrix (family x preset x algorithm) from the matrix test's results.

Runs ``tests/structure/test_families.py`` with ``LOWBIT_MATRIX=full`` (every family x every preset, and
GPTQ) and ``LOWBIT_MATRIX_JSON`` pointing at a temporary file, so every cell is a test that passed or
failed; then replaces the text between the ``support-matrix`` markers in README.md with one table. A
cell is ``ok`` (ran, finite outputs, every quantizable weight converted, only the preset's rules left
float, AWQ / GPTQ at most max calibration's block error), ``n/a`` with the config error the cell gives
by design, or ``FAIL`` (the test failed: the README says so rather than hiding it).

Usage (from the repository root; ~5 minutes on 2 CPU cores):
    python tools/support_matrix.py            # runs the tests, rewrites the README section
    python tools/support_matrix.py --rows r.json   # renders rows a previous run wrote
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- support-matrix:start -->", "<!-- support-matrix:end -->"
NOT_APPLICABLE = {"has no repeated blocks": "n/a¹", "does not divide": "n/a²"}
LEGEND = ("¹ block-wise algorithm, model without repeated blocks; ² block format along a convolution's kernel "
          "width that the block size does not divide (a config error naming the weight, before the model is touched)")


def run_tests(rows_path: Path) -> int:
    """The full matrix under pytest; returns pytest's exit status (failures stay visible in the rows)."""
    env = {**os.environ, "LOWBIT_MATRIX": "full", "LOWBIT_MATRIX_JSON": str(rows_path),
           "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/structure/test_families.py"]
    return subprocess.run(command, cwd=REPO_ROOT, env=env).returncode


def cell(row: dict, failed: set[tuple[str, str, str]]) -> str:
    if (row["family"], row["preset"], row["algorithm"]) in failed:
        return "FAIL"
    if row["status"] == "ok":
        return "ok"
    return next((text for key, text in NOT_APPLICABLE.items() if key in row["error"]), "FAIL")


def render(rows: list[dict], failed: set[tuple[str, str, str]]) -> str:
    """Markdown: one row per family, one column per (preset, algorithm)."""
    columns = sorted({(row["preset"], row["algorithm"]) for row in rows})
    families = list(dict.fromkeys(row["family"] for row in rows))
    cells = {(row["family"], row["preset"], row["algorithm"]): cell(row, failed) for row in rows}
    header = "| family | " + " | ".join(f"{preset.removesuffix('_CFG')} ({algorithm})"
                                          for preset, algorithm in columns) + " |"
    lines = [header, "|" + " --- |" * (len(columns) + 1)]
    for family in families:
        lines.append(f"| {family} | " + " | ".join(cells.get((family, *column), "") for column in columns) + " |")
    return "\n".join(lines) + f"\n\n{LEGEND}"


def failed_cells(rows: list[dict], status: int) -> set[tuple[str, str, str]]:
    """Cells whose test failed: with a non-zero pytest status, those the test's expectations reject."""
    if status == 0:
        return set()
    sys.path.insert(0, str(REPO_ROOT))
    from tests.structure.test_families import check_row

    failed = set()
    for row in rows:
        try:
            check_row(row)
        except AssertionError:
            failed.add((row["family"], row["preset"], row["algorithm"]))
    return failed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=Path, help="render these rows instead of running the tests")
    parser.add_argument("--readme", type=Path, default=REPO_ROOT / "README.md")
    args = parser.parse_args()
    if args.rows is None:
        with tempfile.TemporaryDirectory() as folder:
            rows_path = Path(folder) / "rows.json"
            status = run_tests(rows_path)
            rows = json.loads(rows_path.read_text(encoding="utf-8"))
    else:
        rows, status = json.loads(args.rows.read_text(encoding="utf-8")), 1
    table = render(rows, failed_cells(rows, status))
    readme = args.readme.read_text(encoding="utf-8")
    if START not in readme or END not in readme:
        raise SystemExit(f"{args.readme}: the markers {START} and {END} are missing")
    before, rest = readme.split(START, 1)
    after = rest.split(END, 1)[1]
    args.readme.write_text(f"{before}{START}\n{table}\n{END}{after}", encoding="utf-8")
    print(table)


if __name__ == "__main__":
    main()
