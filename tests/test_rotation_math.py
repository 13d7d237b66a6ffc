"""The rotation matrices of the rotate pass: orthogonal, mean-preserving where promised,
seeded, and commuting with LayerNorm (the property the residual rotation rests on)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from fxquant.quant.rotation import (
    haar_orthogonal,
    hadamard,
    mean_preserving_orthogonal,
    random_hadamard,
)
from fxquant.runtime.hadamard import BlockHadamard, fast_hadamard, largest_power_of_two_block

EYE_TOL = 1e-12


def assert_orthogonal(q: torch.Tensor) -> None:
    eye = torch.eye(q.shape[0], dtype=torch.float64)
    torch.testing.assert_close(q @ q.T, eye, rtol=0, atol=EYE_TOL * q.shape[0])
    torch.testing.assert_close(q.T @ q, eye, rtol=0, atol=EYE_TOL * q.shape[0])


@pytest.mark.parametrize("d", [2, 3, 64, 384])
def test_mean_preserving_orthogonal_keeps_the_ones_vector(d):
    q = mean_preserving_orthogonal(d, seed=3)
    assert_orthogonal(q)
    ones = torch.ones(d, dtype=torch.float64)
    torch.testing.assert_close(q @ ones, ones, rtol=0, atol=1e-12 * d)
    torch.testing.assert_close(ones @ q, ones, rtol=0, atol=1e-12 * d)


def test_mean_preserving_orthogonal_spreads_an_outlier_channel():
    """A one-hot channel leaves no entry above a few times the even share 1/sqrt(d)."""
    d = 384
    q = mean_preserving_orthogonal(d, seed=0)
    spike = torch.zeros(d, dtype=torch.float64)
    spike[17] = 1.0
    spread = (spike - spike.mean()) @ q
    assert spread.abs().max() < 6.0 * d**-0.5


def test_seeds_reproduce_and_differ():
    torch.testing.assert_close(mean_preserving_orthogonal(16, 5), mean_preserving_orthogonal(16, 5))
    assert not torch.allclose(mean_preserving_orthogonal(16, 5), mean_preserving_orthogonal(16, 6))
    torch.testing.assert_close(random_hadamard(32, 1), random_hadamard(32, 1))
    assert not torch.equal(random_hadamard(32, 1), random_hadamard(32, 2))


@pytest.mark.parametrize("n", [1, 2, 8, 64])
def test_hadamard_is_orthogonal_with_equal_magnitudes(n):
    h = hadamard(n)
    assert_orthogonal(h)
    torch.testing.assert_close(h.abs(), torch.full((n, n), n**-0.5, dtype=torch.float64))
    rh = random_hadamard(n, seed=0)
    assert_orthogonal(rh)
    torch.testing.assert_close(rh.abs(), h.abs())


def test_hadamard_refuses_other_orders_and_random_hadamard_falls_back():
    with pytest.raises(ValueError, match="power-of-two"):
        hadamard(48)
    assert_orthogonal(random_hadamard(48, seed=0))
    assert_orthogonal(haar_orthogonal(7, seed=0))


def test_mean_preserving_needs_two_channels():
    with pytest.raises(ValueError, match="at least 2"):
        mean_preserving_orthogonal(1)


@settings(max_examples=40, deadline=None)
@given(
    d=st.integers(min_value=2, max_value=96),
    tokens=st.integers(min_value=1, max_value=5),
    seed=st.integers(min_value=0, max_value=10_000),
    offset=st.floats(min_value=-100.0, max_value=100.0),
)
def test_layernorm_commutes_with_a_mean_preserving_rotation(d, tokens, seed, offset):
    """LayerNorm(x Q) == LayerNorm(x) Q for any x, also with a large common offset."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, d, generator=generator, dtype=torch.float64) * 3.0 + offset
    q = mean_preserving_orthogonal(d, seed)
    left = F.layer_norm(x @ q, (d,), eps=1e-6)
    right = F.layer_norm(x, (d,), eps=1e-6) @ q
    torch.testing.assert_close(left, right, rtol=0, atol=1e-9)


@pytest.mark.parametrize("width, block", [(8, 8), (48, 16), (1536, 512), (6, 2)])
def test_fast_hadamard_equals_the_block_diagonal_product(width, block):
    x = torch.randn(3, 5, width, generator=torch.Generator().manual_seed(width), dtype=torch.float64)
    expected = x @ torch.block_diag(*[hadamard(block)] * (width // block))
    torch.testing.assert_close(fast_hadamard(x, block), expected, rtol=0, atol=1e-12)
    assert BlockHadamard(width, block)(x.float()).dtype == torch.float32


def test_block_sizes_and_refusals():
    assert largest_power_of_two_block(1536) == 512
    assert largest_power_of_two_block(384) == 128
    assert largest_power_of_two_block(4096) == 1024
    assert largest_power_of_two_block(7) == 1
    with pytest.raises(ValueError, match="power of two dividing"):
        BlockHadamard(48, 32)
