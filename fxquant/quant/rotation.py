"""Orthogonal matrices for the ``rotate`` pass, in float64, reproducible from a seed.

- :func:`mean_preserving_orthogonal` (d x d): Q with ``Q @ 1 = 1``. For such a Q,
  ``LayerNorm(x @ Q) == LayerNorm(x) @ Q`` for every x (without affine): the mean of
  ``x @ Q`` is the mean of x, centring commutes with Q, and Q keeps the norm. So the
  residual stream of a pre-LN transformer can be rotated with LayerNorm left in the graph.
  On the complement of the all-ones direction Q is a Haar-random rotation, which spreads
  an outlier channel over all the others.
- :func:`random_hadamard` (n x n): a Walsh-Hadamard matrix with random column signs when n
  is a power of two (the most even spread of any orthogonal matrix), else a Haar-random
  orthogonal matrix: used per attention head.
"""

from __future__ import annotations

import torch


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def haar_orthogonal(n: int, seed: int) -> torch.Tensor:
    """A Haar-distributed random orthogonal n x n matrix (QR of a Gaussian, signs fixed)."""
    gaussian = torch.randn(n, n, generator=_generator(seed), dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    return q * torch.where(torch.diagonal(r) < 0, -1.0, 1.0).to(torch.float64)[None, :]


def mean_preserving_orthogonal(d: int, seed: int = 0) -> torch.Tensor:
    """Orthogonal d x d Q (float64) with ``Q @ ones == ones`` and ``ones @ Q == ones``."""
    if d < 2:
        raise ValueError(f"a mean-preserving rotation needs at least 2 channels, got {d}")
    ones = torch.full((d, 1), d**-0.5, dtype=torch.float64)
    basis_seed = torch.randn(d, d - 1, generator=_generator(seed + 1_000_003), dtype=torch.float64)
    basis, _ = torch.linalg.qr(torch.cat([ones, basis_seed], dim=1))
    basis[:, 0] = ones[:, 0]  # QR may flip the sign of the first column
    inner = torch.eye(d, dtype=torch.float64)
    inner[1:, 1:] = haar_orthogonal(d - 1, seed)
    return basis @ inner @ basis.T


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def hadamard(n: int) -> torch.Tensor:
    """The normalized Sylvester-Walsh-Hadamard matrix of order n (a power of two)."""
    if not is_power_of_two(n):
        raise ValueError(f"a Walsh-Hadamard matrix needs a power-of-two order, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], dim=1), torch.cat([h, -h], dim=1)], dim=0)
    return h / n**0.5


def random_hadamard(n: int, seed: int = 0) -> torch.Tensor:
    """``hadamard(n) @ diag(random signs)`` for a power-of-two n, else :func:`haar_orthogonal`."""
    if not is_power_of_two(n):
        return haar_orthogonal(n, seed)
    signs = torch.randint(0, 2, (n,), generator=_generator(seed), dtype=torch.int64) * 2 - 1
    return hadamard(n) * signs.to(torch.float64)[None, :]


def block_diagonal(block: torch.Tensor, count: int) -> torch.Tensor:
    return torch.block_diag(*([block] * count))
