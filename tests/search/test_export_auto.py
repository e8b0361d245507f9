"""An auto-quantized model exports as ModelOpt's MIXED_PRECISION checkpoint: each layer's quant_algo is the
format the search chose for it, float layers are absent, and the export loads back to the same logits."""

import json

import torch

from lowbit.export import export_hf_checkpoint, load_quantized
from lowbit.search.candidates import NONE

ALGOS = {"NVFP4_DEFAULT_CFG": "NVFP4", "FP8_DEFAULT_CFG": "FP8"}


def test_mixed_precision_export_writes_the_searched_formats(searched, batches, tmp_path):
    model, state = searched
    assert {g.choice for g in state.groups} >= {"NVFP4_DEFAULT_CFG", "FP8_DEFAULT_CFG"}  # a mixed result
    directory = export_hf_checkpoint(model, tmp_path / "hf")
    details = json.loads((directory / "hf_quant_config.json").read_text())["quantization"]
    assert details["quant_algo"] == "MIXED_PRECISION"
    expected = {name: ALGOS[choice] for name, choice in state.assignment.items() if choice != NONE}
    assert {name: fields["quant_algo"] for name, fields in details["quantized_layers"].items()} == expected
    reloaded = load_quantized(directory)
    with torch.no_grad():
        expected_logits = model(batches[0]).logits
        actual = reloaded(batches[0]).logits
    assert ((actual - expected_logits).norm() / expected_logits.norm()).item() < 1e-2
