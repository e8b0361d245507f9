"""CompressedLinear: a Linear whose weight lives in packed low-bit buffers.

    out = output_quantizer(kernel(input_quantizer(x), W_packed) + bias)

``kernel`` is ``lowbit.kernels.weight_only_linear`` (Triton W4A16 on CUDA, torch's INT4 / INT8 kernels on the
CPU, else dequantize + F.linear) or, when both activations and weights are 8-bit and no gradient is needed, a
true W8A8 matmul on the very codes fake quantization would round to: ``int8_matmul`` (``torch._int_mm``) for
INT8 on any device, ``fp8_linear`` (Triton activation quantization + ``torch._scaled_mm``) for FP8 E4M3 on
CUDA >= sm89. On the CPU, FP8 (W8A8 and weight-only) and NVFP4 weight-only layers run ``kernels.cpu_fp`` (a C
kernel built at run time where a compiler exists) for up to ``GEMV_MAX_ROWS`` rows, else dequantize.

Thin forward: ``prepare(dtype)`` (called by ``compress``, and on the first call after a move to another
device) decides the kernel once for the device and activation dtype (``lowbit.kernels.prepare_linear``) and
derives its operands, for weight-only layers (input and output quantizers disabled, no LoRA) and for FP8
W8A8 on CUDA and CPU; a call then checks the input's dtype, device and gradient and runs that one op (on CUDA, eager
calls of a few rows replay a CUDA graph of it: ``lowbit.kernels.eager_graphs``). The derived
operands are not buffers: the state dict holds the canonical packed tensors only.
The packed weight is frozen (buffers); gradients flow to the input,
the bias and optional LoRA adapters (``add_lora``), recomputing the dequantized weight in backward
instead of keeping it (QLoRA style).

Buffers: ``weight_codes``, ``weight_scale`` and, by format, ``weight_zero_point`` and
``weight_global_scale`` (see ``lowbit.compress.packed``).

``fp8_fast_accumulation`` (default False; set it, then ``prepare``): FP8 W8A8 on CUDA runs ``_scaled_mm`` with
``use_fast_accum=True``: Hopper's FP8 tensor-core sums are not promoted to float32 every few K steps, faster at
prefill sizes and less accurate over long K (bench/results/kernels_h100_notes.md: 8192 x 28672, M=2048, error vs
a float64 product of the same codes 2.8e-3 instead of 1.7e-3).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lowbit import formats
from lowbit.compress.packed import PackedWeight, WeightFormat, storage_spec
from lowbit.kernels import Fp8Weight, PreparedLinear, cpu_fp, int8_matmul, prepare_linear, weight_only_linear
from lowbit.kernels.dispatch import has_triton
from lowbit.kernels.eager_graphs import for_device
from lowbit.kernels.grad_mode import needs_autograd
from lowbit.kernels.ops import fp8_linear
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
        self.fp8_fast_accumulation = False
        self._prepared: PreparedLinear | None = None
        self._prepared_on: torch.device | None = None  # the buffers' device when prepare last ran

    @classmethod
    def from_packed(cls, packed: PackedWeight, bias: nn.Parameter | None, input_quantizer: nn.Module,
                    output_quantizer: nn.Module, dtype: torch.dtype | None = None) -> CompressedLinear:
        """Wrap ``packed`` (its tensors become the buffers, no copy) with these bias and quantizers; ``dtype``:
        prepare the kernel for activations of that dtype (see ``prepare``)."""
        out_features, in_features = packed.shape
        module = cls(in_features, out_features, packed.format, bias=False, device="meta")
        for name, tensor in packed.tensors().items():
            setattr(module, BUFFER_PREFIX + name, tensor)
        module.bias = bias
        module.input_quantizer = input_quantizer
        module.output_quantizer = output_quantizer
        if dtype is not None:
            module.prepare(dtype)
        return module

    def prepare(self, dtype: torch.dtype) -> None:
        """Choose the kernel for activations of ``dtype`` on the buffers' device and derive its operands once
        (``lowbit.kernels.prepare_linear``), if this layer's forward is one kernel call: weight-only (input and
        output quantizers disabled) without LoRA, or FP8 W8A8 on CUDA. Call it again after changing the
        quantizers; ``add_lora`` and moves to another device re-decide by themselves."""
        packed = self.packed
        self._prepared = None
        self._prepared_on = packed.codes.device
        if self.lora_a is not None or _is_enabled(self.output_quantizer):
            return
        if not _is_enabled(self.input_quantizer):
            self._prepared = prepare_linear(packed, packed.codes.device, dtype)
        elif _w8a8_kind(self.input_quantizer, self.weight_format, packed.codes, cpu_kernel=True) == "fp8":
            self._prepared = _prepare_fp8(self.input_quantizer, packed, dtype, self.fp8_fast_accumulation)

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
        self._prepared = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        prepared = self._prepared
        if prepared is not None and prepared.serves(x) and not needs_autograd(x, self.bias):
            return prepared(x, self.bias)
        if self._should_prepare(x):
            self.prepare(x.dtype)
            return self.forward(x)
        out = self._w8a8(x)
        if out is None:
            x_quantized = self.input_quantizer(x)
            packed = self.packed
            if needs_autograd(x_quantized, self.bias):
                out = _PackedLinearFunction.apply(x_quantized, self.bias, packed)
            else:
                out = weight_only_linear(x_quantized, packed, self.bias)
        if self.lora_a is not None:
            out = out + (x @ self.lora_a.t().to(x.dtype)) @ self.lora_b.t().to(x.dtype) * self.lora_scale
        return self.output_quantizer(out)

    def _should_prepare(self, x: torch.Tensor) -> bool:
        """In eager mode, a layer never prepared, or moved to another device since, prepares on its first call
        (under torch.compile a preparation would be traced into the graph: ``prepare`` before compiling)."""
        if torch.compiler.is_compiling() or x.requires_grad:
            return False
        device = self.weight_codes.device
        return self._prepared_on != device and x.device == device

    def _w8a8(self, x: torch.Tensor) -> torch.Tensor | None:
        """W8A8 on codes when the input quantizer and the weight are both INT8 or both FP8 E4M3, else None.

        The activation amax is the calibrated one (static per tensor), else computed from ``x``: per row
        for per-token configs, over the tensor otherwise. FP8 runs ``fp8_linear`` (activation codes
        quantized in one Triton kernel, then ``_scaled_mm``), INT8 ``formats.quantize_int`` + ``int8_matmul``.
        """
        kind = _w8a8_kind(self.input_quantizer, self.weight_format, x)
        if kind is None or needs_autograd(x, self.bias):
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
            out = fp8_linear(rows, weight, self.bias, activation_amax, x.dtype, self.fp8_fast_accumulation)
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        fmt = self.weight_format
        granularity = "per-channel" if fmt.per_channel else "per-tensor"
        granularity = f"block {fmt.block_size}" if fmt.block_size else granularity
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"weight={fmt.kind} {fmt.num_bits} {granularity}")


def _fp8_rows(rows: torch.Tensor, weight: Fp8Weight, activation_amax, dtype, fast_accumulation: bool,
              bias=None) -> torch.Tensor:
    return fp8_linear(rows, weight, bias, activation_amax, dtype, fast_accumulation)


def _cpu_fp8_rows(rows: torch.Tensor, quantizer: TensorQuantizer, packed: PackedWeight, codes, divisor,
                  activation_step, dtype, bias=None) -> torch.Tensor:
    """FP8 W8A8 on the CPU: ``cpu_fp.fp8_w8a8_rows`` for few rows, else fake-quantized x times the dequantized
    weight (the unprepared path)."""
    if rows.shape[0] > cpu_fp.GEMV_MAX_ROWS:
        return F.linear(quantizer(rows), cpu_fp.dequantized(packed, cpu_fp.fp8_operands(packed), dtype), bias)
    out = cpu_fp.fp8_w8a8_rows(rows, codes, divisor, activation_step).to(dtype)
    return out if bias is None else out + bias


def _prepare_fp8(quantizer: TensorQuantizer, packed: PackedWeight, dtype: torch.dtype,
                 fast_accumulation: bool = False) -> PreparedLinear | None:
    """FP8 W8A8 with the activation amax fixed at preparation: static per tensor (calibrated), or dynamic per
    row; None for the other activation configs (pre_quant_scale, dynamic per tensor), which stay per call.
    CUDA: ``fp8_linear`` (``fast_accumulation``: ``_scaled_mm``'s ``use_fast_accum``); CPU: ``_cpu_fp8_rows``."""
    config = quantizer.config
    if quantizer.pre_quant_scale is not None:
        return None
    if quantizer.amax is not None and not config.is_dynamic:
        amax = quantizer.amax.detach().float().reshape(1)
    elif config.block_sizes is not None:
        amax = None
    else:
        return None
    if packed.codes.device.type == "cpu" and cpu_fp.available():
        operands = (quantizer, packed, *cpu_fp.fp8_w8a8_operands(packed, amax), dtype)
        return PreparedLinear(_cpu_fp8_rows, operands, packed.codes.device, dtype, packed.shape[0])
    operands = (Fp8Weight.from_codes(packed.codes, packed.scale), amax, dtype, fast_accumulation)
    return PreparedLinear(_fp8_rows, operands, packed.codes.device, dtype, packed.shape[0],
                          for_device(packed.codes.device))


def _is_enabled(quantizer: nn.Module) -> bool:
    """Whether a quantizer slot changes its tensor: any module but a TensorQuantizer, or one switched on, or a
    disabled one with a ``pre_quant_scale`` (AWQ's ``1/s`` on an input no norm could take: it always applies)."""
    if not isinstance(quantizer, TensorQuantizer):
        return True
    return quantizer.is_enabled or quantizer.pre_quant_scale is not None


def _disabled_quantizer() -> TensorQuantizer:
    quantizer = TensorQuantizer()
    quantizer.disable()
    return quantizer


def _w8a8_kind(quantizer: nn.Module, weight_format: WeightFormat, x: torch.Tensor,
               cpu_kernel: bool = False) -> str | None:
    """'int8' / 'fp8' when a true 8-bit x 8-bit matmul computes what fake quantization would. FP8 needs CUDA
    >= sm89 with Triton, or with ``cpu_kernel`` (prepared layers) the CPU with ``kernels.cpu_fp``'s library."""
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
    fp8_device = x.is_cuda and torch.cuda.get_device_capability(x.device) >= (8, 9) and has_triton()
    fp8_device = fp8_device or (cpu_kernel and x.device.type == "cpu" and cpu_fp.available())
    if config.num_bits == (4, 3) and weight_format.kind == "float" and weight_format.num_bits == (4, 3) and fp8_device:
        return "fp8"
    return None
