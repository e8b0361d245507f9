"""Hadamard matrices and randomised Hadamard rotations, applied in O(n log n) without forming them.

A Hadamard matrix ``H`` (n x n, entries +-1) has ``H H^T = n I``. lowbit builds ``H = A (x) B`` (Kronecker)
with ``B`` the Sylvester matrix of size ``2**k`` (``B_1 = [1]``, ``B_2m = [[B_m, B_m], [B_m, -B_m]]``,
symmetric) and ``A`` of size ``m``: 1, or a Paley type-I matrix of size ``q + 1`` for a prime ``q = 3 mod 4``
(Jacobsthal matrix ``Q_ij = chi(j - i)``, ``chi`` the quadratic character mod q; ``A = I + [[0, 1^T], [-1, Q]]``).
So every ``n = 2**k``, and ``n = (q + 1) 2**k`` (12, 20, 24, 44, ...: 768 = 12 * 64), is covered.

For ``x`` ``(..., n)`` seen as ``X`` ``(..., m, 2**k)``: ``x @ (A (x) B) = A^T X B``, where ``X B`` is the fast
Walsh-Hadamard transform of each row (``k`` butterfly passes, ``n log2 n`` additions) and ``A^T`` a small
``m x m`` product; ``x @ (A (x) B)^T = A X B``.

A randomised Hadamard rotation (QuaRot) is the orthogonal ``R = diag(s) H / sqrt(n)`` with seeded random
signs ``s`` in {-1, +1}: ``x @ R = ((x * s) @ H) / sqrt(n)`` and ``x @ R^T = ((x @ H^T) / sqrt(n)) * s``.
"""

from __future__ import annotations

import math
from functools import cache

import torch
from torch import Tensor

MAX_PALEY_ORDER = 1024  # Paley factors up to this size; larger non-power-of-two sizes are refused


def fwht(x: Tensor) -> Tensor:
    """``x @ B`` over the last axis for the Sylvester Hadamard matrix ``B`` of size ``x.shape[-1]`` (a power of
    two), unnormalised, in ``x``'s dtype: ``log2 n`` butterfly passes ``(a, b) -> (a + b, a - b)``."""
    n = x.shape[-1]
    if n < 1 or n & (n - 1):
        raise ValueError(f"fwht needs a power-of-two length, got {n}")
    shape = x.shape
    y = x.reshape(-1, n)
    half = 1
    while half < n:
        pairs = y.reshape(-1, n // (2 * half), 2, half)
        y = torch.cat((pairs[:, :, 0] + pairs[:, :, 1], pairs[:, :, 0] - pairs[:, :, 1]), dim=-1)
        half *= 2
    return y.reshape(shape)


def _is_prime(q: int) -> bool:
    return q > 1 and all(q % d for d in range(2, math.isqrt(q) + 1))


@cache
def paley_matrix(order: int) -> Tensor:
    """The Paley type-I Hadamard matrix of size ``order = q + 1`` (q prime, q = 3 mod 4), float64."""
    q = order - 1
    if not (_is_prime(q) and q % 4 == 3):
        raise ValueError(f"no Paley type-I Hadamard matrix of order {order}: needs order - 1 prime and = 3 mod 4")
    squares = {(i * i) % q for i in range(1, q)}
    chi = [0] + [1 if r in squares else -1 for r in range(1, q)]
    jacobsthal = torch.tensor([[chi[(j - i) % q] for j in range(q)] for i in range(q)], dtype=torch.float64)
    skew = torch.zeros(order, order, dtype=torch.float64)
    skew[0, 1:] = 1
    skew[1:, 0] = -1
    skew[1:, 1:] = jacobsthal
    return torch.eye(order, dtype=torch.float64) + skew


def hadamard_factors(n: int) -> tuple[int, int]:
    """``(m, 2**k)`` with ``n = m 2**k`` and ``m`` 1 or a Paley order, the power of two as large as possible;
    ValueError naming ``n`` when there is none."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"a Hadamard size must be a positive int, got {n!r}")
    power = n & -n
    odd = n // power
    if odd == 1:
        return 1, n
    small = odd
    while small <= min(n, MAX_PALEY_ORDER):
        if _is_prime(small - 1) and (small - 1) % 4 == 3 and n % small == 0:
            return small, n // small
        small *= 2
    raise ValueError(f"no Hadamard matrix of size {n} here: sizes 2**k and (q + 1) 2**k (q prime, q = 3 mod 4, "
                     f"q + 1 <= {MAX_PALEY_ORDER}) are supported")


def hadamard_multiply(x: Tensor, transpose: bool = False) -> Tensor:
    """``x @ H`` (or ``x @ H^T``) over the last axis, ``H = A (x) B`` of :func:`hadamard_factors`, unnormalised."""
    small, power = hadamard_factors(x.shape[-1])
    y = fwht(x.reshape(*x.shape[:-1], small, power))
    if small > 1:
        factor = paley_matrix(small).to(device=x.device, dtype=x.dtype)
        y = torch.einsum("...il,ki->...kl" if transpose else "...il,ik->...kl", y, factor)
    return y.reshape(x.shape)


class RandomHadamard:
    """The rotation ``R = diag(signs) H / sqrt(n)`` (orthogonal), signs drawn from ``torch.Generator`` seeded
    with ``seed``; :meth:`right` is ``x @ R``, :meth:`right_transposed` is ``x @ R^T``, over the last axis."""

    def __init__(self, size: int, seed: int = 0) -> None:
        hadamard_factors(size)
        generator = torch.Generator().manual_seed(seed)
        self.size = size
        self.signs = torch.randint(0, 2, (size,), generator=generator, dtype=torch.float64) * 2 - 1

    def _check(self, x: Tensor) -> None:
        if x.shape[-1] != self.size:
            raise ValueError(f"a rotation of size {self.size} got a tensor of shape {tuple(x.shape)}")

    def right(self, x: Tensor) -> Tensor:
        """``x @ R`` in ``x``'s dtype (computed in float64 for float64 inputs, else float32)."""
        self._check(x)
        work = x.double() if x.dtype == torch.float64 else x.float()
        signs = self.signs.to(device=x.device, dtype=work.dtype)
        return (hadamard_multiply(work * signs) / math.sqrt(self.size)).to(x.dtype)

    def right_transposed(self, x: Tensor) -> Tensor:
        """``x @ R^T`` in ``x``'s dtype."""
        self._check(x)
        work = x.double() if x.dtype == torch.float64 else x.float()
        signs = self.signs.to(device=x.device, dtype=work.dtype)
        return (hadamard_multiply(work, transpose=True) / math.sqrt(self.size) * signs).to(x.dtype)
