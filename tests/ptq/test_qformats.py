"""The qformat table: each qformat is its preset, and EXPORTS / KV_EXPORTS say exactly which exporters can write
it (checked by running every exporter on a tiny quantized Llama, in both directions: a listed export succeeds,
an unlisted one raises naming the layer or the format, before writing). The ``lowbit`` checkpoint every
qformat lists is written and reloaded by test_ptq_cli.py (mxfp4's only export)."""

import pytest

from lowbit.export import export
from lowbit.presets import get_preset
from lowbit.ptq.qformats import EXPORTS, KV_EXPORTS, QFORMATS, check_export, ptq_config
from tests.export.tiny import quantized, tiny_llama


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture(scope="module")
def quantized_models(model):
    """{qformat: the tiny Llama quantized in it}, filled on first use."""
    cache = {}

    def get(qformat):
        if qformat not in cache:
            cache[qformat] = quantized(model, ptq_config(qformat))
        return cache[qformat]

    return get


def _writes(model, target: str, path) -> bool:
    try:
        export(model, path, target)
    except ValueError:
        assert not path.exists()
        return False
    return True


@pytest.mark.parametrize("target", ["hf", "compressed-tensors"])
@pytest.mark.parametrize("qformat", list(QFORMATS))
def test_exports_table_matches_the_exporters(tmp_path, quantized_models, qformat, target):
    assert _writes(quantized_models(qformat), target, tmp_path / target) == (target in EXPORTS[qformat])


@pytest.mark.parametrize("kv", ["fp8", "nvfp4"])
def test_kv_exports_table_matches_the_exporters(tmp_path, model, kv):
    quantized_model = quantized(model, ptq_config("fp8", kv))
    for target in ("hf", "compressed-tensors"):
        assert _writes(quantized_model, target, tmp_path / target) == (target in KV_EXPORTS[kv]), target


def test_qformats_are_their_presets():
    assert ptq_config("int4_awq") == get_preset("INT4_AWQ_CFG")
    gptq = ptq_config("int4_gptq")
    assert gptq["algorithm"] == "gptq"
    assert gptq["quant_cfg"] == get_preset("INT4_BLOCKWISE_WEIGHT_ONLY_CFG")["quant_cfg"]
    kv = ptq_config("nvfp4", "fp8")["quant_cfg"]["*[kv]_bmm_quantizer"]
    assert kv["num_bits"] == (4, 3) and kv["axis"] is None


def test_check_export_names_what_is_allowed():
    with pytest.raises(ValueError, match="allowed for it are lowbit"):
        check_export("mxfp4", "none", "hf")
    with pytest.raises(ValueError, match="nvfp4 KV cache"):
        check_export("fp8", "nvfp4", "compressed-tensors")
    check_export("fp8", "fp8", "compressed-tensors")
