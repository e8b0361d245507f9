"""The quantized linears of a model as exporters see them: weight, quantizer stages, packed codes.

``quantized_linears(model)`` walks the model once and returns, for every quantized Linear with an
enabled weight quantizer, a :class:`QuantizedLinear`: the (out, in) float weight, the enabled weight
quantizer stages (two for W4A8: INT4 blocks then FP8 per tensor), the enabled input quantizer, the
``pre_quant_scale`` the input is multiplied by, and the first stage packed by ``lowbit.compress``
(codes and scales computed by ``lowbit.formats``, exactly what fake quantization multiplies).
Quantized linears whose weight quantizer is disabled, and plain ``nn.Linear`` modules, are listed as
excluded (kept in high precision). Fused MoE experts count as one linear per expert and projection, under
their checkpoint names (``lowbit.export.experts``).

Export scales are *divisors* (``x_hat = code * weight_scale``), the convention of ModelOpt's unified
checkpoint, compressed-tensors and vLLM; lowbit's fake quantization multiplies by ``qmax / amax`` and
divides, so ``weight_scale = amax / qmax`` in float32 reproduces its weights to the rounding of one
float32 division (what "agree to 1 ulp of the scale dtype" measures).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from lowbit import formats
from lowbit.compress.convert import linear_weight
from lowbit.compress.packed import PackedWeight, WeightFormat, quantize_weight
from lowbit.export.experts import checkpoint_renamer, expert_projections_of, fused_keys, router_names
from lowbit.modules import is_quantized
from lowbit.modules.low_rank import LowRankQuantLinear
from lowbit.quantizer import SequentialQuantizer, TensorQuantizer


@dataclass(frozen=True)
class QuantizedLinear:
    """One quantized Linear, ready to be written by an exporter (see the module docstring)."""

    name: str
    module: nn.Module
    weight: torch.Tensor
    stages: tuple[TensorQuantizer, ...]
    input_quantizer: TensorQuantizer | None
    pre_quant_scale: torch.Tensor | None

    @property
    def config(self):
        """The first weight stage's QuantizerAttributeConfig."""
        return self.stages[0].config

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    def weight_format(self) -> WeightFormat:
        """The lowbit storage format of the first stage; ValueError naming the layer when not storable."""
        try:
            return WeightFormat.from_config(self.config, tuple(self.weight.shape))
        except ValueError as error:
            raise ValueError(f"{self.name}.weight_quantizer: {error}") from None

    def packed(self) -> PackedWeight:
        """The first stage's codes and scales from its calibrated amax (or the weight's, when dynamic)."""
        stage = self.stages[0]
        amax = None if stage.amax is None else stage.amax.detach()
        amin = None if stage.amin is None else stage.amin.detach()
        return quantize_weight(self.weight.detach(), self.weight_format(), amax=amax, amin=amin,
                               block_amax=stage.block_amax)

    def weight_step(self, maxbound: float) -> torch.Tensor:
        """The first stage's float32 step per scale group in its view shape, as checkpoints store ``weight_scale``:
        ``amax / maxbound``, or for a signed-scale integer grid the signed step ``1 / scale`` of its packed
        storage (``formats.quantize_int_signed_scale``: negative where the group's larger end is positive)."""
        if not self.config.signed_scale:
            return formats.divisor_step(self.weight_amax(), maxbound)
        return 1.0 / self.packed().scale.float()

    def block_dims(self) -> tuple[int, int] | None:
        """(rows, columns) of a 2-D weight block config ({-2: rows, -1: columns}), else None."""
        blocks = {axis % 2: size for axis, size in self.config.block_axes.items()}
        if set(blocks) != {0, 1} or None in blocks.values():
            return None
        return blocks[0], blocks[1]

    def float8_blocks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """FP8 E4M3 weight in 2-D blocks: (float8_e4m3fn codes (N, K), float32 divisors (N/r, K/c)).

        ``codes = e4m3(w * 448 / amax_blk)`` (``formats.quantize_fp``), ``divisor = amax_blk / 448``."""
        rows, columns = self.block_dims()
        n, k = self.weight.shape
        if n % rows or k % columns:
            raise ValueError(f"{self.name}: weight ({n}, {k}) does not split into {rows}x{columns} blocks")
        view = self.weight.detach().float().reshape(n // rows, rows, k // columns, columns)
        amax = self.weight_amax().reshape(n // rows, 1, k // columns, 1)
        values, _ = formats.quantize_fp(view, amax, formats.E4M3)
        divisor = (amax / formats.E4M3.max_value).reshape(n // rows, k // columns)
        return values.reshape(n, k).to(torch.float8_e4m3fn), divisor.contiguous()

    def weight_amax(self, stage: int = 0) -> torch.Tensor:
        """Float32 amax of a weight stage in its view shape: the calibrated one, else the weight's own."""
        quantizer = self.stages[stage]
        weight = self.weight.detach()
        if stage == 1:
            weight = self.stages[0].fake_quant(weight)
        if quantizer.amax is not None and not quantizer.config.is_dynamic:
            return quantizer.amax.detach().float()
        return quantizer.compute_amax(weight)

    def input_amax(self) -> torch.Tensor | None:
        """The calibrated static input amax (float32), None for a dynamic or absent input quantizer."""
        quantizer = self.input_quantizer
        if quantizer is None or quantizer.config.is_dynamic or quantizer.amax is None:
            return None
        return quantizer.amax.detach().float()


def _enabled_stages(quantizer: nn.Module | None) -> tuple[TensorQuantizer, ...]:
    if isinstance(quantizer, SequentialQuantizer):
        return tuple(q for q in quantizer if q.is_enabled)
    if isinstance(quantizer, TensorQuantizer) and quantizer.is_enabled:
        return (quantizer,)
    return ()


def _input_quantizer(quantizer: nn.Module | None) -> tuple[TensorQuantizer | None, torch.Tensor | None]:
    """(the enabled input quantizer, the pre_quant_scale any input stage multiplies by)."""
    stages = list(quantizer) if isinstance(quantizer, SequentialQuantizer) else [quantizer]
    stages = [q for q in stages if isinstance(q, TensorQuantizer)]
    scales = [q.pre_quant_scale for q in stages if q.pre_quant_scale is not None]
    enabled = [q for q in stages if q.is_enabled]
    if len(enabled) > 1:
        raise ValueError(f"{type(quantizer).__name__}: a sequential input quantizer ({len(enabled)} stages) has no "
                         "export layout")
    return (enabled[0] if enabled else None), (scales[0].detach().float().flatten() if scales else None)


def quantized_linears(model: nn.Module) -> tuple[dict[str, QuantizedLinear], list[str]]:
    """``({name: QuantizedLinear}, [names of Linear layers kept in high precision])``, in model order.

    Raises ValueError naming the layer when a weight quantizer has a pre_quant_scale of its own (the
    exported weight would not be the model's).
    """
    layers: dict[str, QuantizedLinear] = {}
    excluded: list[str] = []
    rename = checkpoint_renamer(model)
    for name, module in model.named_modules():
        name = rename(name)
        weight = linear_weight(module) if is_quantized(module) else None
        if weight is None:
            if isinstance(module, nn.Linear) and name:
                excluded.append(name)
            continue
        if isinstance(module, LowRankQuantLinear):
            raise ValueError(f"{name}: its low-rank float branch (SVDQuant, LoRA correction) has no place in the "
                             "export formats; lowbit.compress keeps it (CompressedLinear's LoRA adapters)")
        stages = _enabled_stages(getattr(module, "weight_quantizer", None))
        if not stages:
            excluded.append(name)
            continue
        if any(stage.pre_quant_scale is not None for stage in stages):
            raise ValueError(f"{name}.weight_quantizer has a pre_quant_scale: fold it into the weight before export")
        input_quantizer, pre_quant_scale = _input_quantizer(getattr(module, "input_quantizer", None))
        layers[name] = QuantizedLinear(name, module, weight.detach(), stages, input_quantizer, pre_quant_scale)
    for expert in expert_projections_of(model):  # fused MoE experts, one layer per expert and projection
        if expert.weight_quantizer is None:
            excluded.append(expert.name)
            continue
        if expert.weight_quantizer.pre_quant_scale is not None:
            raise ValueError(f"{expert.name}: its weight quantizer has a pre_quant_scale; fold it into the weight")
        input_quantizer, pre_quant_scale = _input_quantizer(expert.input_quantizer)
        layers[expert.name] = QuantizedLinear(expert.name, model, expert.weight.detach(), (expert.weight_quantizer,),
                                              input_quantizer, pre_quant_scale)
    return layers, excluded + router_names(model)


def kv_cache_quantizers(model: nn.Module) -> dict[str, tuple[TensorQuantizer, TensorQuantizer]]:
    """{attention module name: (k_bmm_quantizer, v_bmm_quantizer)} for attention with both enabled."""
    found = {}
    for name, module in model.named_modules():
        k, v = getattr(module, "k_bmm_quantizer", None), getattr(module, "v_bmm_quantizer", None)
        if isinstance(k, TensorQuantizer) and isinstance(v, TensorQuantizer) and k.is_enabled and v.is_enabled:
            found[name] = (k, v)
    return found


def dense_state_dict(model: nn.Module, replaced: set[str], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """The model's parameters and buffers except quantizer state and the weights of ``replaced`` layers,
    as contiguous tensors (floating ones cast to ``dtype`` when given); a tensor tied to an earlier one is
    written once (the first name), as ``save_pretrained`` does."""
    state = {}
    seen: set[tuple[int, int]] = set()
    rename, fused = checkpoint_renamer(model), fused_keys(model)
    floats = {f"{e.name}.weight": e.weight for e in expert_projections_of(model) if e.name not in replaced}
    for key, tensor in [*model.state_dict().items(), *floats.items()]:
        if key in fused:
            continue
        key = rename(key)
        if "_quantizer." in key or key.rpartition(".")[0] in replaced and key.endswith(".weight"):
            continue
        identity = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if identity in seen:
            continue
        seen.add(identity)
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        state[key] = tensor.detach().contiguous()
    return state


def export_state_dict(model: nn.Module, layers: dict[str, QuantizedLinear], dtype: torch.dtype | None,
                      tensors_of: Callable[[str, QuantizedLinear], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """``dense_state_dict`` with each quantized layer's float weight replaced by its export tensors
    (``tensors_of(name, layer)``: suffix -> tensor, written as ``name.suffix``), all contiguous on the CPU."""
    state = dense_state_dict(model, set(layers), dtype)
    for name, layer in layers.items():
        for suffix, tensor in tensors_of(name, layer).items():
            state[f"{name}.{suffix}"] = tensor.detach().cpu().contiguous()
    return state
