"""ModelOpt parity: lowbit's export_hf_checkpoint against ModelOpt 0.47's on the same quantized model (CPU).

Both exporters get the same state: ModelOpt quantizes and calibrates the tiny model, runs its own pre-export
step (``requantize_resmooth_fused_llm_layers``: shared input scales, AWQ scales folded into the norms), and
its weights, amax and pre_quant_scales are copied into a lowbit-quantized copy of the model. Then the two
checkpoints must have the same tensor names, dtypes and shapes, the same config keys, and dequantized weights
(``code * weight_scale``, in float64) that agree to 1 ulp of the float32 scale (relative 2**-23 of each value).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

import lowbit
from lowbit.export import export_hf_checkpoint
from lowbit.export.layers import quantized_linears
from lowbit.export.modelopt_hf import unpack_int4_rows

from .tiny import tiny_llama, token_batches

mtq = pytest.importorskip("modelopt.torch.quantization")
pytestmark = pytest.mark.peer
CONFIGS = ["FP8_DEFAULT_CFG", "FP8_PER_CHANNEL_PER_TOKEN_CFG", "INT4_AWQ_CFG", "W4A8_AWQ_BETA_CFG",
           "INT8_SMOOTHQUANT_CFG"]
ULP = 2.0 ** -23


def forward_loop(model):
    for row in token_batches():
        model(row.unsqueeze(0))


def modelopt_quantized(base, name: str):
    from modelopt.torch.export.unified_export_hf import requantize_resmooth_fused_llm_layers

    model = mtq.quantize(copy.deepcopy(base), getattr(mtq, name), forward_loop)
    with torch.no_grad():
        requantize_resmooth_fused_llm_layers(model)
    return model


def _stages(quantizer):
    return list(quantizer) if isinstance(quantizer, torch.nn.Sequential) else [quantizer]


def lowbit_copy(base, name: str, reference):
    """lowbit's quantization of ``base`` with the preset of the same name, holding ``reference``'s state."""
    config = lowbit.get_preset(name)
    config["algorithm"] = "max"  # the quantizers only; the state is ModelOpt's
    model = lowbit.quantize(copy.deepcopy(base), config, forward_loop)
    weights = {k: v for k, v in reference.state_dict().items() if "quantizer" not in k}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected and all("quantizer" in key for key in missing)
    layers, _ = quantized_linears(model)
    for layer_name in layers:
        ours, theirs = model.get_submodule(layer_name), reference.get_submodule(layer_name)
        for mine, peer in zip(_stages(ours.weight_quantizer), _stages(theirs.weight_quantizer), strict=True):
            mine.set_amax(peer.amax.detach().float().reshape(mine.amax.shape))
        if ours.input_quantizer.is_enabled and not ours.input_quantizer.config.is_dynamic:
            ours.input_quantizer.set_amax(theirs.input_quantizer.amax.detach().float().reshape(()))
        scale = getattr(theirs.input_quantizer, "_pre_quant_scale", None)
        ours.input_quantizer.pre_quant_scale = None if scale is None else scale.detach().float().flatten()
    return model


def dequantized(tensors: dict[str, torch.Tensor], layer: str, algo: str) -> torch.Tensor:
    weight, scale = tensors[f"{layer}.weight"], tensors[f"{layer}.weight_scale"].double()
    if algo in ("W4A16_AWQ", "W4A8_AWQ"):
        codes = unpack_int4_rows(weight).double()
        return codes * scale.repeat_interleave(codes.shape[1] // scale.shape[1], dim=1)
    codes = weight.double()
    return codes * (scale.reshape(-1, 1) if scale.dim() else scale)


@pytest.mark.parametrize("name", CONFIGS)
def test_lowbit_export_matches_modelopt(tmp_path, name):
    from modelopt.torch.export import export_hf_checkpoint as modelopt_export

    base = tiny_llama()
    reference = modelopt_quantized(base, name)
    ours = lowbit_copy(base, name, reference)
    export_hf_checkpoint(ours, tmp_path / "lowbit")
    modelopt_export(reference, export_dir=tmp_path / "modelopt")
    theirs_t = load_file(str(tmp_path / "modelopt" / "model.safetensors"))
    ours_t = load_file(str(tmp_path / "lowbit" / "model.safetensors"))
    assert sorted(ours_t) == sorted(theirs_t)
    for key, tensor in theirs_t.items():
        assert (ours_t[key].dtype, ours_t[key].shape) == (tensor.dtype, tensor.shape), key
    configs = {side: json.loads((tmp_path / side / "hf_quant_config.json").read_text())["quantization"]
               for side in ("lowbit", "modelopt")}
    assert sorted(configs["lowbit"]) == sorted(configs["modelopt"])
    assert {k: v for k, v in configs["lowbit"].items() if k != "exclude_modules"} == \
        {k: v for k, v in configs["modelopt"].items() if k != "exclude_modules"}
    quantization = {side: json.loads((tmp_path / side / "config.json").read_text())["quantization_config"]
                    for side in ("lowbit", "modelopt")}
    assert sorted(quantization["lowbit"]) == sorted(quantization["modelopt"])
    algo = configs["modelopt"]["quant_algo"]
    for layer in {key.rsplit(".", 1)[0] for key in theirs_t if key.endswith(".weight_scale")}:
        expected, actual = dequantized(theirs_t, layer, algo), dequantized(ours_t, layer, algo)
        assert ((actual - expected).abs() <= ULP * expected.abs()).all(), layer
        for extra in ("input_scale", "weight_scale_2", "pre_quant_scale"):
            if f"{layer}.{extra}" in theirs_t:
                mine, peer = ours_t[f"{layer}.{extra}"].double(), theirs_t[f"{layer}.{extra}"].double()
                assert ((mine - peer).abs() <= ULP * peer.abs()).all(), f"{layer}.{extra}"
