"""llama.cpp's k-quants Q4_K and Q6_K, written from lowbit's own codes when lowbit's scales lie on their grid.

A k-quant super-block is 256 consecutive input elements of a row. Its sub-block steps are not free floats
but ``d * sc``: one float16 ``d`` per super-block times a small integer ``sc`` per sub-block.

| GGUF | lowbit weight config                    | sub-block | sc             | value (llama.cpp's dequantization) |
|------|-----------------------------------------|-----------|----------------|------------------------------------|
| Q6_K | INT6 symmetric, ``block_sizes {-1: 16}`` | 16        | int8 1..127    | d * sc * (q - 32),  q = code + 32  |
| Q4_K | INT4 symmetric, ``block_sizes {-1: 32}`` | 32        | 6-bit 1..63    | d * sc * q - dmin * m, q = code + 8 |

Q4_K's minimum is written as ``dmin = 8 d`` and ``m = sc``, so ``d sc q - 8 d sc = d sc code``: lowbit's
signed INT4 needs no zero point. Each product is exact in float32 (d has 11 significant bits, sc at most 7,
q at most 6), so the file's values are ``d * sc * code`` exactly.

lowbit's calibration gives free float32 steps; ``snap_k_quant_scales(model)`` moves each INT6-g16 /
INT4-g32 weight quantizer's ``amax`` onto the grid (per super-block: ``d = float16(max step / sc_max)``,
``sc = clamp(round_half_even(step / d), 1, sc_max)`` (sc_max for the largest step),
``amax = d * sc * qmax``, exact in float32), so the
fake-quantized model *is* the model the file holds. lowbit then computes ``code / scale`` with
``scale = float32(qmax / amax) = float32(1 / (d sc))``: the file's value differs from it by float32 rounding
only (at most 2 ulp of the value).

``k_quant_scales(weight, type_name)`` recovers ``(d, sc)`` from a weight's packed scales and checks that
``float32(qmax / (d sc qmax))`` gives lowbit's scale back bit for bit; a weight off the grid is a ValueError
naming the layer.

Byte layouts (ggml's ``block_q6_K`` / ``block_q4_K``, QK_K = 256):
- Q6_K (210 B): ``ql`` 128 B, ``qh`` 64 B, ``scales`` 16 x int8, ``d`` f16. In each 128-element half h,
  element ``l + 32 i`` (l < 32, i < 4) keeps its low 4 bits in ``ql[64 h + l + 32 (i % 2)]`` (low nibble
  for i < 2, high for i >= 2) and its high 2 bits in ``qh[32 h + l]`` at bit ``2 i``; sub-block j = element // 16.
- Q4_K (144 B): ``d`` f16, ``dmin`` f16, ``scales`` 12 B (sc_j and m_j, 6 bits each: bytes 0-3 hold sc_0..3
  plus sc_4..7's top 2 bits, bytes 4-7 m_0..3 plus m_4..7's top 2 bits, bytes 8-11 the low nibbles of sc_4..7
  and m_4..7), ``qs`` 128 B: in each 64-element chunk c, byte ``32 c + l`` holds element ``64 c + l`` (low
  nibble) and ``64 c + 32 + l`` (high nibble).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from lowbit.export.weights import QuantizedWeight, weight_quantizer
from lowbit.formats import int_range

SUPER_BLOCK = 256


@dataclass(frozen=True)
class KQuant:
    """One k-quant type: lowbit's matching INT grid, its sub-block size and the largest ``sc``."""

    name: str
    num_bits: int
    sub_block: int
    max_sc: int


K_QUANTS = {"Q6_K": KQuant("Q6_K", 6, 16, 127), "Q4_K": KQuant("Q4_K", 4, 32, 63)}
BY_BITS = {kind.num_bits: kind for kind in K_QUANTS.values()}


def k_quant_for(num_bits: int, block_size: int | None) -> KQuant | None:
    """The k-quant whose grid lowbit's signed INT ``num_bits`` with blocks of ``block_size`` can take, or None."""
    kind = BY_BITS.get(num_bits)
    return kind if kind is not None and block_size == kind.sub_block else None


def _grid(steps: torch.Tensor, kind: KQuant, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(d float16 (N, S), sc int (N, S, sub-blocks)) nearest to float64 ``steps`` (N, S, sub-blocks)."""
    d = (steps.amax(dim=-1) / kind.max_sc).to(torch.float16)
    if ((d == 0) & (steps.amax(dim=-1) > 0)).any() or not torch.isfinite(d).all():
        raise ValueError(f"layer {name!r}: a super-block step of {steps.max().item():.3g} / "
                         f"{steps[steps > 0].min().item():.3g} leaves float16's range ({kind.name}'s d)")
    d = torch.where(d == 0, torch.ones_like(d), d)  # an all-zero super-block: any d, codes are 0
    sc = torch.clamp(torch.round(steps / d.double()[..., None]), 1, kind.max_sc)
    # the largest step gets sc_max even where float16 rounded d coarsely (subnormal d), so that d can be
    # read back from the snapped steps as float16(max step / sc_max)
    largest = steps == steps.amax(dim=-1, keepdim=True)
    return d, torch.where(largest, float(kind.max_sc), sc)


def _super_blocks(values: torch.Tensor, kind: KQuant, name: str) -> torch.Tensor:
    """(N, K / sub_block) -> (N, K / 256, 256 / sub_block); ValueError when K is not a multiple of 256."""
    rows, groups = values.shape
    if (groups * kind.sub_block) % SUPER_BLOCK:
        raise ValueError(f"layer {name!r}: {kind.name} needs rows of a multiple of {SUPER_BLOCK} elements, this "
                         f"weight's rows have {groups * kind.sub_block}")
    return values.reshape(rows, -1, SUPER_BLOCK // kind.sub_block)


def snap_k_quant_scales(model: nn.Module) -> list[str]:
    """Move every INT6-g16 / INT4-g32 symmetric weight quantizer's ``amax`` onto the Q6_K / Q4_K grid (module
    docstring) in place; returns the names of the layers changed. Call after calibration, before export."""
    changed = []
    for name, module in model.named_modules():
        quantizer = weight_quantizer(name, module)
        if quantizer is None:
            continue
        config = quantizer.config
        blocks = config.block_axes
        kind = None if config.is_float or config.asymmetric or config.unsigned or list(blocks) != [-1] else (
            k_quant_for(config.num_bits, blocks[-1]))
        if kind is None or config.block_scale_bits is not None:
            continue
        if quantizer.amax is None:
            raise ValueError(f"layer {name!r}: weight quantizer has no amax; calibrate before snapping to "
                             f"{kind.name}")
        qmax = int_range(kind.num_bits, narrow_range=config.narrow_range)[1]
        amax = quantizer.amax.detach()
        steps = _super_blocks(amax.double().reshape(amax.shape[0], -1) / qmax, kind, name)
        d, sc = _grid(steps, kind, name)
        snapped = (d.double()[..., None] * sc * qmax).float()  # exact: at most 11 + 7 + 5 significant bits
        quantizer.set_amax(snapped.reshape(amax.shape))
        changed.append(name)
    return changed


def k_quant_scales(weight: QuantizedWeight, kind: KQuant) -> tuple[torch.Tensor, torch.Tensor]:
    """``(d, sc)`` of ``weight`` on ``kind``'s grid: float16 (N, K / 256) and float64 (N, K / 256, sub-blocks).

    ValueError naming the layer when lowbit's scales are not ``float32(qmax / (d sc qmax))`` bit for bit
    (the weight was not snapped with ``snap_k_quant_scales``)."""
    steps = weight.steps_per(kind.sub_block).double()
    d, sc = _grid(_super_blocks(steps, kind, weight.name), kind, weight.name)
    qmax = float(int_range(kind.num_bits, narrow_range=weight.format.narrow_range)[1])
    amax = (d.double()[..., None] * sc * qmax).float()
    rebuilt = torch.tensor(qmax, dtype=torch.float32) / amax
    if not torch.equal(rebuilt.reshape(-1), weight.packed.scale.float().reshape(-1)):
        raise ValueError(f"layer {weight.name!r}: its INT{kind.num_bits} scales are not on {kind.name}'s grid "
                         f"(float16 d x {kind.max_sc}-level sc per {SUPER_BLOCK} elements); call "
                         "lowbit.export.snap_k_quant_scales(model) after calibration")
    return d, sc


def on_k_quant_grid(weight: QuantizedWeight, kind: KQuant) -> bool:
    """Whether ``weight``'s scales lie on ``kind``'s grid (``k_quant_scales`` succeeds)."""
    try:
        k_quant_scales(weight, kind)
    except ValueError:
        return False
    return True


def encode_k_quant(weight: QuantizedWeight, kind: KQuant) -> np.ndarray:
    """``weight`` as Q6_K / Q4_K blocks: uint8 (N, K / 256 * block bytes), layouts in the module docstring."""
    d, sc = k_quant_scales(weight, kind)
    rows, columns = weight.codes.shape
    codes = weight.codes.reshape(rows, columns // SUPER_BLOCK, SUPER_BLOCK).numpy().astype(np.int16)
    d_bytes = d.numpy()[..., None].view(np.uint8)
    sc = sc.numpy().astype(np.uint8)
    if kind.name == "Q6_K":
        q = (codes + 32).astype(np.uint8).reshape(rows, -1, 2, 4, 32)  # (half, i, l): element 128 h + 32 i + l
        low, high = q & 15, q >> 4
        ql = np.concatenate([low[..., 0, :] | (low[..., 2, :] << 4), low[..., 1, :] | (low[..., 3, :] << 4)], -1)
        qh = high[..., 0, :] | (high[..., 1, :] << 2) | (high[..., 2, :] << 4) | (high[..., 3, :] << 6)
        parts = [ql.reshape(rows, -1, 128), qh.reshape(rows, -1, 64), sc, d_bytes]
    else:
        q = (codes + 8).astype(np.uint8).reshape(rows, -1, 4, 2, 32)  # (chunk, nibble, l)
        qs = (q[..., 0, :] | (q[..., 1, :] << 4)).reshape(rows, -1, 128)
        dmin = (d * 8).numpy()[..., None].view(np.uint8)
        parts = [d_bytes, dmin, _pack_scales(sc, sc), qs]
    return np.concatenate(parts, axis=-1).reshape(rows, -1)


def _pack_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Q4_K's 12 scale bytes from 8 six-bit ``sc`` and ``m`` per super-block (module docstring)."""
    top_sc, top_m = (sc[..., 4:] >> 4) << 6, (m[..., 4:] >> 4) << 6
    low = (sc[..., 4:] & 15) | ((m[..., 4:] & 15) << 4)
    return np.concatenate([sc[..., :4] | top_sc, m[..., :4] | top_m, low], axis=-1).astype(np.uint8)
