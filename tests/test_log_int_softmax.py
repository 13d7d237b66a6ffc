"""Log-Int-Softmax: integer exp, the log2 code rule and the codes on hand-made scores."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fxquant.runtime.integer import exact_shift_matmul_bound
from fxquant.runtime.log_int_softmax import LogIntSoftmax, i_exp, lis_codes, lis_values, nearest_power_code


def test_i_exp_hand_made_integers():
    # scale 1/16: x0 = floor(-0.6931 * 16) = -12; b = floor(2.70729 * 16) = 43;
    # c = floor(2.79211 * 256) = 714. x = -20: q = floor(-20 / -12) = 1, r = -20 + 12 = -8,
    # poly = -8 * (-8 + 43) + 714 = 434, exp_int = 434 * 2**(30 - 1)
    s = torch.tensor(1 / 16, dtype=torch.float64)
    e, scale = i_exp(torch.tensor([0.0, -20.0]), s)
    assert e.tolist() == [714 * 2**30, 434 * 2**29]
    assert math.isclose(float(e[0] * scale), 1.0, rel_tol=2e-3)
    # 6% off: floor(-ln2 * 16) / 16 = -0.75 is a coarse octave, why lis_codes refines the grid
    assert math.isclose(float(e[1] * scale), math.exp(-20 / 16), rel_tol=0.07)


def test_i_exp_accuracy_on_a_fine_grid():
    # on the 2**-8 grid LIS uses, each octave is off by 0.3% (floor(-ln2 / s) * s != -ln2):
    # within the 8 octaves below the row maximum (probabilities that matter) < 3%
    s = torch.tensor(2.0**-8, dtype=torch.float64)
    x = -torch.arange(0, int(8 * math.log(2) * 256), dtype=torch.float64)
    e, scale = i_exp(x, s)
    rel = (e * scale / torch.exp(x * s) - 1).abs()
    assert rel.max() < 0.03


def test_nearest_power_code_hand_made():
    total = torch.tensor([8.0, 8.0, 8.0, 8.0, 8.0, 100.0])
    e = torch.tensor([8.0, 6.0, 5.0, 4.0, 1.0, 1.0])
    # ratios 1, 1.33, 1.6, 2, 8, 100: log2 = 0, 0.415, 0.678, 1, 3, 6.64 -> 0, 0, 1, 1, 3, 7
    assert nearest_power_code(total, e).tolist() == [0, 0, 1, 1, 3, 7]


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 2**40), st.integers(1, 2**40))
def test_nearest_power_code_is_rounded_log2(a, b):
    e, total = min(a, b), max(a, b)
    m = int(
        nearest_power_code(
            torch.tensor([float(total)], dtype=torch.float64), torch.tensor([float(e)], dtype=torch.float64)
        )[0]
    )
    exact = math.log2(total / e)
    assert abs(m - exact) <= 0.5 + 1e-9


def test_lis_codes_on_hand_made_scores():
    # scale 1: scores 0, -1, -2, -8 -> softmax 0.6652, 0.2447, 0.0900, 0.000223
    # -> -log2 p = 0.59, 2.03, 3.47, 12.13 -> codes 1, 2, 3, 12
    scores = torch.tensor([[0.0, -1.0, -2.0, -8.0]])
    codes = lis_codes(scores, torch.tensor(1.0), bits=8)
    assert codes.tolist() == [[1.0, 2.0, 3.0, 12.0]]
    assert lis_values(codes, 8).tolist() == [[0.5, 0.25, 0.125, 2.0**-12]]


def test_four_bit_codes_underflow_to_zero():
    scores = torch.tensor([[0.0, -30.0]])
    codes = lis_codes(scores, torch.tensor(1.0), bits=4)
    assert codes.tolist() == [[0.0, 15.0]]  # 15 = qmax, the zero code
    assert lis_values(codes, 4).tolist() == [[1.0, 0.0]]


def test_lis_close_to_float_softmax_log2_and_per_head_scales():
    g = torch.Generator().manual_seed(0)
    scale = torch.tensor([0.05, 0.2]).reshape(1, 2, 1, 1)
    scores = torch.round(torch.randn(2, 2, 30, 30, generator=g) * 20) * scale
    codes = lis_codes(scores, scale, bits=8)
    ref = torch.round(-torch.log2(torch.softmax(scores.double(), -1))).clamp(0, 255)
    big = ref < 8  # the probabilities that carry the output
    assert (codes[big] - ref[big]).abs().max() <= 1
    assert (codes[big] != ref[big]).double().mean() < 0.02
    module = LogIntSoftmax(scale, bits=8, renormalize=False)
    assert torch.equal(module(scores), lis_values(codes, 8).float())
    rows = LogIntSoftmax(scale, bits=8)(scores)  # renormalized: each row sums to 1
    torch.testing.assert_close(rows.sum(-1), torch.ones(2, 2, 30))
    assert torch.equal(rows, (lis_values(codes, 8) / lis_values(codes, 8).sum(-1, keepdim=True)).float())


# -- attn@V by shifts: the largest shift T whose float64 matmul stays exact (LisShiftMatmul)
def _worst_row(tokens: int, magnitude: int, shift: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """A row of powers 2**(T - m) with m = 0 for all but the last token (m = T, value 1),
    against V codes all at +magnitude: the partial sums grow to the bound and the last,
    odd term tests that no low bit was rounded away. Returns (powers, v, the exact sum)."""
    powers = torch.full((1, tokens), 2.0**shift, dtype=torch.float64)
    powers[0, -1] = 1.0
    v = torch.full((tokens, 1), float(magnitude), dtype=torch.float64)
    return powers, v, (tokens - 1) * magnitude * 2**shift + magnitude


def _exact(tokens: int, magnitude: int, shift: int) -> bool:
    powers, v, want = _worst_row(tokens, magnitude, shift)
    return int(torch.matmul(powers, v).item()) == want


def test_shift_bound_derived_from_the_v_range_just_fits():
    # 64 tokens, V codes within +-127 of the zero point: 64 * 127 = 8128 < 2**13, so
    # 8128 * 2**40 <= 2**53 < 8128 * 2**41: T = 40 is exact, T = 41 is not
    assert exact_shift_matmul_bound(64, 127, cap=254) == 40
    assert _exact(64, 127, 40) and not _exact(64, 127, 41)
    # a narrower V range (|v - zv| <= 15) leaves room for three more bits
    assert exact_shift_matmul_bound(64, 15, cap=254) == 43
    assert _exact(64, 15, 43) and not _exact(64, 15, 44)
    # the probabilities' own cap (2**bits - 2) wins when the range leaves more room
    assert exact_shift_matmul_bound(4, 1, cap=14) == 14
    assert exact_shift_matmul_bound(4, 0, cap=14) == 14  # V at its zero point: all products 0


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 4096), st.integers(1, 255))
def test_shift_bound_is_the_largest_exact_shift(tokens, magnitude):
    shift = exact_shift_matmul_bound(tokens, magnitude, cap=10_000)
    assert tokens * magnitude * 2**shift <= 2**53 < tokens * magnitude * 2 ** (shift + 1)
    assert _exact(tokens, magnitude, shift)


def test_shift_bound_refuses_what_float64_cannot_hold():
    with pytest.raises(ValueError, match="2\\*\\*53"):
        exact_shift_matmul_bound(2**50, 255, cap=254)
