"""Tests for fxquant.quant.quantizers: uniform and log2 kernels, broadcasting, QSNR."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fxquant.quant.qparams import QParams
from fxquant.quant.quantizers import (
    dequantize,
    dequantize_log2,
    fake_quantize,
    qsnr_db,
    quantize,
    quantize_log2,
)

SETTINGS = settings(max_examples=60, deadline=None)


def _range(bits: int, signed: bool) -> tuple[int, int]:
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


@st.composite
def uniform_case(draw):
    """A random tensor plus random (possibly per-channel) uniform QParams."""
    bits = draw(st.integers(2, 16))
    signed = draw(st.booleans())
    qmin, qmax = _range(bits, signed)
    shape = draw(st.lists(st.integers(1, 5), min_size=1, max_size=4))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    spread = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    x = torch.randn(shape, generator=g) * spread
    per_channel = draw(st.booleans())
    axis = draw(st.integers(-len(shape), len(shape) - 1)) if per_channel else None
    n = shape[axis] if per_channel else None
    scale = torch.rand(n if per_channel else (), generator=g) * spread / 10 + 1e-6
    zp = torch.randint(qmin, qmax + 1, (n,) if per_channel else (), generator=g).float()
    return x, QParams(scale, zp, qmin, qmax, axis)


@SETTINGS
@given(uniform_case())
def test_codes_are_integers_within_range(case):
    x, qp = case
    q = quantize(x, qp)
    assert q.dtype == torch.float32
    assert torch.all(q >= qp.qmin) and torch.all(q <= qp.qmax)
    assert torch.equal(q, q.round())


@SETTINGS
@given(uniform_case())
def test_fake_quantize_is_dequantize_of_quantize_and_idempotent(case):
    x, qp = case
    fq = fake_quantize(x, qp)
    assert torch.equal(fq, dequantize(quantize(x, qp), qp))
    assert torch.equal(fake_quantize(fq, qp), fq)


@SETTINGS
@given(uniform_case())
def test_error_at_most_half_a_step_inside_the_range(case):
    x, qp = case
    nd = x.dim()
    scale, zp = qp.broadcast_scale(nd), qp.broadcast_zero_point(nd)
    lo, hi = (qp.qmin - zp) * scale, (qp.qmax - zp) * scale
    inside = (x >= lo) & (x <= hi)
    err = (fake_quantize(x, qp) - x).abs()
    bound = (scale / 2) * (1 + 1e-5) + 1e-6 * x.abs()
    assert torch.all(err[inside] <= bound.expand_as(x)[inside])
    # outside the range values saturate to the nearest end
    fq = fake_quantize(x, qp)
    assert torch.allclose(fq[x > hi], hi.expand_as(x)[x > hi], rtol=1e-5, atol=0)


def test_round_half_to_even():
    qp = QParams(torch.tensor(1.0), torch.tensor(0.0), -128, 127)
    q = quantize(torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, 200.0, -200.0]), qp)
    assert q.tolist() == [0.0, 2.0, 2.0, 0.0, -2.0, 127.0, -128.0]


def test_asymmetric_zero_point_shifts_codes():
    qp = QParams(torch.tensor(0.5), torch.tensor(10.0), 0, 255)
    x = torch.tensor([-5.0, 0.0, 1.0, 200.0])
    assert quantize(x, qp).tolist() == [0.0, 10.0, 12.0, 255.0]
    assert dequantize(quantize(x, qp), qp).tolist() == [-5.0, 0.0, 1.0, 122.5]


@pytest.mark.parametrize("axis", [0, -1, 1])
def test_per_channel_matches_per_slice_loop(axis):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, 4, generator=g) * 3
    n = x.shape[axis]
    scale = torch.rand(n, generator=g) * 0.1 + 0.01
    zp = torch.randint(-20, 20, (n,), generator=g).float()
    qp = QParams(scale, zp, -128, 127, axis)
    fq = fake_quantize(x, qp)
    for i in range(n):
        qi = QParams(scale[i], zp[i], -128, 127)
        assert torch.equal(fq.select(axis, i), fake_quantize(x.select(axis, i), qi))


def test_axis_zero_and_minus_one_agree_on_transposed_weight():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(8, 3, generator=g)
    scale = torch.rand(8, generator=g) + 0.01
    a = fake_quantize(w, QParams(scale, torch.zeros(8), -8, 7, axis=0))
    b = fake_quantize(w.t().contiguous(), QParams(scale, torch.zeros(8), -8, 7, axis=-1))
    assert torch.equal(a, b.t())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtype_is_preserved_and_codes_exact(dtype):
    x = torch.linspace(-3, 3, 101).to(dtype)
    qp = QParams(torch.tensor(3 / 127), torch.tensor(0.0), -128, 127)
    assert fake_quantize(x, qp).dtype == dtype
    q = quantize(x, qp)
    assert q.dtype in (torch.float32, torch.float64)
    assert q.max().item() == 127 and q.min().item() == -127


def test_unknown_method_rejected():
    qp = QParams(torch.tensor(1.0), torch.tensor(0.0), 0, 15)
    with pytest.raises(ValueError, match="method"):
        fake_quantize(torch.ones(3), qp, method="cubic")


# ------------------------------------------------------------------------------- log2
def _log2_qp(bits: int, signed: bool = False, scale: float = 1.0) -> QParams:
    qmin, qmax = _range(bits, signed)
    return QParams(torch.tensor(scale), torch.tensor(0.0), qmin, qmax)


def test_log2_hand_made_codes_and_values():
    qp = _log2_qp(4)
    x = torch.tensor([1.0, 0.5, 0.25, 0.3, 0.0])
    q = quantize_log2(x, qp)
    assert q.tolist() == [0.0, 1.0, 2.0, 2.0, 15.0]  # round(-log2 .3) = round(1.737) = 2
    assert dequantize_log2(q, qp).tolist() == [1.0, 0.5, 0.25, 0.25, 0.0]
    assert fake_quantize(x, qp, method="log2").tolist() == [1.0, 0.5, 0.25, 0.25, 0.0]


def test_log2_saturation_underflow_and_negatives():
    qp = _log2_qp(4)
    x = torch.tensor([3.0, 2.0**-14, 2.0**-15, 2.0**-30, -0.5])
    q = quantize_log2(x, qp)
    assert q.tolist() == [0.0, 14.0, 15.0, 15.0, 15.0]
    assert dequantize_log2(q, qp).tolist() == [1.0, 2.0**-14, 0.0, 0.0, 0.0]


def test_log2_scale_multiplies_the_grid():
    qp = _log2_qp(3, scale=0.8)
    x = torch.tensor([0.8, 0.4, 0.2, 0.0])
    assert quantize_log2(x, qp).tolist() == [0.0, 1.0, 2.0, 7.0]
    assert torch.allclose(fake_quantize(x, qp, "log2"), x)


def test_signed_log2_codes():
    qp = _log2_qp(4, signed=True)  # qmin -8, qmax 7: 3 magnitude bits
    x = torch.tensor([-0.5, 0.25, 0.0, -1e-9, -1.0, 2.0**-6, -(2.0**-6)])
    q = quantize_log2(x, qp)
    assert q.tolist() == [-2.0, 2.0, 7.0, -8.0, -1.0, 6.0, -7.0]
    assert dequantize_log2(q, qp).tolist() == [-0.5, 0.25, 0.0, 0.0, -1.0, 2.0**-6, -(2.0**-6)]


@SETTINGS
@given(
    bits=st.integers(2, 8),
    signed=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
    shape=st.lists(st.integers(1, 6), min_size=1, max_size=3),
)
def test_log2_properties(bits, signed, seed, shape):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g) ** 4
    if signed:
        x = x * torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0)
    qp = _log2_qp(bits, signed)
    q = quantize_log2(x, qp)
    assert torch.all(q >= qp.qmin) and torch.all(q <= qp.qmax)
    assert torch.equal(q, q.round())
    fq = fake_quantize(x, qp, "log2")
    assert torch.equal(fake_quantize(fq, qp, "log2"), fq)
    assert torch.all(torch.sign(fq) * torch.sign(x) >= 0)  # sign kept or value zeroed
    # within the representable octaves, relative error <= 2**0.5 - 1
    smallest = 2.0 ** -(qp.qmax - 1)
    ok = x.abs() >= smallest
    rel = (fq - x).abs()[ok] / x.abs()[ok]
    assert torch.all(rel <= math.sqrt(2) - 1 + 1e-6)


# ------------------------------------------------------------------------------- qsnr
def test_qsnr_known_value():
    ref = torch.tensor([1.0, 1.0])
    assert qsnr_db(ref, torch.tensor([1.0, 0.9])) == pytest.approx(10 * math.log10(2 / 0.01))


def test_qsnr_edge_cases():
    z = torch.zeros(4)
    x = torch.randn(4)
    assert qsnr_db(x, x.clone()) == float("inf")
    assert qsnr_db(z, z) == float("inf")
    assert qsnr_db(z, torch.ones(4)) == float("-inf")
    assert qsnr_db(x, torch.full((4,), float("nan"))) == float("-inf")
    assert qsnr_db(torch.tensor([float("inf")]), torch.tensor([float("inf")])) == float("-inf")
    assert qsnr_db(x.half(), x.half()) == float("inf")
    with pytest.raises(ValueError, match="shape"):
        qsnr_db(x, torch.zeros(5))


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), bits=st.integers(2, 12))
def test_qsnr_never_nan_and_improves_with_bits(seed, bits):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, generator=g)
    amax = float(x.abs().max())
    low = fake_quantize(x, QParams(torch.tensor(amax / (2 ** (bits - 1) - 1)), torch.tensor(0.0), *_range(bits, True)))
    high = fake_quantize(x, QParams(torch.tensor(amax / 32767), torch.tensor(0.0), *_range(16, True)))
    s_low, s_high = qsnr_db(x, low), qsnr_db(x, high)
    assert not math.isnan(s_low) and not math.isnan(s_high)
    assert s_high >= s_low - 1e-9
