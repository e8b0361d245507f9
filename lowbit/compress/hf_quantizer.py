"""Pack while transformers loads, through its public quantizer integration.

    config = LowbitConfig(lowbit.INT4_BLOCKWISE_WEIGHT_ONLY_CFG)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, quantization_config=config)
    # the quantized nn.Linear layers (and fused experts) are CompressedLinear (compressed experts) now

transformers maps a ``quantization_config``'s ``quant_method`` to a config class and an ``HfQuantizer``
(``transformers.quantizers.auto``: ``register_quantization_config`` / ``register_quantizer``, its public way
to add a method). Importing this module registers ``"lowbit"``: :class:`LowbitConfig` carries a lowbit config
(a preset dict or ``QuantizeConfig``) and the scales' dtype; :class:`LowbitHfQuantizer` runs the loader of
``init_quantized_weights`` (``lowbit.compress.loading``) inside ``from_pretrained``:

1. before the weights load (the model is built, its tensors on the meta device), the loader records where each
   module sits; ``param_needs_quantization`` names the weights the config packs;
2. transformers hands each of those to the quantize op (:class:`PackWeight`, a ``ConversionOps``) as it is read;
   the loader packs it row chunk by row chunk and a meta placeholder takes its place, so one dense weight at a
   time exists;
3. after loading, the placeholders become ``CompressedLinear`` modules (compressed experts).

Memory: transformers loads sequentially when a quantizer quantizes on the fly (no read-ahead of dense
tensors), and its caching-allocator warmup on an accelerator reserves ``param_element_size`` bytes per
element: the packed bytes for the weights the config quantizes, so the reservation is the packed model, not the
dense one. Only weight-calibrated configs load this way (algorithm ``"max"`` or None), as with
``init_quantized_weights``; a checkpoint that is already quantized is refused (lowbit's exports load back
with ``lowbit.load_quantized``).
"""

from __future__ import annotations

import torch
from transformers.core_model_loading import ConversionOps
from transformers.quantizers import HfQuantizer
from transformers.quantizers.auto import register_quantization_config, register_quantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from lowbit.compress.loading import packing_loader
from lowbit.compress.packed import SCALE_DTYPES
from lowbit.config import QuantizeConfig

QUANT_METHOD = "lowbit"
SCALE_DTYPE_NAMES = {str(dtype).removeprefix("torch."): dtype for dtype in SCALE_DTYPES}


@register_quantization_config(QUANT_METHOD)
class LowbitConfig(QuantizationConfigMixin):
    """``quantization_config`` for ``from_pretrained``: pack the weights ``config`` quantizes while loading.

    ``config``: a lowbit config (ModelOpt-style dict, e.g. ``lowbit.INT4_BLOCKWISE_WEIGHT_ONLY_CFG``, or a
    ``QuantizeConfig``) whose algorithm is ``"max"`` or None. ``scale_dtype``: the stored scales' dtype, a name in
    ``SCALE_DTYPE_NAMES`` (``"float32"``, ``"bfloat16"``, ``"float16"``). Both are checked here, before loading.
    """

    def __init__(self, config: dict | QuantizeConfig, scale_dtype: str = "float32", **kwargs):
        self.quant_method = QUANT_METHOD
        self.config = config
        self.scale_dtype = scale_dtype
        self.loader()  # validates both

    def loader(self):
        """A fresh loader for one ``from_pretrained`` (``lowbit.compress.loading.packing_loader``)."""
        if self.scale_dtype not in SCALE_DTYPE_NAMES:
            raise ValueError(f"LowbitConfig: scale_dtype={self.scale_dtype!r}; allowed are {sorted(SCALE_DTYPE_NAMES)}")
        return packing_loader(self.config, SCALE_DTYPE_NAMES[self.scale_dtype])


@register_quantizer(QUANT_METHOD)
class LowbitHfQuantizer(HfQuantizer):
    """transformers' side of :class:`LowbitConfig` (see the module docstring for the three steps)."""

    requires_calibration = False
    quantization_config: LowbitConfig

    def __init__(self, quantization_config: LowbitConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self._loader = None

    def validate_environment(self, *args, **kwargs) -> None:
        if self.pre_quantized:
            raise ValueError("quant_method 'lowbit' quantizes while loading a float checkpoint; this one is already "
                             "quantized: load lowbit's exports with lowbit.load_quantized")

    def _process_model_before_weight_loading(self, model: torch.nn.Module, **kwargs) -> torch.nn.Module:
        self._loader = self.quantization_config.loader()
        self._loader.place(model)
        return model

    def param_needs_quantization(self, model: torch.nn.Module, param_name: str, **kwargs) -> bool:
        return self._packed_bytes(model, param_name) is not None

    def param_element_size(self, model: torch.nn.Module, param_name: str, param: torch.Tensor) -> float:
        """Bytes per element the loaded ``param`` will take: the packed bytes for the weights the config packs
        (what transformers' allocator warmup reserves)."""
        packed = self._packed_bytes(model, param_name)
        return param.element_size() if packed is None else packed / param.numel()

    def _packed_bytes(self, model: torch.nn.Module, param_name: str) -> int | None:
        module_name, _, name = param_name.rpartition(".")
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            return None
        return self._loader.packed_bytes(module, name) if hasattr(module, name) else None

    def get_quantize_ops(self) -> ConversionOps:
        return PackWeight(self._loader)

    def _process_model_after_weight_loading(self, model: torch.nn.Module, **kwargs) -> torch.nn.Module:
        loader, self._loader = self._loader, None
        loader.finish()
        return model

    @property
    def is_serializable(self) -> bool:
        return False  # lowbit writes its packed models with lowbit.save_compressed / lowbit.export

    @property
    def is_trainable(self) -> bool:
        return False


class PackWeight(ConversionOps):
    """transformers' quantize op for the weights ``param_needs_quantization`` named: the loader packs each one
    (in the model's dtype, as a plain load would give it) and a meta placeholder is what transformers assigns."""

    def __init__(self, loader):
        self.loader = loader

    def convert(self, input_dict: dict, full_layer_name: str, model: torch.nn.Module, **kwargs) -> dict:
        module_name, _, name = full_layer_name.rpartition(".")
        module = model.get_submodule(module_name)
        value = input_dict[full_layer_name]
        weight = value[0] if isinstance(value, list) else value
        weight = weight.to(getattr(module, name).dtype)
        return {full_layer_name: self.loader.pack(module, name, weight.detach())}
