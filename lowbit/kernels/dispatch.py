"""Choose the kernel for ``x @ dequantize(W).T + bias`` from the device, the weight format and M.

| device | weight                                        | rows M                   | kernel                           |
|--------|-----------------------------------------------|--------------------------|----------------------------------|
| CUDA   | INT4 sym / asym, groups of a multiple of 32,  | <= 4                     | ``_weight_int4pack_mm``          |
|        | N % 8 == 0, bf16 (``kernels.cuda_int4``)      | otherwise                | the Triton rows below            |
| CUDA   | INT<=4 sym / asym (groups >= 16), NVFP4 (16); | 1, long K (prefers_gemv) | Triton GEMV on CUDA cores        |
|        | K % 128 == 0; bf16 / fp16 activations         | other rows < 128         | Triton W4A16 on tensor cores     |
|        |                                               | >= DEQUANTIZE_FIRST_ROWS | Triton dequantize, then cuBLAS   |
| CUDA   | INT8 sym, per channel / per tensor;           | any                      | codes cast to x's dtype, cuBLAS, |
|        | bf16 / fp16 activations                       |                          | then times the row multipliers   |
| CPU    | INT4 sym / asym, groups of a multiple of 32,  | any                      | ``_weight_int4pack_mm_for_cpu``  |
|        | N % 16 == 0 (``kernels.cpu``)                 |                          |                                  |
| CPU    | INT8 sym, per channel / per tensor            | <= GEMV_MAX_ROWS (4)     | ``cpu_fp`` C kernel              |
|        |                                               | more; no C / AVX-512     | ``_weight_int8pack_mm``          |
| CPU    | FP8 E4M3 per channel / tensor, NVFP4 (16);    | <= GEMV_MAX_ROWS (4)     | ``cpu_fp`` C kernel (codes       |
|        | a C compiler at run time (``kernels.cpu_fp``) |                          | decoded in registers)            |
|        |                                               | more rows                | ``cpu_fp.dequantized``, F.linear |
| any    | anything else                                 | any                      | formats dequantize, F.linear     |

``prepare_linear`` makes this choice once, for one device and activation dtype, and returns a
``PreparedLinear``: the kernel with its operands already derived (the CPU INT4 kernel's own code layout and
scale-and-zero table, INT8 multipliers, Triton arguments), so a call is one op plus two reshapes.
``weight_only_linear`` decides on every call (the path of modules not prepared, and of gradients).
On CUDA, eager calls of at most ``eager_graphs.MAX_ROWS`` rows of a prepared Triton, FP8, INT8 or dequantize-first layer
replay a CUDA graph of the call (``kernels.eager_graphs``: same kernels, one launch; not for torch's INT4 op).

The fallback and the dequantize-first path multiply exactly the fake-quant weights with the same
``F.linear``, so their outputs equal the fake-quant model's bit for bit; the fused Triton kernels multiply the
same weight values (exactly: codes times scales) but round only their float32 sums, so they match a float64
product to the output's rounding; torch's INT4 / INT8 kernels and the CUDA INT8 path take scales rounded once to
the activation dtype (``kernels.cpu``, ``kernels.cuda_int4``); the CUDA INT8 path also rounds ``x @ codes.T`` to
that dtype before the multipliers (two roundings of 2^-9 relative in bf16 where dequantize-first has one per
weight and one of the sum); the CPU C kernel (FP8, INT8, NVFP4 at few rows) forms exact products of the codes'
values, sums in float32, divides by the float32 scale and rounds once to the activation dtype. Why not
dequantize-first for INT8 on CUDA: its float32 decode moves ~29 bytes a weight
(bf16 eager decode 0.24x on the H100, bench/results/e2e_cuda_2026-12-07b.md); the cast moves 3, cuBLAS 2 more.
The Triton kernels run as custom ops (``kernels.ops``), imported on first CUDA use.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from lowbit.kernels import cpu, cpu_fp, cuda_int4, eager_graphs, ops

if TYPE_CHECKING:
    from lowbit.compress.packed import PackedWeight

KERNEL_K_MULTIPLE = 128
NVFP4_BLOCK = 16
SMALLEST_GROUP = 16
ACTIVATION_DTYPES = (torch.bfloat16, torch.float16)
CPU_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@functools.cache
def triton_w4():
    """The Triton kernel module, or None when triton is not installed."""
    try:
        from lowbit.kernels import triton_w4 as module
    except ImportError:
        return None
    return module


@functools.cache
def has_triton() -> bool:
    """The ``lowbit::`` custom ops (``kernels.ops``) run Triton kernels."""
    return importlib.util.find_spec("triton") is not None


def triton_arguments(packed: PackedWeight) -> dict | None:
    """Keyword arguments of ``triton_w4.w4_matmul`` for this weight, or None if no kernel applies."""
    fmt = packed.format
    k = packed.shape[1]
    if not fmt.packs_nibbles or k % KERNEL_K_MULTIPLE or packed.scale.shape[0] != packed.shape[0]:
        return None
    if not packed.codes.is_contiguous() or not packed.scale.is_contiguous():
        return None
    group_size = fmt.block_size or k
    if group_size < SMALLEST_GROUP or group_size & (group_size - 1) and group_size != k:
        return None  # the kernels tile K in steps of 128 split into power-of-two groups (or one group per row)
    if fmt.kind == "int":
        return dict(kind="int_divide", group_size=group_size, zero_offset=fmt.code_offset)
    if fmt.kind == "int_asym":
        return dict(kind="int_affine", group_size=group_size, zero_point=packed.zero_point)
    if fmt.kind == "nvfp4" and group_size == NVFP4_BLOCK:
        return dict(kind="nvfp4", group_size=group_size, global_scale=packed.global_scale)
    return None


def _w4_operands(packed: PackedWeight) -> tuple:
    """``lowbit::w4_linear``'s arguments after x (bias excepted) for a weight ``triton_arguments`` accepts."""
    arguments = triton_arguments(packed)
    return (packed.codes, packed.scale, arguments.get("zero_point"), arguments.get("global_scale"),
            arguments["kind"], arguments["group_size"], arguments.get("zero_offset", 0))


def _cuda_w4(x: torch.Tensor, codes, scale, zero_point, global_scale, kind, group_size, zero_offset, bias=None):
    return ops.w4_linear(x, codes, scale, zero_point, global_scale, bias, kind, group_size, zero_offset)


def _cuda_int4(x: torch.Tensor, kernel_codes, scale_and_zero, group_size, *w4_operands, bias=None):
    if x.shape[0] > cuda_int4.MAX_ROWS:
        return _cuda_w4(x, *w4_operands, bias=bias)
    out = cuda_int4.int4_linear(x, kernel_codes, scale_and_zero, group_size)
    return out if bias is None else out + bias


def _cpu_int4(x: torch.Tensor, kernel_codes, scale_and_zero, group_size, bias=None):
    out = cpu.int4_linear(x, kernel_codes, scale_and_zero, group_size)
    return out if bias is None else out + bias


def _cpu_int8(x: torch.Tensor, codes, scales, divisor, bias=None):
    if divisor is not None and x.shape[0] <= cpu_fp.GEMV_MAX_ROWS:
        out = cpu_fp.int8_rows(x, codes, divisor).to(x.dtype)
    else:
        out = cpu.int8_linear(x, codes, scales)
    return out if bias is None else out + bias


def _cuda_int8(x: torch.Tensor, codes, scales, bias=None):
    out = F.linear(x, codes.to(x.dtype)) * scales  # |codes| <= 127: exact in bf16 / fp16
    return out if bias is None else out + bias


def _dequantize_first(x: torch.Tensor, packed: PackedWeight, bias=None):
    return F.linear(x, packed.dequantize(x.dtype), bias)


def _cpu_fp(x: torch.Tensor, rows_function, operands, packed, bias=None):
    if x.shape[0] > cpu_fp.GEMV_MAX_ROWS:
        return F.linear(x, cpu_fp.dequantized(packed, operands, x.dtype), bias)
    out = rows_function(x, *operands).to(x.dtype)
    return out if bias is None else out + bias


@dataclass(frozen=True)
class PreparedLinear:
    """``x (..., K) -> (..., N)``: ``function(rows (M, K), *operands, bias=bias)`` for activations of
    ``dtype`` on ``device`` (``serves``); the operands were derived once by ``prepare_linear``. ``graphs``: where
    set, the calls ``eager_graphs.takes_graph`` accepts replay a CUDA graph of the call (same output bits)."""

    function: Callable[..., torch.Tensor]
    operands: tuple
    device: torch.device
    dtype: torch.dtype
    out_features: int
    graphs: eager_graphs.EagerGraphs | None = field(default=None, compare=False, repr=False)

    def serves(self, x: torch.Tensor) -> bool:
        return x.dtype == self.dtype and x.device == self.device

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        if self.graphs is not None and eager_graphs.takes_graph(rows, bias):
            out = self.graphs.run(self.function, self.operands, rows, bias)
        else:
            out = self.function(rows, *self.operands, bias=bias)
        return out.reshape(*x.shape[:-1], self.out_features)


def prepare_linear(packed: PackedWeight, device: torch.device, dtype: torch.dtype) -> PreparedLinear:
    """The kernel of the module docstring's table for activations of ``dtype`` on ``device``, with its operands
    derived from ``packed`` (which must be on ``device``). On the CPU the INT4 kernel's codes are a second copy
    of the packed codes (as many bytes), kept beside the canonical ones that save and export read."""
    device = torch.device(device)
    n = packed.shape[0]
    if device.type == "cuda" and dtype in ACTIVATION_DTYPES and triton_arguments(packed) and has_triton():
        if dtype == torch.bfloat16 and cuda_int4.inner_k_tiles(packed):  # one aten op at <= 4 rows: no graphs
            return PreparedLinear(_cuda_int4, (*cuda_int4.operands(packed), *_w4_operands(packed)), device, dtype, n)
        return PreparedLinear(_cuda_w4, _w4_operands(packed), device, dtype, n, eager_graphs.EagerGraphs())
    if device.type == "cuda" and dtype in ACTIVATION_DTYPES and cpu.int8_accepts(packed.format):
        operands = (packed.codes, cpu.int8_scales(packed, dtype))
        return PreparedLinear(_cuda_int8, operands, device, dtype, n, eager_graphs.EagerGraphs())
    if device.type == "cpu" and dtype in CPU_DTYPES:
        if cpu.int4_group_size(packed.format, packed.shape):
            return PreparedLinear(_cpu_int4, cpu.int4_operands(packed, dtype), device, dtype, n)
        if cpu.int8_accepts(packed.format):
            c_kernel = packed.codes.is_contiguous() and cpu_fp.int8_available()
            divisor = cpu_fp.int8_operands(packed)[1] if c_kernel else None
            return PreparedLinear(_cpu_int8, (packed.codes, cpu.int8_scales(packed, dtype), divisor), device, dtype,
                                  n)
        kernel = cpu_fp.weight_only_kernel(packed)
        if kernel is not None:
            return PreparedLinear(_cpu_fp, (*kernel, packed), device, dtype, n)
    return PreparedLinear(_dequantize_first, (packed,), device, dtype, n, eager_graphs.for_device(device))


def weight_only_linear(x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """``x (..., K) @ packed.dequantize(x.dtype).T + bias`` -> (..., N): CUDA rows of the table above (Triton),
    else dequantize and ``F.linear``."""
    if x.is_cuda and x.dtype in ACTIVATION_DTYPES and triton_arguments(packed) and has_triton():
        rows = _cuda_w4(x.reshape(-1, x.shape[-1]), *_w4_operands(packed), bias=bias)
        return rows.reshape(*x.shape[:-1], packed.shape[0])
    return _dequantize_first(x, packed, bias)
