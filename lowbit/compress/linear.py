"""CompressedLinear: a Linear whose weight lives in packed low-bit buffers.

    out = output_quantizer(kernel(input_quantizer(x), W_packed) + bias)

``kernel`` is ``lowbit.kernels.weight_only_linear`` (Triton W4A16 on CUDA, else dequantize + F.linear)
or, when both activations and weights are 8-bit and no gradient is needed, a true W8A8 matmul on the
very codes fake quantization would round to: ``int8_matmul`` (``torch._int_mm``) for INT8 on any device,
``fp8_linear`` (Triton activation quantization + ``torch._scaled_mm``) for FP8 E4M3 on CUDA >= sm89.
The packed weight is frozen (buffers); gradients flow to the input,
the bias and optional LoRA adapters (``add_lora``), recomputing the dequantized weight in backward
instead of keeping it (QLoRA style).

Buffers: ``weight_codes``, ``weight_scale`` and, by format, ``weight_zero_point`` and
``weight_global_scale`` (see ``lowbit.compress.packed``).
"""

from __future__ import annotations

import functools
import importlib.util
import math

import torch
from torch import nn

from lowbit import formats
from lowbit.compress.packed import PackedWeight, WeightFormat, storage_spec
from lowbit.kernels import Fp8Weight, fp8_linear, int8_matmul, weight_only_linear
from lowbit.quantizer import TensorQuantizer

BUFFER_PREFIX = "weight_"


class _PackedLinearFunction(torch.autograd.Function):
    """``x @ W.T + bias`` with a frozen packed W; backward dequantizes W again instead of saving it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor | None, packed: PackedWeight) -> torch.Tensor:
        ctx.packed = packed
        ctx.has_bias = bias is not None
        return weight_only_linear(x, packed, bias)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ ctx.packed.dequantize(grad_out.dtype).to(grad_out.device)
        if ctx.has_bias and ctx.needs_input_grad[1]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, grad_bias, None


class CompressedLinear(nn.Module):
    """Linear layer over a packed weight (see the module docstring)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        weight_format: WeightFormat,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        scale_dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight_format = weight_format
        spec = storage_spec(weight_format, (out_features, in_features), scale_dtype)
        for name, (shape, storage_dtype) in spec.items():
            self.register_buffer(BUFFER_PREFIX + name, torch.empty(shape, dtype=storage_dtype, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        self.input_quantizer = _disabled_quantizer()
        self.output_quantizer = _disabled_quantizer()
        self.lora_a: nn.Parameter | None = None
        self.lora_b: nn.Parameter | None = None
        self.lora_scale = 0.0

    @classmethod
    def from_packed(cls, packed: PackedWeight, bias: nn.Parameter | None, input_quantizer: nn.Module,
                    output_quantizer: nn.Module) -> CompressedLinear:
        """Wrap ``packed`` (its tensors become the buffers, no copy) with these bias and quantizers."""
        out_features, in_features = packed.shape
        module = cls(in_features, out_features, packed.format, bias=False, device="meta")
        for name, tensor in packed.tensors().items():
            setattr(module, BUFFER_PREFIX + name, tensor)
        module.bias = bias
        module.input_quantizer = input_quantizer
        module.output_quantizer = output_quantizer
        return module

    @property
    def packed(self) -> PackedWeight:
        tensors = {name[len(BUFFER_PREFIX):]: t for name, t in self._buffers.items() if name.startswith(BUFFER_PREFIX)}
        empty = {name: None for name in ("codes", "scale", "zero_point", "global_scale")}
        return PackedWeight(self.weight_format, (self.out_features, self.in_features), **{**empty, **tensors})

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The (out, in) weight fake quantization would use, in ``dtype`` (default: the bias' or float32)."""
        dtype = dtype or (self.bias.dtype if self.bias is not None else torch.float32)
        return self.packed.dequantize(dtype)

    def add_lora(self, rank: int, alpha: float | None = None, generator: torch.Generator | None = None) -> None:
        """Trainable low-rank adapters: ``out += (x @ A.T @ B.T) * alpha / rank``, B zero so the output is
        unchanged until training moves it (A: Kaiming-uniform, as PEFT initialises LoRA). The adapters take
        the bias' dtype (float32 without a bias)."""
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank={rank!r}: expected a positive int")
        dtype = self.bias.dtype if self.bias is not None else torch.float32
        device = self.weight_codes.device
        a = torch.empty(rank, self.in_features, device=device, dtype=torch.float32)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        self.lora_a = nn.Parameter(a.to(dtype))
        self.lora_b = nn.Parameter(torch.zeros(self.out_features, rank, device=device, dtype=dtype))
        self.lora_scale = (alpha if alpha is not None else rank) / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._w8a8(x)
        if out is None:
            x_quantized = self.input_quantizer(x)
            packed = self.packed
            if torch.is_grad_enabled() and (x_quantized.requires_grad or _requires_grad(self.bias)):
                out = _PackedLinearFunction.apply(x_quantized, self.bias, packed)
            else:
                out = weight_only_linear(x_quantized, packed, self.bias)
        if self.lora_a is not None:
            out = out + (x @ self.lora_a.t().to(x.dtype)) @ self.lora_b.t().to(x.dtype) * self.lora_scale
        return self.output_quantizer(out)

    def _w8a8(self, x: torch.Tensor) -> torch.Tensor | None:
        """W8A8 on codes when the input quantizer and the weight are both INT8 or both FP8 E4M3, else None.

        The activation amax is the calibrated one (static per tensor), else computed from ``x``: per row
        for per-token configs, over the tensor otherwise. FP8 runs ``fp8_linear`` (activation codes
        quantized in one Triton kernel, then ``_scaled_mm``), INT8 ``formats.quantize_int`` + ``int8_matmul``.
        """
        kind = _w8a8_kind(self.input_quantizer, self.weight_format, x)
        if kind is None or (torch.is_grad_enabled() and x.requires_grad):
            return None
        quantizer = self.input_quantizer
        rows = x.reshape(-1, self.in_features)
        if quantizer.pre_quant_scale is not None:
            rows = rows * quantizer.pre_quant_scale.to(rows.dtype).reshape(1, -1)
        config = quantizer.config
        per_row = config.block_sizes is not None
        if quantizer.amax is not None and not config.is_dynamic:
            amax = quantizer.amax.reshape(1, 1)
        elif per_row:
            amax = None if kind == "fp8" else rows.detach().abs().amax(dim=-1, keepdim=True)
        else:
            amax = rows.detach().abs().amax().reshape(1, 1)
        packed = self.packed
        if kind == "int8":
            codes, scale = formats.quantize_int(rows, amax, 8, config.unsigned, config.narrow_range)
            out = int8_matmul(codes.to(torch.int8), scale, packed.codes, packed.scale, self.bias, x.dtype)
        else:
            weight = Fp8Weight.from_codes(packed.codes, packed.scale)
            activation_amax = None if amax is None else amax.float().reshape(1)
            out = fp8_linear(rows, weight, self.bias, activation_amax, x.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        fmt = self.weight_format
        granularity = "per-channel" if fmt.per_channel else "per-tensor"
        granularity = f"block {fmt.block_size}" if fmt.block_size else granularity
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"weight={fmt.kind} {fmt.num_bits} {granularity}")


def _disabled_quantizer() -> TensorQuantizer:
    quantizer = TensorQuantizer()
    quantizer.disable()
    return quantizer


def _requires_grad(tensor: torch.Tensor | None) -> bool:
    return tensor is not None and tensor.requires_grad


def _w8a8_kind(quantizer: nn.Module, weight_format: WeightFormat, x: torch.Tensor) -> str | None:
    """'int8' / 'fp8' when a true 8-bit x 8-bit matmul computes what fake quantization would."""
    if not isinstance(quantizer, TensorQuantizer) or not quantizer.is_enabled or quantizer._calib:
        return None
    config = quantizer.config
    per_tensor = config.axis is None and config.block_sizes is None
    per_token = config.block_axes == {-1: None} and config.is_dynamic
    if not (per_tensor or per_token) or weight_format.block_size is not None:
        return None
    if config.num_bits == 8 and not config.asymmetric and weight_format.kind == "int" and weight_format.num_bits == 8:
        if not weight_format.unsigned and not config.unsigned:
            return "int8"
    fp8_device = x.is_cuda and torch.cuda.get_device_capability(x.device) >= (8, 9) and _has_triton()
    if config.num_bits == (4, 3) and weight_format.kind == "float" and weight_format.num_bits == (4, 3) and fp8_device:
        return "fp8"
    return None


@functools.cache
def _has_triton() -> bool:
    """``fp8_linear`` quantizes activations with a Triton kernel."""
    return importlib.util.find_spec("triton") is not None
