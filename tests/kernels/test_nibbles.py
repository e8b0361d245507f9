"""The inline PTX of lowbit.kernels.nibbles, run by a small PTX emulator on the CPU, against float64 values.

Every code 0..15 at every nibble position, every zero point, and every finite E4M3 block scale: the
16-bit pairs the PTX builds must be exactly ``code - zero`` and ``e2m1(code) * scale / 128``. (The GPU
tests run the same PTX for real; this one runs anywhere the triton package is installed.)
"""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

nibbles = pytest.importorskip("lowbit.kernels.nibbles", reason="needs the triton package")

E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
HALF = {"bf16x2": torch.bfloat16, "f16x2": torch.float16}


def _half_bits_to_float(bits: int, dtype: torch.dtype) -> float:
    return torch.tensor([bits & 0xFFFF], dtype=torch.int32).to(torch.int16).view(dtype).float().item()


def _float_to_half_bits(value: float, dtype: torch.dtype) -> int:
    return torch.tensor([value], dtype=torch.float32).to(dtype).view(torch.int16).item() & 0xFFFF


def _packed(op, a: int, b: int, dtype: torch.dtype) -> int:
    """A packed 16-bit operation, each half computed in float32 and rounded once (exact for one op)."""
    out = 0
    for shift in (0, 16):
        x = _half_bits_to_float(a >> shift, dtype)
        y = _half_bits_to_float(b >> shift, dtype)
        out |= _float_to_half_bits(op(x, y), dtype) << shift
    return out


def _f32_bits(value: float) -> int:
    return struct.unpack("<I", struct.pack("<f", value))[0]


def _f32(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<I", bits & 0xFFFFFFFF))[0]


def _prmt(a: int, b: int, selector: int) -> int:
    data = (b << 32) | a
    out = 0
    for k in range(4):
        sel = (selector >> (4 * k)) & 0xF
        byte = (data >> (8 * (sel & 7))) & 0xFF
        if sel & 8:
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << (8 * k)
    return out


def _lop3(a: int, b: int, c: int, lut: int) -> int:
    out = 0
    for bit in range(32):
        index = (((a >> bit) & 1) << 2) | (((b >> bit) & 1) << 1) | ((c >> bit) & 1)
        out |= ((lut >> index) & 1) << bit
    return out


def run_ptx(source: str, operands: dict[str, int]) -> dict[str, int]:
    """Execute the straight-line PTX subset that nibbles.py emits; registers hold 32-bit ints."""
    regs = dict(operands)

    def value(token: str) -> int:
        token = token.strip()
        if token.startswith("0f"):
            return int(token[2:], 16)
        if token.startswith("0x") or token.isdigit():
            return int(token, 0)
        return regs[token]

    for line in source.splitlines():
        line = line.strip().rstrip(";")
        if not line or line in "{}" or line.startswith(".reg"):
            continue
        op, _, rest = line.partition(" ")
        args = [t.strip() for t in rest.split(",")] if "{" not in rest else None
        if op == "mov.b32" and args is None:  # pack / unpack 16-bit halves
            left, right = rest.split(",", 1) if not rest.startswith("{") else rest.rsplit(",", 1)
            if rest.startswith("{"):
                low, high = [t.strip() for t in left.strip("{} ").split(",")]
                word = value(right)
                regs[low], regs[high] = word & 0xFFFF, (word >> 16) & 0xFFFF
            else:
                low, high = [t.strip() for t in right.strip().strip("{}").split(",")]
                regs[left.strip()] = (regs[low] & 0xFFFF) | ((regs[high] & 0xFFFF) << 16)
            continue
        d, *src = args
        if op in ("mov.b32",):
            regs[d] = value(src[0]) & 0xFFFFFFFF
        elif op == "prmt.b32":
            regs[d] = _prmt(value(src[0]), value(src[1]), value(src[2]))
        elif op == "lop3.b32":
            regs[d] = _lop3(value(src[0]), value(src[1]), value(src[2]), value(src[3]))
        elif op == "shr.u32":
            regs[d] = value(src[0]) >> value(src[1])
        elif op == "shl.b32":
            regs[d] = (value(src[0]) << value(src[1])) & 0xFFFFFFFF
        elif op == "and.b32":
            regs[d] = value(src[0]) & value(src[1])
        elif op.startswith(("sub.rn.", "mul.rn.")) and op.endswith("x2"):
            fn = (lambda x, y: x - y) if op.startswith("sub") else (lambda x, y: x * y)
            regs[d] = _packed(fn, value(src[0]), value(src[1]), HALF[op.split(".")[-1]])
        elif op == "cvt.rn.f16x2.e4m3x2":
            word = value(src[0])
            low, high = (_e4m3((word >> shift) & 0xFF) for shift in (0, 8))
            regs[d] = _float_to_half_bits(low, torch.float16) | (_float_to_half_bits(high, torch.float16) << 16)
        elif op == "cvt.f32.f16":
            regs[d] = _f32_bits(_half_bits_to_float(value(src[0]), torch.float16))
        elif op == "mul.f32":
            regs[d] = _f32_bits(np.float32(_f32(value(src[0]))) * np.float32(_f32(value(src[1]))))
        elif op in ("cvt.rn.bf16x2.f32", "cvt.rn.f16x2.f32"):
            dtype = torch.bfloat16 if "bf16" in op else torch.float16
            high, low = (_float_to_half_bits(_f32(value(token)), dtype) for token in src)
            regs[d] = (high << 16) | low  # cvt packs a into the upper half
        else:
            raise NotImplementedError(op)
    return regs


def _pairs(regs: dict[str, int], dtype: torch.dtype) -> list[tuple[float, float]]:
    return [(_half_bits_to_float(regs[f"${i}"], dtype), _half_bits_to_float(regs[f"${i}"] >> 16, dtype))
            for i in range(8)]


def _words(generator: torch.Generator, count: int) -> list[int]:
    """Words whose nibbles cover every code at every position."""
    base = [sum(((c + p) % 16) << (4 * p) for p in range(8)) for c in range(16)]
    extra = torch.randint(0, 2**32, (count,), generator=generator, dtype=torch.int64).tolist()
    return base + extra


@pytest.mark.parametrize("sub, dtype", [("bf16x2", torch.bfloat16), ("f16x2", torch.float16)])
def test_int_ptx_is_code_minus_zero(sub, dtype):
    source = nibbles._int_asm(sub, 0x43004300 if dtype == torch.bfloat16 else 0x64006400)
    magic = 0x4300 if dtype == torch.bfloat16 else 0x6400
    words = _words(torch.Generator().manual_seed(0), 8)
    for zero_a, zero_b in [(8, 8), (0, 15), (15, 3), (7, 0)]:
        for a, b in zip(words, words[::-1], strict=True):
            zeros = {"$10": (magic + zero_a) * 65537, "$11": (magic + zero_b) * 65537}
            regs = run_ptx(source, {"$8": a, "$9": b, **zeros})
            for i, (low, high) in enumerate(_pairs(regs, dtype)):
                assert low == ((a >> 4 * i) & 15) - zero_a
                assert high == ((b >> 4 * i) & 15) - zero_b


def _e4m3(byte: int) -> float:
    return torch.tensor([byte], dtype=torch.uint8).view(torch.float8_e4m3fn).double().item()


def _e2m1(code: int) -> float:
    return (-1.0 if code & 8 else 1.0) * E2M1[code & 7]


@pytest.mark.parametrize("mul, shift, exponent, dtype", [("bf16x2", 6, 119, torch.bfloat16),
                                                          ("f16x2", 3, 7, torch.float16)])
def test_e2m1_ptx_is_code_times_block_scale(mul, shift, exponent, dtype):
    source = nibbles._e2m1_asm(mul, magnitude_shift=shift, scale_exponent=exponent)
    words = _words(torch.Generator().manual_seed(1), 0)
    scales = [b for b in range(256) if b & 0x7F != 0x7F]  # every finite E4M3 value
    for index, byte in enumerate(scales):
        a, b = words[index % 16], words[(index * 7 + 3) % 16]
        other = scales[(index * 37) % len(scales)]
        low_word = byte | (other << 24)  # scale bytes 0 and 3
        high_word = (other << 8) | (byte << 16)  # scale bytes 5 and 6
        regs = run_ptx(source, {"$8": a, "$9": b, "$10": low_word, "$11": low_word, "$12": high_word,
                                "$13": high_word, "$14": 0, "$15": 6})
        for i, (low, high) in enumerate(_pairs(regs, dtype)):
            assert low == _e2m1((a >> 4 * i) & 15) * _e4m3(byte) / 128
            assert high == _e2m1((b >> 4 * i) & 15) * _e4m3(byte) / 128


def test_sixteen_plus_ptx_is_sixteen_plus_code():
    words = _words(torch.Generator().manual_seed(2), 16)
    for word in words:
        regs = run_ptx(nibbles._sixteen_plus_asm(), {"$8": word})
        assert [_f32(regs[f"${i}"]) for i in range(8)] == [16.0 + ((word >> 4 * i) & 15) for i in range(8)]


def test_e2m1_float_ptx_is_code_over_2_14():
    words = _words(torch.Generator().manual_seed(3), 16)
    for word in words:
        regs = run_ptx(nibbles._e2m1_float_asm(), {"$8": word})
        assert [_f32(regs[f"${i}"]) for i in range(8)] == [_e2m1((word >> 4 * i) & 15) / 2**14 for i in range(8)]
