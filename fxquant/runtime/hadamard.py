"""An online block Walsh-Hadamard transform: ``x @ blockdiag(H_b, ..., H_b)`` on the last
dimension, computed with the fast transform (log2(b) add/subtract stages, no matmul).

The ``rotate`` pass puts one before fc2 (``rotate: {fc2: true}``) and multiplies fc2's
weight columns by the same orthogonal matrix, so the product is unchanged while the
quantized fc2 input (the GELU output) has its outliers spread over each block of ``b``
channels. Float arithmetic in both backends (the quantization point follows it).
"""

from __future__ import annotations

import torch
from torch import nn

from fxquant.runtime.savable import Schema, savable


def largest_power_of_two_block(width: int, limit: int = 1024) -> int:
    """The largest power of two <= ``limit`` dividing ``width`` (1 when width is odd)."""
    block = 1
    while block * 2 <= limit and width % (block * 2) == 0:
        block *= 2
    return block


def fast_hadamard(x: torch.Tensor, block: int) -> torch.Tensor:
    """``x @ blockdiag(H_block, ...)`` with H the normalized Sylvester Hadamard matrix."""
    shape = x.shape
    y = x.reshape(-1, shape[-1] // block, block)
    half = 1
    while half < block:
        y = y.reshape(y.shape[0], y.shape[1], block // (2 * half), 2, half)
        a, b = y[..., 0, :], y[..., 1, :]
        y = torch.stack((a + b, a - b), dim=-2)
        half *= 2
    return (y.reshape(shape) * block**-0.5).to(x.dtype)


@savable(Schema({"width": int, "block": int}, layout="plain_state"))
class BlockHadamard(nn.Module):
    def __init__(self, width: int, block: int):
        super().__init__()
        if block < 1 or block & (block - 1) or width % block:
            raise ValueError(f"block {block} must be a power of two dividing the width {width}")
        self.width, self.block = width, block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fast_hadamard(x, self.block)

    def extra_repr(self) -> str:
        return f"width={self.width}, block={self.block}"
