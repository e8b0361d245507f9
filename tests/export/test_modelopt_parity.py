"""ModelOpt parity: lowbit's export_hf_checkpoint against ModelOpt 0.47's on the same quantized model (CPU).

Both exporters get the same state: ModelOpt quantizes and calibrates the tiny model, runs its own pre-export
step (``requantize_resmooth_fused_llm_layers``: shared input scales, AWQ scales folded into the norms), and
its weights, amax and pre_quant_scales are copied into a lowbit-quantized copy of the model. Then the two
checkpoints must have the same tensor names, dtypes and shapes, the same config keys, and dequantized weights
(``code * weight_scale``, in float64) that agree to 1 ulp of the float32 scale (relative 2**-23 of each value).
NVFP4 (ModelOpt's NVFP4 fake quant needs CUDA, so that case runs on a GPU machine only) keeps its FP8 E4M3 block
scales: the dequantized weights ``e2m1[code] * weight_scale * weight_scale_2`` must agree to 1 ulp of E4M3
(relative 2**-3), and the share of bit-identical blocks is reported.
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
E4M3_ULP = 2.0 ** -3
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)  # OCP MX v1.0, table 5


def forward_loop(model):
    device = next(model.parameters()).device
    for row in token_batches():
        model(row.unsqueeze(0).to(device))


def modelopt_quantized(base, name: str, algorithm: str | None = None):
    """ModelOpt's quantization of ``base`` with its preset ``name`` (its calibration ``algorithm`` when given)."""
    from modelopt.torch.export.unified_export_hf import requantize_resmooth_fused_llm_layers

    config = getattr(mtq, name) if algorithm is None else {**getattr(mtq, name), "algorithm": algorithm}
    model = mtq.quantize(copy.deepcopy(base), config, forward_loop)
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


def e2m1_values(packed: torch.Tensor) -> torch.Tensor:
    """FP4 E2M1 codes two per byte (element 2j in the low nibble) to their float64 values."""
    nibbles = torch.stack([packed & 0x0F, packed >> 4], dim=-1).flatten(-2).long()
    magnitude = E2M1[nibbles & 0x7]
    return torch.where(nibbles >= 8, -magnitude, magnitude)


def dequantized(tensors: dict[str, torch.Tensor], layer: str, algo: str) -> torch.Tensor:
    weight, scale = tensors[f"{layer}.weight"], tensors[f"{layer}.weight_scale"].double()
    if algo == "NVFP4":
        values = e2m1_values(weight)
        block_scale = scale.repeat_interleave(values.shape[1] // scale.shape[1], dim=1)
        return values * block_scale * tensors[f"{layer}.weight_scale_2"].double()
    if algo in ("W4A16_AWQ", "W4A8_AWQ"):
        codes = unpack_int4_rows(weight).double()
        return codes * scale.repeat_interleave(codes.shape[1] // scale.shape[1], dim=1)
    codes = weight.double()
    return codes * (scale.reshape(-1, 1) if scale.dim() else scale)


def exports_of_both(tmp_path, name: str, device: str = "cpu"):
    """(ModelOpt's tensors, lowbit's tensors, ModelOpt's quant_algo) after checking names, dtypes, shapes, keys."""
    from modelopt.torch.export import export_hf_checkpoint as modelopt_export

    base = tiny_llama().to(device)
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
    return theirs_t, ours_t, configs["modelopt"]["quant_algo"]


def quantized_layers(tensors: dict[str, torch.Tensor]) -> set[str]:
    return {key.rsplit(".", 1)[0] for key in tensors if key.endswith(".weight_scale")}


@pytest.mark.parametrize("name", CONFIGS)
def test_lowbit_export_matches_modelopt(tmp_path, name):
    theirs_t, ours_t, algo = exports_of_both(tmp_path, name)
    for layer in quantized_layers(theirs_t):
        expected, actual = dequantized(theirs_t, layer, algo), dequantized(ours_t, layer, algo)
        assert ((actual - expected).abs() <= ULP * expected.abs()).all(), layer
        for extra in ("input_scale", "weight_scale_2", "pre_quant_scale"):
            if f"{layer}.{extra}" in theirs_t:
                mine, peer = ours_t[f"{layer}.{extra}"].double(), theirs_t[f"{layer}.{extra}"].double()
                assert ((mine - peer).abs() <= ULP * peer.abs()).all(), f"{layer}.{extra}"


def test_lowbit_nvfp4_export_matches_modelopt_on_cuda(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("ModelOpt's NVFP4 fake quantization needs CUDA")
    theirs_t, ours_t, algo = exports_of_both(tmp_path, "NVFP4_DEFAULT_CFG", device="cuda")
    assert algo == "NVFP4"
    identical_blocks = total_blocks = 0
    for layer in quantized_layers(theirs_t):
        mine, peer = ours_t[f"{layer}.weight_scale"].double(), theirs_t[f"{layer}.weight_scale"].double()
        identical_blocks += int((mine == peer).sum())
        total_blocks += peer.numel()
        expected, actual = dequantized(theirs_t, layer, algo), dequantized(ours_t, layer, algo)
        worst = float(((actual - expected).abs() / expected.abs().clamp_min(1e-30)).max())
        assert ((actual - expected).abs() <= E4M3_ULP * expected.abs()).all(), f"{layer}: worst relative {worst:.3g}"
        for extra in ("input_scale", "weight_scale_2"):
            mine, peer = ours_t[f"{layer}.{extra}"].double(), theirs_t[f"{layer}.{extra}"].double()
            assert ((mine - peer).abs() <= ULP * peer.abs()).all(), f"{layer}.{extra}"
    print(f"NVFP4 parity: {identical_blocks} of {total_blocks} E4M3 block scales bit-identical")
