"""lowbit.export: layouts against references written here, round trips, errors and the registry.

Tolerances: the round trip rebuilds divisor scales as reciprocals (one float32 rounding per scale), so
logits agree to 1e-5 relative; W8A8 INT8 to 1e-3, because the reloaded CompressedLinear runs a true int8
matmul (``int8_matmul``) where the fake-quantized model computes in float32 (measured 2.4e-4). Layouts are
compared exactly against float64 / integer references.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from lowbit.compress import CompressedLinear
from lowbit.export import export, export_formats, get_exporter, register_exporter, unregister_exporter
from lowbit.export.compressed_tensors import pack_int32, unpack_int32
from lowbit.export.load import load_quantized
from lowbit.export.modelopt_hf import unpack_int4_rows

from .tiny import preset, quantized, tiny_llama, token_batches

ROUND_TRIP_RTOL = {"float": 1e-5, "int8 matmul": 1e-3}
BLOCK_FP8_WEIGHT = {"num_bits": (4, 3), "block_sizes": {-1: 128, -2: 128}}  # loads as dense quantized linears
BLOCK_FP8 = {"*weight_quantizer": BLOCK_FP8_WEIGHT, "*input_quantizer": {"enable": False}}
SIGNED_INT4 = {"*weight_quantizer": {"num_bits": 4, "block_sizes": {-1: 128}, "signed_scale": True}}  # NNCF's grid
CASES = [  # (config, export format)
    (lambda: preset("FP8_DEFAULT_CFG"), "hf"),
    (lambda: preset("FP8_PER_CHANNEL_PER_TOKEN_CFG"), "compressed-tensors"),
    (lambda: preset("INT4_BLOCKWISE_WEIGHT_ONLY_CFG"), "compressed-tensors"),
    (lambda: preset("INT4_BLOCKWISE_WEIGHT_ONLY_CFG"), "hf"),
    (lambda: preset("INT8_SMOOTHQUANT_CFG"), "hf"),
    (lambda: preset("W4A16_NVFP4_CFG"), "compressed-tensors"),
    (lambda: preset("FP8_DEFAULT_CFG", **BLOCK_FP8), "hf"),
    (lambda: preset("MXFP8_DEFAULT_CFG"), "hf"),
    (lambda: preset("NVFP4_DEFAULT_CFG"), "hf"),
    (lambda: {**preset("W4A8_AWQ_BETA_CFG"), "algorithm": "max"}, "hf"),
    (lambda: preset("INT4_BLOCKWISE_WEIGHT_ONLY_CFG", **SIGNED_INT4), "hf"),
    (lambda: preset("INT4_BLOCKWISE_WEIGHT_ONLY_CFG", **SIGNED_INT4), "compressed-tensors"),
]


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


def test_int4_rows_match_a_bytewise_reference():
    codes = torch.randint(-8, 8, (6, 5), generator=torch.Generator().manual_seed(0))
    packed = torch.zeros(3, 5, dtype=torch.uint8)
    for i in range(3):
        for k in range(5):
            low, high = int(codes[2 * i, k]) % 16, int(codes[2 * i + 1, k]) % 16
            packed[i, k] = low + 16 * high
    assert torch.equal(unpack_int4_rows(packed), codes.to(torch.int8))


@pytest.mark.parametrize("bits", [4, 8, 3])
def test_int32_packing_matches_a_bit_string_reference(bits):
    codes = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (3, 40), generator=torch.Generator().manual_seed(bits))
    packed = pack_int32(codes, bits)
    for row in range(3):
        stream = "".join(format(int(c) + (1 << (bits - 1)), f"0{bits}b")[::-1] for c in codes[row])  # LSB first
        stream += "0" * (32 * packed.shape[1] - len(stream))
        words = [int(stream[32 * w:32 * w + 32][::-1], 2) for w in range(packed.shape[1])]
        assert [int(v) % (1 << 32) for v in packed[row]] == words
    assert torch.equal(unpack_int32(packed, bits, 40), codes.to(torch.int8))


@pytest.mark.parametrize("case", range(len(CASES)))
def test_round_trip_equals_the_in_memory_model(model, tmp_path, case):
    make_config, target = CASES[case]
    quant = quantized(model, make_config())
    ids = token_batches(seed=7)
    directory = export(quant, tmp_path / "out", target)
    reloaded = load_quantized(directory)
    with torch.no_grad():
        expected, actual = quant(ids).logits, reloaded(ids).logits
    assert torch.isfinite(actual).all()
    tolerance = ROUND_TRIP_RTOL["int8 matmul" if "smoothquant" in str(make_config()["algorithm"]) else "float"]
    assert ((actual - expected).norm() / expected.norm()).item() <= tolerance
    compressed = [m for m in reloaded.modules() if isinstance(m, CompressedLinear)]
    weight_config = make_config()["quant_cfg"]["*weight_quantizer"]
    dense = weight_config == BLOCK_FP8_WEIGHT or isinstance(weight_config, list)  # 2-D blocks, W4A8's two stages
    assert len(compressed) == (0 if dense else 7)


def test_tied_embeddings_are_written_once_and_reload(tmp_path):
    quant = quantized(tiny_llama(tie_word_embeddings=True), preset("FP8_DEFAULT_CFG"))
    directory = export(quant, tmp_path / "tied", "hf")
    assert "lm_head.weight" not in load_file(str(directory / "model.safetensors"))
    ids = token_batches(seed=7)
    with torch.no_grad():
        assert torch.equal(load_quantized(directory)(ids).logits, quant(ids).logits)


def test_fp8_layout_is_the_codes_and_divisor_scales(model, tmp_path):
    quant = quantized(model, preset("FP8_DEFAULT_CFG"))
    directory = export(quant, tmp_path / "fp8", "hf")
    tensors = load_file(str(directory / "model.safetensors"))
    layer = quant.model.layers[0].self_attn.q_proj
    amax = layer.weight_quantizer.amax.double()
    scale = tensors["model.layers.0.self_attn.q_proj.weight_scale"]
    assert scale.dtype == torch.float32 and scale.shape == ()
    assert abs(scale.double() - amax / 448).item() <= 2 ** -23 * scale.item()
    dequantized = tensors["model.layers.0.self_attn.q_proj.weight"].double() * scale.double()
    reference = layer.weight_quantizer(layer.weight).double()
    assert torch.allclose(dequantized, reference, rtol=2 ** -22, atol=0)
    config = json.loads((directory / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "modelopt" and config["quant_algo"] == "FP8"
    assert config["ignore"] == ["lm_head"]
    input_scale = tensors["model.layers.0.self_attn.q_proj.input_scale"].double()
    assert abs(input_scale - layer.input_quantizer.amax.double() / 448).item() <= 2 ** -23 * input_scale.item()


def test_mixed_precision_lists_each_layer(model, tmp_path):
    int4_mlp = {"*mlp*weight_quantizer": {"num_bits": 4, "block_sizes": {-1: 128}},
                "*mlp*input_quantizer": {"enable": False}}
    config = preset("FP8_PER_CHANNEL_PER_TOKEN_CFG", **int4_mlp)
    directory = export(quantized(model, config), tmp_path / "mixed", "hf")
    details = json.loads((directory / "hf_quant_config.json").read_text())["quantization"]
    assert details["quant_algo"] == "MIXED_PRECISION"
    layers = details["quantized_layers"]
    assert layers["model.layers.0.self_attn.q_proj"] == {"quant_algo": "FP8_PER_CHANNEL_PER_TOKEN"}
    assert layers["model.layers.0.mlp.up_proj"]["quant_algo"] == "W4A16_AWQ"
    assert layers["model.layers.0.mlp.up_proj"]["group_size"] == 128


def test_inexpressible_format_names_layer_and_format_before_writing(model, tmp_path):
    quant = quantized(model, preset("INT8_DEFAULT_CFG", **{"*weight_quantizer": {"num_bits": 8, "axis": 0,
                                                                                  "asymmetric": True}}))
    for target in ("hf", "compressed-tensors"):
        with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj.*int8-asym"):
            export(quant, tmp_path / target, target)
        assert not (tmp_path / target).exists()
    w4a8 = quantized(model, preset("W4A8_AWQ_BETA_CFG"))
    with pytest.raises(ValueError, match="q_proj: a two-stage weight quantizer"):
        export(w4a8, tmp_path / "ct", "compressed-tensors")


def test_refuses_a_foreign_directory_and_copies_tokenizer_files(model, tmp_path):
    from transformers import AutoTokenizer

    from lowbit.assets import default_model_path

    quant = quantized(model, preset("FP8_DEFAULT_CFG"))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export(quant, foreign, "hf")
    assert (foreign / "notes.txt").read_text() == "mine"
    tokenizer = AutoTokenizer.from_pretrained(default_model_path(), local_files_only=True)
    loaded_side = tokenizer.padding_side
    tokenizer.padding_side = "left" if loaded_side == "right" else "right"  # as calibration code does
    export(quant, foreign, "hf", tokenizer=tokenizer, overwrite=True)
    assert not (foreign / "notes.txt").exists()
    saved = json.loads((foreign / "tokenizer_config.json").read_text())
    assert saved.get("padding_side", "right") == loaded_side
    assert tokenizer.padding_side != loaded_side  # the caller's object is left as it was
    assert (foreign / "generation_config.json").is_file()


def test_registry_dispatches_and_names_the_allowed_formats(model, tmp_path):
    assert {"hf", "compressed-tensors"} <= set(export_formats())
    with pytest.raises(ValueError, match=r"export format 'onnx-typo': allowed are \["):
        get_exporter("onnx-typo")
    written = []

    def toy(model, export_dir, **options):
        written.append((export_dir, options))
        return export_dir

    register_exporter("toy", toy)
    try:
        with pytest.raises(ValueError, match="already registered"):
            register_exporter("toy", toy)
        assert export(model, tmp_path / "t", "toy", overwrite=True) == tmp_path / "t"
        assert written == [(tmp_path / "t", {"overwrite": True})]
    finally:
        unregister_exporter("toy")
    assert "toy" not in export_formats()


def test_kv_cache_scales_are_amax_over_448(model, tmp_path):
    config = preset("FP8_DEFAULT_CFG", **{"*[kv]_bmm_quantizer": {"num_bits": (4, 3), "axis": None}})
    quant = quantized(model, config)
    attention = quant.model.layers[0].self_attn
    k_amax, v_amax = attention.k_bmm_quantizer.amax.double(), attention.v_bmm_quantizer.amax.double()
    hf = load_file(str(export(quant, tmp_path / "hf", "hf") / "model.safetensors"))
    details = json.loads((tmp_path / "hf" / "hf_quant_config.json").read_text())["quantization"]
    assert details["kv_cache_quant_algo"] == "FP8"
    ct = load_file(str(export(quant, tmp_path / "ct", "compressed-tensors") / "model.safetensors"))
    prefix = "model.layers.0.self_attn."
    for tensors, k_key, v_key in ((hf, "k_proj.k_scale", "v_proj.v_scale"), (ct, "k_scale", "v_scale")):
        for key, amax in ((k_key, k_amax), (v_key, v_amax)):
            assert abs(tensors[prefix + key].double().item() - (amax / 448).item()) <= 2 ** -23 * (amax / 448).item()
    for directory in ("hf", "ct"):  # load_quantized restores the k/v quantizers: amax = 448 * scale
        reloaded = load_quantized(tmp_path / directory).model.layers[0].self_attn
        for quantizer, amax in ((reloaded.k_bmm_quantizer, k_amax), (reloaded.v_bmm_quantizer, v_amax)):
            assert quantizer.config.num_bits == (4, 3) and quantizer.is_enabled
            assert abs(quantizer.amax.double().item() - amax.item()) <= 2 ** -22 * amax.item()


@pytest.mark.parametrize("target", ["hf", "compressed-tensors"])
def test_signed_scales_are_written_signed(model, tmp_path, target):
    """A signed-scale INT4 weight (compress_weights' INT4_SYM grid) keeps its negative scales in the checkpoint:
    codes times weight_scale is the fake-quantized weight (float64 product, float32 rounding)."""
    quant = quantized(model, preset("INT4_BLOCKWISE_WEIGHT_ONLY_CFG", **SIGNED_INT4))
    directory = export(quant, tmp_path / "signed", target)
    scales = load_file(str(directory / "model.safetensors"))["model.layers.0.mlp.down_proj.weight_scale"]
    assert (scales < 0).any() and (scales > 0).any()
    reloaded = load_quantized(directory).model.layers[0].mlp.down_proj
    expected = quant.model.layers[0].mlp.down_proj.weight_quantizer(quant.model.layers[0].mlp.down_proj.weight)
    torch.testing.assert_close(reloaded.dequantized_weight(torch.float32), expected.float(), rtol=1e-6, atol=1e-7)
