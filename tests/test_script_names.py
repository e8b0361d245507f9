"""Scripts under bench/ and tools/ must not shadow an importable package.

`python bench/x.py` puts bench/ first on sys.path, so a script named like a package that a library imports
replaces it: transformers 5.25 imports `kernels` when one is importable and took `bench/kernels.py` instead.
"""

from __future__ import annotations

import importlib.metadata
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT_FOLDERS = ("bench", "tools")
# Optional packages that libraries probe by import whether or not they are installed here.
PROBED_ELSEWHERE = {"kernels", "gguf", "onnx", "onnxruntime", "triton", "accelerate", "datasets", "tokenizers",
                    "safetensors", "peft", "optimum", "bitsandbytes", "compressed_tensors", "torchao", "vllm",
                    "modelopt", "nncf", "evaluate", "llama_cpp", "hqq", "awq", "gptqmodel", "auto_gptq"}


def _transformers_probes() -> set[str]:
    """Package names transformers checks with `_is_package_available("name")`, read from its source."""
    import transformers.utils.import_utils as import_utils

    source = Path(import_utils.__file__).read_text()
    return {name.split(".")[0] for name in re.findall(r'_is_package_available\(\s*"([\w.]+)"', source)}


def _taken_names() -> set[str]:
    installed = set(importlib.metadata.packages_distributions())
    return installed | set(sys.stdlib_module_names) | PROBED_ELSEWHERE | _transformers_probes()


def _scripts() -> list[Path]:
    return sorted(path for folder in SCRIPT_FOLDERS for path in (ROOT / folder).glob("*.py"))


def test_the_name_lists_are_read():
    """The check below is only as good as its lists: they must hold the names that broke main."""
    taken = _taken_names()
    assert {"kernels", "torch", "json", "accelerate"} <= taken
    assert len(_transformers_probes()) > 20


@pytest.mark.parametrize("script", _scripts(), ids=lambda path: f"{path.parent.name}/{path.name}")
def test_script_does_not_shadow_a_package(script):
    assert script.stem not in _taken_names(), (
        f"{script.relative_to(ROOT)} is named like the importable package {script.stem!r}; running it puts its "
        f"folder first on sys.path and shadows that package. Rename the script.")
