"""FP8 E4M3, INT8 and NVFP4 weights on the CPU: a small C kernel that decodes the codes in registers
(``cpu_fp_gemv.c``).

torch has no CPU kernel that reads E4M3 or E2M1 weights (its CPU ``_scaled_mm`` emulates: 15-30x slower than the
bf16 matmul here; its INT4 / INT8 kernels take uniform integer grids, not these), and a dequantization per call
writes and reads back a bf16 weight 4-9x the bytes of the codes. For few rows of activations (decoding: M <=
``GEMV_MAX_ROWS``) this kernel reads each code once and multiplies in float32 (more rows: ``dequantized`` writes
the bf16 weight in one pass, bit for bit ``PackedWeight.dequantize``'s, for torch's matmul):

    fp8:   out[m, n] = (sum_k x[m, k] * e4m3(codes[n, k])) / divisor[n]       (divisor: the weight's scale,
                                                                                times the activation scale for W8A8)
    int8:  out[m, n] = (sum_k x[m, k] * codes[n, k]) / divisor[n]              (divisor: the weight's scale)
    nvfp4: out[m, n] = sum_k x[m, k] * fl32(e2m1(c[n, k]) * fl32(block_scale[n, k / 16] * global_scale))
                                                                               (block_scale: E4M3)

INT8 has torch's ``_weight_int8pack_mm`` (``kernels.cpu``), which streams the codes at 20-28 GB/s on the 2-core
CI machine where this kernel reaches 34-36 (``bench/cpu_decode.py``); it also divides by the float32 scale where
torch's kernel multiplies by ``1 / scale`` rounded to the activation dtype.
E4M3 and E2M1 values are exact in float32, so the weights are the format's own values (NVFP4: the float32
products ``PackedWeight.dequantize`` forms before its cast to the activation dtype; FP8: the codes, the scale
divided out once per output); products and sums round in float32, as torch's bf16 matmul accumulates.

The kernel is compiled at run time, not at install: the first use runs the C compiler (``$CC``, else ``cc``; ~1 s,
``-O3 -march=native -fopenmp``) into ``$LOWBIT_CACHE_DIR`` (default ``~/.cache/lowbit``), keyed by the source,
the compiler and the CPU. Without a compiler, or with ``LOWBIT_CPU_KERNELS=0``, ``available()`` is False and
layers dequantize per call as before (one warning). The library's OpenMP is the one torch loaded (same soname), so
``torch.set_num_threads`` sets its threads too.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from lowbit import formats

if TYPE_CHECKING:
    from lowbit.compress.packed import PackedWeight

SOURCE = Path(__file__).with_name("cpu_fp_gemv.c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-lm")
# Above this many rows, ``dequantized`` + torch's matmul: on one core of the 2-core CI machine (5632 x 2048, best of
# 25 calls) the kernel takes 1.1 / 1.8 / 3.4 ms at 1 / 4 / 8 rows (FP8; NVFP4 1.1 / 1.5 / 2.5), dequantize +
# F.linear 2.8 / 2.8 / 2.9 (2.4 / 2.4 / 2.6); bf16 F.linear 1.5.
GEMV_MAX_ROWS = 4
NVFP4_BLOCK = 16
_POINTER, _INT = ctypes.c_void_p, ctypes.c_int64
_E4M3_TABLE = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()  # torch's own cast
_E2M1_TABLE = formats.decode_e2m1(torch.arange(16, dtype=torch.int32)).float().contiguous()


def available() -> bool:
    """The kernel library compiled and loaded (False without a C compiler or with ``LOWBIT_CPU_KERNELS=0``)."""
    return _library() is not None


@functools.cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get("LOWBIT_CPU_KERNELS", "1") == "0":
        return None
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        warnings.warn("lowbit: no C compiler found ($CC or cc): FP8 / NVFP4 layers dequantize on every CPU call",
                      stacklevel=3)
        return None
    try:
        library = ctypes.CDLL(str(_compiled(compiler)))
    except (OSError, subprocess.CalledProcessError) as error:
        warnings.warn(f"lowbit: could not build {SOURCE.name} ({error}): FP8 / NVFP4 layers dequantize on every "
                      "CPU call", stacklevel=3)
        return None
    library.lowbit_byte_codes_gemv.argtypes = [_POINTER] * 4 + [_INT] * 4 + [_POINTER, ctypes.c_int]
    library.lowbit_has_avx512.argtypes = []
    library.lowbit_nvfp4_gemv.argtypes = [_POINTER] * 5 + [ctypes.c_float] + [_INT] * 3 + [_POINTER]
    library.lowbit_fp8_w8a8_gemv.argtypes = [_POINTER, ctypes.c_float] + [_POINTER] * 3 + [_INT] * 4 + [_POINTER]
    library.lowbit_fp8_dequantize_bf16.argtypes = [_POINTER] * 3 + [_INT] * 3 + [_POINTER]
    library.lowbit_nvfp4_dequantize_bf16.argtypes = [_POINTER] * 4 + [ctypes.c_float] + [_INT] * 2 + [_POINTER]
    return library


def _compiled(compiler: str) -> Path:
    """The shared library for this source, compiler and CPU, built once (written atomically) into the cache."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), version, " ".join(FLAGS), platform.machine(),
                                    _cpu_flags()]).encode()).hexdigest()[:16]
    folder = Path(os.environ.get("LOWBIT_CACHE_DIR", Path.home() / ".cache" / "lowbit"))
    target = folder / f"cpu_fp_gemv_{key}.so"
    if not target.exists():
        folder.mkdir(parents=True, exist_ok=True)
        handle, scratch = tempfile.mkstemp(suffix=".so", dir=folder)
        os.close(handle)
        try:
            subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", scratch], check=True, capture_output=True)
            os.replace(scratch, target)
        finally:
            Path(scratch).unlink(missing_ok=True)
    return target


def _cpu_flags() -> str:
    """The CPU's feature flags (``-march=native`` builds for them), '' where /proc/cpuinfo is absent."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    return next((line for line in lines if line.startswith("flags")), "")


def fp8_accepts(packed: PackedWeight) -> bool:
    """An E4M3 weight with one scale per tensor or per output row."""
    fmt = packed.format
    return fmt.kind == "float" and fmt.num_bits == (4, 3) and fmt.block_size is None


def nvfp4_accepts(packed: PackedWeight) -> bool:
    return packed.format.kind == "nvfp4" and packed.format.block_size == NVFP4_BLOCK


def _divisor(packed: PackedWeight) -> torch.Tensor:
    """float32 (N,) or (1,): the weight's scale, one per output row or per tensor (``w = codes / scale``)."""
    return packed.scale.float().reshape(-1).contiguous()


def fp8_operands(packed: PackedWeight) -> tuple:
    """(codes uint8 (N, K), divisor float32 (N,) or (1,)) for ``fp8_rows``: the codes viewed as bytes (no copy)
    and the weight's scale."""
    return packed.codes.view(torch.uint8), _divisor(packed)


def nvfp4_operands(packed: PackedWeight) -> tuple:
    """(codes uint8 (N, K / 2), block scales viewed as uint8 (N, K / 16), global scale float32 ()) for
    ``nvfp4_rows``: the stored tensors, no copy; the kernel forms each block's ``fl32(block_scale * global)``."""
    return packed.codes, packed.scale.view(torch.uint8), packed.global_scale.float().reshape(())


def byte_code_rows(x: torch.Tensor, codes: torch.Tensor, divisor: torch.Tensor, int8: bool) -> torch.Tensor:
    """x (M, K) -> float32 (M, N) by the fp8 formula of the module docstring, or with ``int8`` the int8 one (M <=
    ``GEMV_MAX_ROWS``); through the ``lowbit::cpu_byte_code_rows`` custom op under ``torch.compile``, directly in
    eager mode (no dispatch cost)."""
    if torch.compiler.is_compiling():
        return torch.ops.lowbit.cpu_byte_code_rows(x, codes, divisor, int8)
    return _byte_code_rows(x, codes, divisor, int8)


def _byte_code_rows(x: torch.Tensor, codes: torch.Tensor, divisor: torch.Tensor, int8: bool) -> torch.Tensor:
    rows = x.float().contiguous()
    m, k = rows.shape
    out = torch.empty(m, codes.shape[0], dtype=torch.float32)
    _library().lowbit_byte_codes_gemv(rows.data_ptr(), codes.data_ptr(), _E4M3_TABLE.data_ptr(), divisor.data_ptr(),
                                      divisor.numel() > 1, m, codes.shape[0], k, out.data_ptr(), int8)
    return out


def fp8_rows(x: torch.Tensor, codes: torch.Tensor, divisor: torch.Tensor) -> torch.Tensor:
    """``byte_code_rows`` of E4M3 codes (uint8 view)."""
    return byte_code_rows(x, codes, divisor, False)


def int8_available() -> bool:
    """The kernel library loaded with its AVX-512 path (without it torch's ``_weight_int8pack_mm`` is faster than the
    scalar loop, and INT8 stays there)."""
    return available() and bool(_library().lowbit_has_avx512())


def int8_operands(packed: PackedWeight) -> tuple:
    """(codes int8 (N, K), divisor float32 (N,) or (1,)) for ``int8_rows``: the stored codes (no copy) and the
    weight's scale (``w = codes / scale``)."""
    return packed.codes, _divisor(packed)


def int8_rows(x: torch.Tensor, codes: torch.Tensor, divisor: torch.Tensor) -> torch.Tensor:
    """``byte_code_rows`` of signed INT8 codes."""
    return byte_code_rows(x, codes, divisor, True)


def fp8_w8a8_operands(packed: PackedWeight, activation_amax: torch.Tensor | None) -> tuple:
    """(codes, divisor, activation step) for ``fp8_w8a8_rows``: with a static per-tensor ``activation_amax`` the
    step and scale of ``formats.quantize_fp`` (``amax / 448`` forms the codes, ``448 / amax`` divides them),
    computed once, the scale folded into the divisor; None: dynamic per-row scales, formed per call."""
    codes, divisor = fp8_operands(packed)
    if activation_amax is None:
        return codes, divisor, None
    scale, step = formats.scale_and_step(activation_amax.float().reshape(()), formats.E4M3.max_value)
    return codes, (divisor * scale).contiguous(), step


def fp8_w8a8_rows(x: torch.Tensor, codes: torch.Tensor, divisor: torch.Tensor,
                  activation_step: torch.Tensor | None) -> torch.Tensor:
    """FP8 W8A8, x (M, K) -> float32 (M, N): x's E4M3 values (``formats.quantize_fp``'s rounding of ``x /
    x_step``; ``x_step`` the static one, or per row from each row's max |x|) through ``fp8_rows``:

        out[m, n] = (sum_k codes_x[m, k] * codes_w[n, k]) / (w_scale[n] * x_scale[m])

    Products of two E4M3 values are exact in float32; the sums round in float32 (as ``torch._scaled_mm``)."""
    if activation_step is not None:
        if torch.compiler.is_compiling():
            return fp8_rows(formats.round_to_format(x.float() / activation_step, formats.E4M3), codes, divisor)
        return _static_w8a8_rows(x, codes, divisor, activation_step)
    values, scale = formats.quantize_fp(x, x.detach().abs().amax(dim=-1, keepdim=True), formats.E4M3)
    return fp8_rows(values, codes, divisor) / scale


def _static_w8a8_rows(x: torch.Tensor, codes: torch.Tensor, divisor: torch.Tensor,
                      activation_step: torch.Tensor) -> torch.Tensor:
    """``fp8_w8a8_rows`` with a static step in one C call: the kernel rounds ``x / step`` to E4M3 itself (the rule
    of ``formats.minifloat``; tests compare it with torch's float8 cast)."""
    rows = x.float().contiguous()
    m, k = rows.shape
    out = torch.empty(m, codes.shape[0], dtype=torch.float32)
    if _library().lowbit_fp8_w8a8_gemv(rows.data_ptr(), activation_step.item(), codes.data_ptr(),
                                       _E4M3_TABLE.data_ptr(), divisor.data_ptr(), divisor.numel() > 1, m,
                                       codes.shape[0], k, out.data_ptr()):
        raise MemoryError(f"lowbit_fp8_w8a8_gemv: no memory for {m} x {k} activation values")
    return out


def nvfp4_rows(x: torch.Tensor, codes: torch.Tensor, block_scale: torch.Tensor,
               global_scale: torch.Tensor) -> torch.Tensor:
    """x (M, K) -> float32 (M, N) by the nvfp4 formula of the module docstring (M <= ``GEMV_MAX_ROWS``); the
    ``lowbit::cpu_nvfp4_rows`` custom op under ``torch.compile``, as ``fp8_rows``."""
    if torch.compiler.is_compiling():
        return torch.ops.lowbit.cpu_nvfp4_rows(x, codes, block_scale, global_scale)
    return _nvfp4_rows(x, codes, block_scale, global_scale)


def _nvfp4_rows(x: torch.Tensor, codes: torch.Tensor, block_scale: torch.Tensor,
                global_scale: torch.Tensor) -> torch.Tensor:
    rows = x.float().contiguous()
    m, k = rows.shape
    out = torch.empty(m, codes.shape[0], dtype=torch.float32)
    _library().lowbit_nvfp4_gemv(rows.data_ptr(), codes.data_ptr(), _E2M1_TABLE.data_ptr(), block_scale.data_ptr(),
                                 _E4M3_TABLE.data_ptr(), global_scale.item(), m, codes.shape[0], k, out.data_ptr())
    return out


# The ops for torch.compile; eager calls run the functions themselves: an op's dispatch adds ~8 us of host time to
# every call (measured on the CI-class machine), as much as the kernel takes on a small layer.
_byte_code_rows_op = torch.library.custom_op("lowbit::cpu_byte_code_rows", _byte_code_rows, mutates_args=(),
                                             device_types="cpu")
_nvfp4_rows_op = torch.library.custom_op("lowbit::cpu_nvfp4_rows", _nvfp4_rows, mutates_args=(), device_types="cpu")


@_byte_code_rows_op.register_fake
def _(x, codes, divisor, int8):
    return x.new_empty(x.shape[0], codes.shape[0], dtype=torch.float32)


@_nvfp4_rows_op.register_fake
def _(x, codes, block_scale, global_scale):
    return x.new_empty(x.shape[0], codes.shape[0], dtype=torch.float32)


def dequantized(packed: PackedWeight, operands: tuple, dtype: torch.dtype) -> torch.Tensor:
    """``packed.dequantize(dtype)`` bit for bit (N, K), for many-row products: bfloat16 written by the C kernel
    in one pass over the codes (``operands``: ``fp8_operands`` / ``nvfp4_operands``), other dtypes by torch."""
    if dtype != torch.bfloat16 or torch.compiler.is_compiling():
        return packed.dequantize(dtype)
    n, k = packed.shape
    out = torch.empty(n, k, dtype=torch.bfloat16)
    if fp8_accepts(packed):
        codes, divisor = operands
        _library().lowbit_fp8_dequantize_bf16(codes.data_ptr(), _E4M3_TABLE.data_ptr(), divisor.data_ptr(),
                                              divisor.numel() > 1, n, k, out.data_ptr())
    else:
        codes, block_scale, global_scale = operands
        _library().lowbit_nvfp4_dequantize_bf16(codes.data_ptr(), _E2M1_TABLE.data_ptr(), block_scale.data_ptr(),
                                                _E4M3_TABLE.data_ptr(), global_scale.item(), n, k, out.data_ptr())
    return out


def weight_only_kernel(packed: PackedWeight) -> tuple | None:
    """(rows function, its operands after x) for this weight, or None (other format, or no kernel library)."""
    if not packed.codes.is_contiguous() or not available():
        return None
    if fp8_accepts(packed):
        return fp8_rows, fp8_operands(packed)
    if nvfp4_accepts(packed):
        return nvfp4_rows, nvfp4_operands(packed)
    return None
