"""lowbit: post-training quantization and weight compression for PyTorch models.

    import lowbit
    model = lowbit.quantize(model, lowbit.INT4_AWQ_CFG, forward_loop)   # fake-quantized, calibrated
    lowbit.print_quant_summary(model)
"""

from lowbit import assets, data, distributed, eval
from lowbit.algorithms import register_algorithm, unregister_algorithm
from lowbit.attributes import QuantizerAttributeConfig
from lowbit.calibration import iter_quantizers
from lowbit.checkpoint import restore, save
from lowbit.compress import LowbitConfig, compress, init_quantized_weights, load_compressed, save_compressed
from lowbit.config import QuantizeConfig, QuantizeRule, parse_config
from lowbit.convert import (
    calibrate,
    disable_quantizer,
    enable_quantizer,
    fold_weight,
    print_quant_summary,
    quant_summary,
    quantize,
)
from lowbit.eval import model_size
from lowbit.export import (
    export,
    export_compressed_tensors,
    export_hf_checkpoint,
    load_quantized,
    register_exporter,
    unregister_exporter,
)
from lowbit.formats import register_codebook
from lowbit.modules import register, unregister
from lowbit.presets import (
    FP8_DEFAULT_CFG,
    FP8_KV_CFG,
    FP8_PER_CHANNEL_PER_TOKEN_CFG,
    INT4_AWQ_CFG,
    INT4_BLOCKWISE_WEIGHT_ONLY_CFG,
    INT8_DEFAULT_CFG,
    INT8_SMOOTHQUANT_CFG,
    INT8_WEIGHT_ONLY_CFG,
    MXFP4_DEFAULT_CFG,
    MXFP8_DEFAULT_CFG,
    NVFP4_AWQ_LITE_CFG,
    NVFP4_DEFAULT_CFG,
    PRESETS,
    W4A8_AWQ_BETA_CFG,
    W4A16_NVFP4_CFG,
    get_preset,
)
from lowbit.ptq.plan import plan
from lowbit.quantizer import SequentialQuantizer, TensorQuantizer
from lowbit.scale import LayerwiseResult, quantize_layerwise
from lowbit.search import SearchState, apply_search_state, auto_quantize
from lowbit.version import __version__  # noqa: F401  (the package version)
from lowbit.weight_compression import BackupMode, CompressWeightsMode, SensitivityMetric, compress_weights

__all__ = [
    "BackupMode", "CompressWeightsMode", "FP8_DEFAULT_CFG", "FP8_KV_CFG", "FP8_PER_CHANNEL_PER_TOKEN_CFG",
    "INT4_AWQ_CFG", "INT4_BLOCKWISE_WEIGHT_ONLY_CFG", "INT8_DEFAULT_CFG", "INT8_SMOOTHQUANT_CFG",
    "INT8_WEIGHT_ONLY_CFG", "LayerwiseResult", "LowbitConfig", "MXFP4_DEFAULT_CFG", "MXFP8_DEFAULT_CFG",
    "NVFP4_AWQ_LITE_CFG",
    "NVFP4_DEFAULT_CFG",
    "PRESETS", "QuantizeConfig", "QuantizeRule", "QuantizerAttributeConfig", "SensitivityMetric",
    "SearchState", "SequentialQuantizer", "TensorQuantizer", "W4A16_NVFP4_CFG", "W4A8_AWQ_BETA_CFG",
    "apply_search_state", "assets", "auto_quantize", "calibrate",
    "compress", "compress_weights", "data", "disable_quantizer", "distributed", "enable_quantizer", "eval", "export",
    "export_compressed_tensors", "export_hf_checkpoint", "fold_weight", "get_preset", "init_quantized_weights",
    "iter_quantizers", "load_compressed", "load_quantized", "model_size", "parse_config",
    "plan", "print_quant_summary", "quant_summary", "quantize", "quantize_layerwise", "register",
    "register_algorithm", "register_codebook", "register_exporter", "restore", "save", "save_compressed",
    "unregister", "unregister_algorithm", "unregister_exporter",
]
