"""Packed 4-bit codes -> exact 16-bit tensor-core operands, eight K positions per 32-bit word (Triton jit).

Codes reach the kernels as int32 words (``lowbit.compress.packing`` viewed little-endian): word ``j`` of
a row holds the K elements ``8 j .. 8 j + 7``, element ``8 j + i`` in bits ``4 i .. 4 i + 3``. Each
helper takes a (rows, W) tile of words and returns eight (rows, W) tiles of 16-bit values, tile ``i``
holding element ``8 j + i`` at column ``j``: the operand of ``tl.dot`` for the K indices ``{8 j + i}``.

With inline PTX (``USE_ASM``) one instance handles two words of the thread (in the dot-operand layout
usually the neighbours j, j + 1) and builds each output register (a 16-bit pair) with 2-3 integer
instructions and one packed 16-bit float instruction:

- integers, ``code - zero``: ``prmt`` puts the low halves of both words in one register (and the high
  halves in another); ``(r >> 4 i) & 0x000F000F | magic`` then gives the pair ``magic + code`` exactly
  (bf16 ``0x4300`` = 128, fp16 ``0x6400`` = 1024, where the 4 code bits are the low mantissa bits),
  and one ``sub.{bf16x2,f16x2}`` of ``magic + zero`` leaves ``code - zero``, exact (|code - zero| <= 15).
- E2M1 (NVFP4): the code's sign goes to bit 15 and its 3 exponent/mantissa bits under the 16-bit
  format's exponent, which reads as ``e2m1 * 2**-126`` (bf16) or ``e2m1 * 2**-14`` (fp16), 0.5 being a
  subnormal; one packed multiply by the block scale times ``2**119`` (bf16) or ``2**7`` (fp16) gives
  ``e2m1 * block_scale * 2**-7`` (products of <= 2 and <= 4 significant bits: exact, normal numbers for
  every E4M3 scale; max 6 * 448 / 128 = 21). The caller multiplies the sum by ``2**7 * global_scale``.

Without inline PTX (Triton's interpreter) the same values come from plain integer and float32 math.
"""

from __future__ import annotations

import triton
import triton.language as tl

E2M1_RESCALE = tl.constexpr(128.0)  # e2m1_codes returns e2m1 * block_scale / E2M1_RESCALE


def _int_asm(sub: str, magic: int) -> str:
    """PTX for 8 pairs ``code - zero``: $8, $9 two words; $10, $11 their ``magic + zero`` (``zero_pairs``)."""
    lines = ["{", ".reg .b32 lo, hi, t, mask, magic, zero;",
             "prmt.b32 lo, $8, $9, 0x5410;", "prmt.b32 hi, $8, $9, 0x7632;", "prmt.b32 zero, $10, $11, 0x5410;",
             "mov.b32 mask, 0x000F000F;", f"mov.b32 magic, {magic:#010x};"]
    for i in range(8):
        source, shift = ("lo", 4 * i) if i < 4 else ("hi", 4 * (i - 4))
        if shift:
            lines.append(f"shr.u32 t, {source}, {shift};")
        lines.append(f"lop3.b32 ${i}, {'t' if shift else source}, mask, magic, 0xea;")  # (a & b) | c
    lines += [f"sub.rn.{sub} ${i}, ${i}, zero;" for i in range(8)]
    return "\n".join(lines + ["}"])


def _e2m1_asm(mul: str, magnitude_shift: int, scale_exponent: int) -> str:
    """PTX for 8 pairs ``e2m1 * block_scale / 128``: $8, $9 two words; $10, $11 and $12, $13 the low and high
    int32 of their rows' 8 block-scale bytes; $14, $15 the byte (0..7) each word's block scale sits at.

    The scale pair is ``fp32(scale) * 2**scale_exponent`` rounded to the 16-bit type (exact).
    """
    cvt = "cvt.rn.bf16x2.f32" if mul == "bf16x2" else "cvt.rn.f16x2.f32"
    factor = f"0f{(127 + scale_exponent) << 23:08X}"
    lines = ["{", ".reg .b32 lo, hi, q, t, t0, t1, mask, sign, pair, halves;", ".reg .b16 s8, unused, h0, h1;",
             ".reg .f32 f0, f1;",
             "prmt.b32 lo, $8, $9, 0x5410;", "prmt.b32 hi, $8, $9, 0x7632;",
             "prmt.b32 t0, $10, $12, $14;", "prmt.b32 t1, $11, $13, $15;",  # each word's scale byte
             "prmt.b32 t, t0, t1, 0x0040;", "mov.b32 {s8, unused}, t;",
             "cvt.rn.f16x2.e4m3x2 halves, s8;", "mov.b32 {h0, h1}, halves;",
             "cvt.f32.f16 f0, h0;", "cvt.f32.f16 f1, h1;", f"mul.f32 f0, f0, {factor};", f"mul.f32 f1, f1, {factor};",
             f"{cvt} pair, f1, f0;",  # a -> upper half, b -> lower half
             f"mov.b32 mask, {(0x7 << (15 - 3 - magnitude_shift)) * 0x10001:#010x};", "mov.b32 sign, 0x80008000;"]
    for i in range(8):
        source, position = ("lo", i) if i < 4 else ("hi", i - 4)
        shift = 12 - 4 * position  # the code's sign bit to bit 15 (and 31)
        lines.append(f"shl.b32 q, {source}, {shift};" if shift else f"mov.b32 q, {source};")
        lines += [f"shr.u32 t, q, {magnitude_shift};", "and.b32 t, t, mask;",
                  f"lop3.b32 ${i}, q, sign, t, 0xea;",  # (q & sign) | t
                  f"mul.rn.{mul} ${i}, ${i}, pair;"]
    return "\n".join(lines + ["}"])


def _sixteen_plus_asm() -> str:
    """PTX for the float32 ``16 + code_i`` of the 8 codes of word $8 (outputs $0..$7): the code shifted to
    mantissa bits 19..22 under the exponent of 16 (``0x41800000``), one shift and one ``lop3`` each.
    (Two codes per shift, the second at bits 15..18 as ``16 + code / 16``, needs a second accumulator and
    per-step offset sums: it measured 8% slower, bench/results/kernels_h100_notes.md.)"""
    lines = ["{", ".reg .b32 t;"]
    for i in range(8):
        shift = 19 - 4 * i
        lines.append(f"shl.b32 t, $8, {shift};" if shift > 0 else f"shr.u32 t, $8, {-shift};")
        lines.append(f"lop3.b32 ${i}, t, 0x00780000, 0x41800000, 0xea;")  # (a & b) | c
    return "\n".join(lines + ["}"])


def _e2m1_float_asm() -> str:
    """PTX for the float32 ``e2m1(code_i) * 2**-14`` of the 8 codes of word $8 (outputs $0..$7): codes i and
    i + 4 share one shift that puts their signs at bits 15 and 31 of an f16x2 pair and their 3 magnitude bits
    under the fp16 exponent (bits 9..11, 0.5 a subnormal); then exact fp16 -> fp32 conversions."""
    lines = ["{", ".reg .b32 q, t, pair;", ".reg .b16 low, high;"]
    for i in range(4):
        shift = 12 - 4 * i
        lines.append(f"shl.b32 q, $8, {shift};" if shift else "mov.b32 q, $8;")
        lines += ["shr.u32 t, q, 3;", "and.b32 t, t, 0x0E000E00;", "lop3.b32 pair, q, 0x80008000, t, 0xea;",
                  "mov.b32 {low, high}, pair;", f"cvt.f32.f16 ${i}, low;", f"cvt.f32.f16 ${i + 4}, high;"]
    return "\n".join(lines + ["}"])


SIXTEEN_PLUS_ASM = tl.constexpr(_sixteen_plus_asm())
E2M1_FLOAT_ASM = tl.constexpr(_e2m1_float_asm())
E2M1_FLOAT_SCALE = tl.constexpr(16384.0)  # e2m1_floats returns e2m1 / E2M1_FLOAT_SCALE
SIXTEEN_PLUS_CONSTRAINTS = tl.constexpr("=r," * 8 + "r")
F32_X8 = tl.constexpr((tl.float32,) * 8)
INT_ASM_BF16 = tl.constexpr(_int_asm("bf16x2", 0x43004300))
INT_ASM_F16 = tl.constexpr(_int_asm("f16x2", 0x64006400))
E2M1_ASM_BF16 = tl.constexpr(_e2m1_asm("bf16x2", magnitude_shift=6, scale_exponent=119))
E2M1_ASM_F16 = tl.constexpr(_e2m1_asm("f16x2", magnitude_shift=3, scale_exponent=7))
INT_CONSTRAINTS = tl.constexpr("=r," * 8 + "r,r,r,r")  # 8 outputs, 2 inputs x 2 elements (pack=2)
E2M1_CONSTRAINTS = tl.constexpr("=r," * 8 + "r,r,r,r,r,r,r,r")  # 8 outputs, 4 inputs x 2 elements
BF16_X8 = tl.constexpr((tl.bfloat16,) * 8)
F16_X8 = tl.constexpr((tl.float16,) * 8)


@triton.jit
def zero_pairs(zero, IS_BF16: tl.constexpr):
    """int32 ``magic + zero`` in both 16-bit halves (``zero`` an integer tensor, 0..15), for ``int_codes``."""
    magic = 0x4300 if IS_BF16 else 0x6400
    return (zero.to(tl.int32) + magic) * 65537


@triton.jit
def nibble(words, position: tl.constexpr):
    """Code ``position`` (0..7) of each int32 word, as int32 0..15."""
    return (words >> (4 * position)) & 15


@triton.jit
def int_codes(words, zeros, DTYPE: tl.constexpr, USE_ASM: tl.constexpr):
    """Eight tiles ``code_i - zero`` in ``DTYPE`` (bf16 / fp16), exact. ``zeros``: ``zero_pairs`` of the
    row's zero point, broadcast to the words' shape."""
    if USE_ASM:
        if DTYPE == tl.bfloat16:
            codes = tl.inline_asm_elementwise(INT_ASM_BF16, INT_CONSTRAINTS, [words, zeros], dtype=BF16_X8,
                                              is_pure=True, pack=2)
        else:
            codes = tl.inline_asm_elementwise(INT_ASM_F16, INT_CONSTRAINTS, [words, zeros], dtype=F16_X8,
                                              is_pure=True, pack=2)
    else:
        zero = (zeros & 0xF).to(tl.float32)  # the magics' low nibbles are 0
        codes = (
            (nibble(words, 0).to(tl.float32) - zero).to(DTYPE), (nibble(words, 1).to(tl.float32) - zero).to(DTYPE),
            (nibble(words, 2).to(tl.float32) - zero).to(DTYPE), (nibble(words, 3).to(tl.float32) - zero).to(DTYPE),
            (nibble(words, 4).to(tl.float32) - zero).to(DTYPE), (nibble(words, 5).to(tl.float32) - zero).to(DTYPE),
            (nibble(words, 6).to(tl.float32) - zero).to(DTYPE), (nibble(words, 7).to(tl.float32) - zero).to(DTYPE),
        )
    return codes


@triton.jit
def sixteen_plus_codes(words, USE_ASM: tl.constexpr):
    """Eight float32 tiles ``16 + code_i`` (exact) of int32 words: code i in the top mantissa bits of 16."""
    if USE_ASM:
        values = tl.inline_asm_elementwise(SIXTEEN_PLUS_ASM, SIXTEEN_PLUS_CONSTRAINTS, [words], dtype=F32_X8,
                                           is_pure=True, pack=1)
    else:
        values = (
            nibble(words, 0).to(tl.float32) + 16.0, nibble(words, 1).to(tl.float32) + 16.0,
            nibble(words, 2).to(tl.float32) + 16.0, nibble(words, 3).to(tl.float32) + 16.0,
            nibble(words, 4).to(tl.float32) + 16.0, nibble(words, 5).to(tl.float32) + 16.0,
            nibble(words, 6).to(tl.float32) + 16.0, nibble(words, 7).to(tl.float32) + 16.0,
        )
    return values


@triton.jit
def e2m1_floats(words, USE_ASM: tl.constexpr):
    """Eight float32 tiles ``e2m1(code_i) / E2M1_FLOAT_SCALE`` (exact) of int32 words."""
    if USE_ASM:
        values = tl.inline_asm_elementwise(E2M1_FLOAT_ASM, SIXTEEN_PLUS_CONSTRAINTS, [words], dtype=F32_X8,
                                           is_pure=True, pack=1)
    else:
        values = (
            _e2m1_value(nibble(words, 0)) / E2M1_FLOAT_SCALE, _e2m1_value(nibble(words, 1)) / E2M1_FLOAT_SCALE,
            _e2m1_value(nibble(words, 2)) / E2M1_FLOAT_SCALE, _e2m1_value(nibble(words, 3)) / E2M1_FLOAT_SCALE,
            _e2m1_value(nibble(words, 4)) / E2M1_FLOAT_SCALE, _e2m1_value(nibble(words, 5)) / E2M1_FLOAT_SCALE,
            _e2m1_value(nibble(words, 6)) / E2M1_FLOAT_SCALE, _e2m1_value(nibble(words, 7)) / E2M1_FLOAT_SCALE,
        )
    return values


@triton.jit
def _e4m3_value(byte):
    """Float32 value of E4M3 codes (int32 0..255), exact; 0x7F / 0xFF (NaN) are not expected here."""
    exponent = (byte >> 3) & 15
    mantissa = (byte & 7).to(tl.float32)
    power = tl.exp2((exponent - 10).to(tl.float32))
    magnitude = tl.where(exponent == 0, mantissa * 0.001953125, (8.0 + mantissa) * power)  # subnormal: m / 8 * 2**-6
    return tl.where((byte & 128) != 0, -magnitude, magnitude)


@triton.jit
def _e2m1_value(code):
    """Float32 value of E2M1 codes (int32 0..15): exponent field 0 -> 0.5 * m, else 2**(e-1) * (1 + m / 2)."""
    exponent = (code >> 1) & 3
    mantissa = (code & 1).to(tl.float32)
    power = tl.exp2((exponent - 2).to(tl.float32))
    magnitude = tl.where(exponent == 0, 0.5 * mantissa, (2.0 + mantissa) * power)
    return tl.where((code & 8) != 0, -magnitude, magnitude)


@triton.jit
def e2m1_codes(words, scales_low, scales_high, scale_index, DTYPE: tl.constexpr, USE_ASM: tl.constexpr):
    """Eight tiles ``e2m1(code_i) * block_scale / E2M1_RESCALE`` in ``DTYPE``, exact. The block scale of a word
    is byte ``scale_index`` (0..7) of the little-endian pair (``scales_low``, ``scales_high``) of int32 words
    holding 8 E4M3 scales (all three broadcast to the words' shape)."""
    if USE_ASM:
        if DTYPE == tl.bfloat16:
            codes = tl.inline_asm_elementwise(E2M1_ASM_BF16, E2M1_CONSTRAINTS,
                                              [words, scales_low, scales_high, scale_index], dtype=BF16_X8,
                                              is_pure=True, pack=2)
        else:
            codes = tl.inline_asm_elementwise(E2M1_ASM_F16, E2M1_CONSTRAINTS,
                                              [words, scales_low, scales_high, scale_index], dtype=F16_X8,
                                              is_pure=True, pack=2)
    else:
        word = tl.where(scale_index < 4, scales_low, scales_high)
        scale = _e4m3_value((word >> (8 * (scale_index % 4))) & 0xFF) * (1.0 / E2M1_RESCALE)
        codes = (
            (_e2m1_value(nibble(words, 0)) * scale).to(DTYPE), (_e2m1_value(nibble(words, 1)) * scale).to(DTYPE),
            (_e2m1_value(nibble(words, 2)) * scale).to(DTYPE), (_e2m1_value(nibble(words, 3)) * scale).to(DTYPE),
            (_e2m1_value(nibble(words, 4)) * scale).to(DTYPE), (_e2m1_value(nibble(words, 5)) * scale).to(DTYPE),
            (_e2m1_value(nibble(words, 6)) * scale).to(DTYPE), (_e2m1_value(nibble(words, 7)) * scale).to(DTYPE),
        )
    return codes
