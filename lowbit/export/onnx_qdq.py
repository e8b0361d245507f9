"""ONNX with QuantizeLinear / DequantizeLinear, written by torch.onnx's dynamo exporter (``lowbit[onnx]``,
which needs ``onnxscript``), opset 21.

Each quantized Linear / Conv1d-3d becomes, in an export copy of the model (the model itself is untouched), one
of two graphs (``numerics``), both with ONNX's own Q/DQ math: QuantizeLinear = saturate(round_half_even(x / s))
(FP8: cast to float8e4m3fn, round to nearest even, saturating), DequantizeLinear = (q - zero_point) * s, float32.

``numerics="onnx"`` (default): the usual QDQ form, which runtimes fuse into integer kernels (onnxruntime's
MatMulIntegerToFloat, TensorRT's int8 / FP8 GEMMs); the scales are steps, ``s_x = amax / bound`` and
``step = 1 / scale``:

    x_q = DequantizeLinear(QuantizeLinear(x * pre_quant_scale, s_x, 0), s_x, 0)
    w   = DequantizeLinear(codes, step, zero_point, axis, block_size)
    y   = Gemm / Conv(x_q, w, bias)

lowbit forms codes the same way, ``x / s_x`` (``formats.scale_and_step``), but dequantizes by dividing by
``scale = bound / amax`` (ModelOpt's convention); ``codes * step`` differs from that by float32 rounding (a
dequantized value one ulp off), which static activation quantization then carries on (rarely a code).

``numerics="lowbit"``: the graph computes lowbit's fake quantization bit for bit, the step and scale in a Div /
Div around unit-step Q/DQ (runtimes run it, but no longer fuse its Q/DQ into integer GEMMs):

    x_q = Div(DequantizeLinear(QuantizeLinear(Div(x * pre_quant_scale, s_x), 1, 0), 1, 0), scale_x)
    w   = Div(DequantizeLinear(codes, 1), scale_w)           (symmetric INT / FP8 weights, scale_w per block)
    w   = DequantizeLinear(codes, step, zero_point, axis, block_size)       (asymmetric INT: lowbit's own form)

Measured (bench/results/export_onnx_layers_2026-12-07.md, bundled Llama W8A8, 4 x 128 tokens): "lowbit"'s graph
run in torch equals lowbit's logits (0), "onnx"'s is up to 3 % away; onnxruntime, whose float kernels round
differently, is 1-3 % from lowbit with either (15 of 16 runs), as far as lowbit's own float32 logits are from
the same model computed in float64 (0.4-3 %): one flipped activation code spreads through the later static
W8A8 layers. On small models "lowbit" runs in onnxruntime within 5e-4 (MLP: bit for bit), "onnx" within 3.2e-3.

The codes, steps and zero points are lowbit's own (``lowbit.export.weights``); bound = 127 (INT8) or 448 (FP8).

| lowbit weight                                | initializer                        | DequantizeLinear          |
|----------------------------------------------|------------------------------------|---------------------------|
| INT8 (symmetric; asymmetric: uint8 + zp)     | int8 / uint8 codes                 | per tensor, axis 0 or     |
| INT4 (symmetric; asymmetric: uint4 + zp)     | int4 / uint4 codes                 | axis 1 + block_size (21)  |
| FP8 E4M3                                     | float8e4m3fn codes                 | per tensor or axis 0      |

Inputs: INT8 symmetric (int8) or FP8 E4M3, static per tensor. Refused before anything is exported, naming the
layer: dynamic (per-token) input scales, output quantizers, KV-cache quantizers, NVFP4 / MX, transposed
convolutions.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lowbit import formats
from lowbit.export.weights import QuantizedWeight, active_activation_quantizers, quantized_weight, weight_quantizer
from lowbit.files import atomic_directory, atomic_file

OPSET = 21
INPUT_BOUNDS = {"int8": 127.0, "e4m3": 448.0}
NUMERICS = ("lowbit", "onnx")
CONVOLUTIONS = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}


@torch.library.custom_op("lowbit::onnx_quantize_dequantize", mutates_args=())
def _quantize_dequantize(x: torch.Tensor, step: torch.Tensor, fp8: bool) -> torch.Tensor:
    """ONNX's QuantizeLinear then DequantizeLinear of ``x`` (module docstring), zero point 0."""
    scaled = x.float() / step
    codes = scaled.to(torch.float8_e4m3fn).float() if fp8 else torch.clamp(torch.round(scaled), -128, 127)
    return (codes * step).to(x.dtype)


@_quantize_dequantize.register_fake
def _(x, step, fp8):
    return torch.empty_like(x)


@torch.library.custom_op("lowbit::onnx_dequantize", mutates_args=())
def _dequantize(codes: torch.Tensor, step: torch.Tensor, zero_point: torch.Tensor | None, axis: int,
                block_size: int) -> torch.Tensor:
    """ONNX's DequantizeLinear: (codes - zero_point) * step, step broadcast per tensor / on ``axis`` / per block."""
    values = codes.float() - (0.0 if zero_point is None else _expand(zero_point.float(), codes, axis, block_size))
    return values * _expand(step, codes, axis, block_size)


@_dequantize.register_fake
def _(codes, step, zero_point, axis, block_size):
    return torch.empty(codes.shape, dtype=torch.float32, device=codes.device)


def _expand(values: torch.Tensor, like: torch.Tensor, axis: int, block_size: int) -> torch.Tensor:
    if values.dim() == 0:
        return values
    if block_size:
        values = values.repeat_interleave(block_size, dim=axis)
    shape = [1] * like.dim()
    shape[axis] = values.shape[0]
    return values.reshape(shape) if values.dim() == 1 else values


def _onnx_quantize_dequantize(x, step, fp8: bool):
    import onnx
    from onnxscript import opset21 as op

    if fp8:  # no zero point (0 by default): onnxruntime 1.32 drops a ReLU before an FP8 Q that has one
        quantized = op.QuantizeLinear(x, step, output_dtype=onnx.TensorProto.FLOAT8E4M3FN)
        return op.DequantizeLinear(quantized, step)
    zero = op.Constant(value=onnx.helper.make_tensor("zero_point", onnx.TensorProto.INT8, [], [0]))
    return op.DequantizeLinear(op.QuantizeLinear(x, step, zero), step, zero)


def _onnx_dequantize(codes, step, zero_point, axis: int, block_size: int):
    from onnxscript import opset21 as op

    attributes = {"block_size": block_size, "axis": axis} if block_size else ({"axis": axis} if step.shape else {})
    if zero_point is None:
        return op.DequantizeLinear(codes, step, **attributes)
    return op.DequantizeLinear(codes, step, zero_point, **attributes)


TRANSLATIONS = {
    torch.ops.lowbit.onnx_quantize_dequantize.default: _onnx_quantize_dequantize,
    torch.ops.lowbit.onnx_dequantize.default: _onnx_dequantize,
}


def _unit(like: torch.Tensor) -> torch.Tensor:
    return torch.ones((), dtype=torch.float32, device=like.device)


def _weight_divisor(weight: QuantizedWeight, shape: torch.Size, block_size: int) -> torch.Tensor:
    """lowbit's multiplicative weight scale, shaped to divide the dequantized (N, ...) weight: () per tensor,
    (N, 1, ...) per channel, (N, K // block_size, 1) per block (on the (N, K // block_size, block_size) view)."""
    scale = weight.packed.scale.float()
    if block_size:
        return scale.reshape(shape[0], -1, 1).contiguous()
    if scale.numel() == 1:
        return scale.reshape(())
    return scale.reshape(shape[0], *[1] * (len(shape) - 1)).contiguous()


class QDQLayer(nn.Module):
    """The export form of one quantized Linear / Conv (module docstring): constant codes and scales (or steps),
    the input's scale (or step)."""

    def __init__(self, name: str, module: nn.Module, numerics: str = "onnx"):
        super().__init__()
        weight = quantized_weight(name, module)
        fmt = weight.format
        shape = module.weight.shape
        self.convolution = next((f for cls, f in CONVOLUTIONS.items() if isinstance(module, cls)), None)
        if self.convolution is not None:
            if module.padding_mode != "zeros":
                raise ValueError(f"layer {name!r}: padding_mode={module.padding_mode!r}; ONNX export takes 'zeros'")
            self.conv_options = (module.stride, module.padding, module.dilation, module.groups)
        codes = weight.codes.reshape(shape)
        if fmt.kind == "float":
            if fmt.num_bits != (4, 3):
                raise ValueError(f"layer {name!r}: FP8 {fmt.num_bits} weights; ONNX export takes E4M3")
            codes = codes.to(torch.float8_e4m3fn)
        else:
            codes = codes.to(torch.uint8 if fmt.kind == "int_asym" or fmt.unsigned else torch.int8)
        self.register_buffer("weight_codes", codes)
        self.int4 = fmt.num_bits == 4
        self.block_size = 0 if fmt.block_size is None or fmt.block_size == shape[1] else fmt.block_size
        step, zero = weight.step, weight.zero_point
        # lowbit divides symmetric codes by its scale (asymmetric: (codes - zp) * step, which is DequantizeLinear)
        divides = numerics == "lowbit" and fmt.kind != "int_asym"
        self.register_buffer("weight_divisor", _weight_divisor(weight, shape, self.block_size) if divides else None)
        if divides:
            step, self.block_size = _unit(step), 0
        elif self.block_size == 0:  # per tensor: a scalar; per channel: (N,) on axis 0
            per_channel = fmt.per_channel or fmt.block_size is not None
            step = step[:, 0] if per_channel else step[0, 0]
            zero = None if zero is None else (zero[:, 0] if per_channel else zero[0, 0])
        self.axis = 1 if self.block_size else 0
        self.register_buffer("weight_step", step.contiguous())
        self.register_buffer("weight_zero_point", None if zero is None else zero.to(codes.dtype).contiguous())
        self.bias = None if module.bias is None else nn.Parameter(module.bias.detach().clone(), requires_grad=False)
        self._input(name, module, numerics)

    def _input(self, name: str, module: nn.Module, numerics: str) -> None:
        active = dict(active_activation_quantizers(module))
        if "output_quantizer" in active:
            raise ValueError(f"layer {name!r}: output quantization is not exported to ONNX")
        quantizer = active.get("input_quantizer")
        scale = None if quantizer is None else quantizer.pre_quant_scale
        self.register_buffer("pre_quant_scale", None if scale is None else scale.detach().float().clone())
        self.input_fp8 = False
        self.register_buffer("input_step", None)
        self.register_buffer("input_scale", None)
        self.register_buffer("input_divisor", None)
        if quantizer is None or not quantizer.is_enabled:
            return
        config = quantizer.config
        if config.format_name not in INPUT_BOUNDS or config.is_dynamic or quantizer.amax is None \
                or quantizer.amax.numel() != 1 or config.narrow_range or config.signed_scale:
            raise ValueError(
                f"layer {name!r}: input quantizer {config.format_name} {config.granularity}"
                f"{' narrow_range' if config.narrow_range else ''}{' signed_scale' if config.signed_scale else ''} "
                f"({'calibrated' if quantizer.amax is not None else 'uncalibrated'}); ONNX export takes a "
                f"calibrated static per-tensor input in {sorted(INPUT_BOUNDS)}")
        self.input_fp8 = config.format_name == "e4m3"
        amax = quantizer.amax.detach().float().reshape(())
        scale, step = formats.scale_and_step(amax, INPUT_BOUNDS[config.format_name])  # lowbit's fake quant's
        if numerics == "onnx":
            self.input_step = step
            return
        self.input_step, self.input_divisor, self.input_scale = _unit(amax), step, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre_quant_scale is not None:
            x = x * self.pre_quant_scale.to(x.dtype)
        if self.input_scale is not None:  # lowbit's float32 math: x / step, round, / scale, back to x's dtype
            scaled = x.float() / self.input_divisor
            x = (torch.ops.lowbit.onnx_quantize_dequantize(scaled, self.input_step, self.input_fp8)
                 / self.input_scale).to(x.dtype)
        elif self.input_step is not None:
            x = torch.ops.lowbit.onnx_quantize_dequantize(x, self.input_step, self.input_fp8)
        weight = torch.ops.lowbit.onnx_dequantize(self.weight_codes, self.weight_step, self.weight_zero_point,
                                                  self.axis, self.block_size)
        if self.weight_divisor is not None:
            blocks = weight.reshape(*self.weight_divisor.shape[:2], -1) if self.weight_divisor.dim() == 3 else weight
            weight = (blocks / self.weight_divisor).reshape(self.weight_codes.shape)
        weight = weight.to(x.dtype)
        if self.convolution is None:
            return F.linear(x, weight, self.bias)
        return self.convolution(x, weight, self.bias, *self.conv_options)


def _check_numerics(numerics: str) -> None:
    if numerics not in NUMERICS:
        raise ValueError(f"numerics={numerics!r}; allowed: {', '.join(map(repr, NUMERICS))}")


def export_copy(model: nn.Module, numerics: str = "onnx") -> tuple[nn.Module, list[str]]:
    """A copy of ``model`` with every quantized layer replaced by a ``QDQLayer`` of ``numerics`` (all checked
    first), and the names of its INT4 code buffers (written as ONNX int4 / uint4)."""
    _check_numerics(numerics)
    layers = {}
    for name, module in model.named_modules():
        for attribute in ("q_bmm_quantizer", "k_bmm_quantizer", "v_bmm_quantizer"):
            quantizer = getattr(module, attribute, None)
            if quantizer is not None and quantizer.is_enabled:
                raise ValueError(f"layer {name!r}: {attribute} is enabled; KV-cache quantization is not exported "
                                 "to ONNX")
        if weight_quantizer(name, module) is None:
            if active_activation_quantizers(module):
                raise ValueError(f"layer {name!r}: quantized activations on an unquantized weight are not "
                                 "exported to ONNX")
            continue
        if not isinstance(module, nn.Linear) and not any(isinstance(module, c) for c in CONVOLUTIONS):
            raise ValueError(f"layer {name!r}: {type(module).__name__} is not exported to ONNX (Linear, Conv1d-3d)")
        layers[name] = QDQLayer(name, module, numerics)
    exported = copy.deepcopy(model)
    for name, layer in layers.items():
        parent, _, child = name.rpartition(".")
        setattr(exported.get_submodule(parent) if parent else exported, child, layer)
    int4 = [f"{name}.weight_codes" for name, layer in layers.items() if layer.int4]
    return exported.eval(), int4


def _as_int4(proto, names: list[str]) -> None:
    """Rewrite the named int8 / uint8 initializers (and their zero points) as ONNX INT4 / UINT4, in place."""
    import onnx
    from onnx import numpy_helper

    wanted = set(names) | {n.replace("weight_codes", "weight_zero_point") for n in names}
    found = set()
    for index, tensor in enumerate(proto.graph.initializer):
        if tensor.name not in wanted:
            continue
        array = numpy_helper.to_array(tensor)
        kind = onnx.TensorProto.INT4 if array.dtype.kind == "i" else onnx.TensorProto.UINT4
        proto.graph.initializer[index].CopyFrom(
            onnx.helper.make_tensor(tensor.name, kind, array.shape, array.flatten().tolist()))
        found.add(tensor.name)
    missing = set(names) - found
    if missing:
        raise RuntimeError(f"torch.onnx did not keep the INT4 code initializers {sorted(missing)}")


def _write(model: nn.Module, sample_input, path: Path, dynamic_shapes, numerics: str) -> None:
    exported, int4 = export_copy(model, numerics)
    args, kwargs = (sample_input, None) if isinstance(sample_input, tuple) else (
        ((), sample_input) if isinstance(sample_input, dict) else ((sample_input,), None))
    program = torch.onnx.export(exported, args, kwargs=kwargs, dynamo=True, opset_version=OPSET,
                                dynamic_shapes=dynamic_shapes, custom_translation_table=TRANSLATIONS,
                                external_data=False, verbose=False)
    proto = program.model_proto
    _as_int4(proto, int4)
    import onnx

    onnx.save(proto, str(path))


def _require_onnx() -> None:
    for package in ("onnx", "onnxscript"):
        try:
            __import__(package)
        except ImportError as error:
            raise ImportError(f"ONNX export needs {package!r}: pip install 'lowbit[onnx]'") from error


def export_onnx(model: nn.Module, sample_input, path: str | Path, *, overwrite: bool = False,
                dynamic_shapes=None, numerics: str = "onnx") -> Path:
    """Write ``model`` (quantized by lowbit) as one ONNX file with Q/DQ nodes (module docstring).

    ``numerics``: "onnx" (scales as Q/DQ steps, the form runtimes fuse into integer kernels; off from lowbit
    by float32 rounding) or "lowbit" (the graph computes lowbit's fake quantization exactly: steps and scales in
    Div nodes around unit-step Q/DQ).

    ``sample_input``: a tensor, a tuple of positional tensors or a dict of keyword tensors, traced once;
    ``dynamic_shapes`` is torch.onnx.export's (e.g. ``{"input_ids": {0: "batch", 1: "sequence"}}``), else
    every shape is the sample's.
    The layers are checked before exporting; the file is written beside ``path`` and renamed into place
    (an existing file is refused unless ``overwrite``). Returns ``path``.
    """
    _check_numerics(numerics)
    _require_onnx()
    with atomic_file(path, overwrite) as staging:
        _write(model, sample_input, staging, dynamic_shapes, numerics)
    return Path(path)


def export_onnx_dir(model: nn.Module, export_dir: str | Path, *, tokenizer=None, overwrite: bool = False,
                    sample_input=None, sample_text: str = "Hello, world", file_name: str = "model.onnx",
                    numerics: str = "onnx") -> Path:
    """``export_onnx`` in the registry's call shape: ``export_dir/file_name`` (plus the tokenizer files);
    the sample input is ``sample_input`` or ``tokenizer(sample_text)``'s input_ids, whose batch and sequence
    dims are then left dynamic."""
    dynamic_shapes = None
    if sample_input is None:
        if tokenizer is None:
            raise ValueError("sample_input=None and tokenizer=None: ONNX export traces the model once; pass one")
        sample_input = {"input_ids": tokenizer(sample_text, return_tensors="pt")["input_ids"]}
        dynamic_shapes = {"input_ids": {0: "batch", 1: "sequence"}}
    _check_numerics(numerics)
    _require_onnx()
    with atomic_directory(export_dir, writer="export_onnx", overwrite=overwrite) as staging:
        _write(model, sample_input, staging / file_name, dynamic_shapes, numerics)
        if tokenizer is not None:
            from lowbit.export.model_files import save_tokenizer

            save_tokenizer(tokenizer, staging)
    return Path(export_dir) / file_name
