"""The log quantizers of other bases (fxquant.quant.log_quantizers): log_sqrt2 and the
adaptive base. Properties of codes and values, the base search, the qconfig keys."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fxquant
from fxquant.errors import QConfigError
from fxquant.quant.log_quantizers import (
    CANDIDATE_STEPS,
    RESOLVED_LOG_METHODS,
    LogBaseSearch,
    dequantize_log_step,
    log_step,
    method_for_step,
    quantize_log_step,
)
from fxquant.quant.qparams import QParams
from fxquant.quant.quantizers import dequantize_log2, fake_quantize, quantize_log2

SETTINGS = settings(max_examples=60, deadline=None)
STEPS = st.sampled_from(CANDIDATE_STEPS)


def _qp(bits: int, signed: bool, scale: float = 1.0) -> QParams:
    qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    return QParams(torch.tensor(scale), torch.tensor(0.0), qmin, qmax)


@st.composite
def probabilities(draw):
    n = draw(st.integers(1, 64))
    values = draw(st.lists(st.floats(0.0, 1.0, allow_nan=False), min_size=n, max_size=n))
    return torch.tensor(values, dtype=torch.float64)


@given(probabilities(), st.sampled_from([4, 8]), STEPS)
@SETTINGS
def test_codes_in_range_and_zero_maps_to_the_zero_code(x, bits, step):
    qp = _qp(bits, signed=False)
    codes = quantize_log_step(x, qp, step)
    assert torch.equal(codes, codes.round())
    assert codes.min() >= 0 and codes.max() <= qp.qmax
    zero = quantize_log_step(torch.zeros(3, dtype=torch.float64), qp, step)
    assert torch.all(zero == qp.qmax)
    assert torch.all(dequantize_log_step(zero, qp, step) == 0)


@given(probabilities(), st.sampled_from([4, 8]))
@SETTINGS
def test_log_sqrt2_values_lie_on_the_sqrt2_grid(x, bits):
    """Every value is 0 or sqrt(2)**-m for its code m < qmax: a power of two, times 1/sqrt(2)
    exactly when the code is odd (RepQ-ViT's shifts plus one constant)."""
    qp, step = _qp(bits, signed=False), log_step("log_sqrt2")
    codes = quantize_log_step(x, qp, step)
    values = dequantize_log_step(codes, qp, step)
    live = codes < qp.qmax
    odd = torch.where(
        codes % 2 == 1, torch.tensor(2**-0.5, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)
    )
    expected = torch.pow(2.0, -torch.floor(codes / 2)) * odd
    torch.testing.assert_close(values[live], expected[live], rtol=1e-15, atol=0)
    torch.testing.assert_close(values[live], torch.pow(math.sqrt(2), -codes[live]), rtol=1e-12, atol=0)
    assert torch.all(values[~live] == 0)


@given(probabilities(), st.sampled_from([4, 8]), STEPS)
@SETTINGS
def test_monotone_and_nearest_in_the_log_domain(x, bits, step):
    qp = _qp(bits, signed=False)
    xs, _ = torch.sort(x)
    codes = quantize_log_step(xs, qp, step)
    values = dequantize_log_step(codes, qp, step)
    assert torch.all(codes[1:] <= codes[:-1])  # larger x -> smaller (or equal) code
    assert torch.all(values[1:] >= values[:-1])
    live = (codes < qp.qmax) & (xs > 0) & (codes > 0)
    # a code strictly inside the range is the nearest grid point of x in the log domain
    err = (torch.log2(xs[live]) - torch.log2(values[live])).abs()
    assert torch.all(err <= float(step) / 2 + 1e-9)


@given(st.sampled_from([4, 8]), STEPS)
@SETTINGS
def test_grid_values_round_trip_and_fake_quantize_is_idempotent(bits, step):
    qp = _qp(bits, signed=False, scale=0.75)
    codes = torch.arange(0, qp.qmax + 1, dtype=torch.float64)
    values = dequantize_log_step(codes, qp, step)
    assert torch.equal(quantize_log_step(values, qp, step), codes)
    method = method_for_step(step)
    once = fake_quantize(values, qp, method)
    assert torch.equal(fake_quantize(once, qp, method), once)


def test_step_one_is_the_log2_quantizer():
    x = torch.rand(1000, dtype=torch.float64) ** 6
    for signed in (False, True):
        qp = _qp(8, signed)
        y = x * (torch.randint(0, 2, x.shape) * 2 - 1) if signed else x
        assert torch.equal(quantize_log_step(y, qp, Fraction(1)), quantize_log2(y, qp))
        assert torch.equal(
            dequantize_log_step(quantize_log2(y, qp), qp, Fraction(1)), dequantize_log2(quantize_log2(y, qp), qp)
        )


def test_signed_codes_mirror_the_magnitude():
    qp, step = _qp(8, signed=True), Fraction(1, 2)
    x = torch.tensor([0.3, -0.3, 0.0, -1e-30])
    codes = quantize_log_step(x, qp, step)
    assert codes[0] == -1 - codes[1] and codes[2] == qp.qmax
    values = dequantize_log_step(codes, qp, step)
    assert values[0] == -values[1] and values[2] == 0 and values[3] == 0


def test_method_names_resolve_and_unknown_ones_fail():
    assert method_for_step(Fraction(1)) == "log2" and method_for_step(Fraction(1, 2)) == "log_sqrt2"
    assert log_step("log2^2/3") == Fraction(2, 3) and "log2^2/3" in RESOLVED_LOG_METHODS
    assert log_step("uniform") is None
    with pytest.raises(ValueError, match="calibration chooses it"):
        log_step("log_adaptive")
    with pytest.raises(ValueError, match="unknown quantization method 'log3'"):
        fake_quantize(torch.ones(2), _qp(8, False), "log3")


# -- the adaptive base: the search picks the step of least error
def _errors_direct(x: torch.Tensor, bits: int) -> dict:
    qp = _qp(bits, signed=False)
    return {
        s: float(((x - dequantize_log_step(quantize_log_step(x, qp, s), qp, s)) ** 2).sum()) for s in CANDIDATE_STEPS
    }


@pytest.mark.parametrize(
    "bits, make",
    [
        # values on the 2**(-m*2/3) grid: the step 2/3 (and only it among the candidates) has no error
        (8, lambda g: torch.pow(2.0, -torch.randint(0, 12, (4000,), generator=g).double() * 2 / 3)),
        # attention-like rows over 257 tokens at 4 bits: a wide range that log2 covers and sqrt2 truncates
        (4, lambda g: torch.softmax(torch.randn(64, 257, generator=g, dtype=torch.float64) * 3, -1).flatten()),
        # probabilities near 1/8 and 1: fine steps win at 8 bits
        (8, lambda g: torch.rand(5000, generator=g, dtype=torch.float64) * 0.9 + 0.1),
    ],
    ids=["on-grid-2/3", "softmax-4bit", "dense-8bit"],
)
def test_search_picks_the_step_of_least_error(bits, make):
    x = make(torch.Generator().manual_seed(0))
    search = LogBaseSearch(bits, signed=False)
    for chunk in x.split(1000):
        search.update(chunk)
    direct = _errors_direct(x, bits)
    best = search.best_step()
    # the histogram's choice is the exact optimum, or within 2% of its error
    assert direct[best] <= min(direct.values()) * 1.02 + 1e-12
    on_grid = torch.all(torch.log2(x) * 3 / 2 == torch.round(torch.log2(x) * 3 / 2))
    if on_grid:  # 1/3's grid holds these values too: ties go to the larger step (shorter shifts)
        assert best == Fraction(2, 3) and direct[best] < 1e-20


def test_search_needs_data():
    with pytest.raises(ValueError, match="no calibration data"):
        LogBaseSearch(8, signed=False).best_step()


# -- qconfig
def test_qconfig_accepts_the_new_methods_and_names_the_allowed_ones():
    for method in ("log_sqrt2", "log_adaptive"):
        config = fxquant.load_qconfig({"extends": "fqvit_w8a8", "intSoft": {"quantization_method": method}})
        assert config.to_dict()["intSoft"]["quantization_method"] == method
    with pytest.raises(QConfigError, match=r"intSoft\.quantization_method.*'log_e' is not allowed.*log_sqrt2"):
        fxquant.load_qconfig({"extends": "fqvit_w8a8", "intSoft": {"quantization_method": "log_e"}})


def test_omse_refuses_the_adaptive_base():
    with pytest.raises(QConfigError, match="log_adaptive"):
        fxquant.load_qconfig(
            {
                "extends": "fqvit_w8a8",
                "intSoft": {"quantization_method": "log_adaptive", "observer_type": "OmseObserver"},
            }
        )


def _row_error(p: torch.Tensor, step: Fraction, bits: int) -> float:
    qp = _qp(bits, signed=False)
    v = dequantize_log_step(quantize_log_step(p, qp, step), qp, step)
    total = v.sum(-1, keepdim=True)
    v = v / torch.where(total > 0, total, torch.ones_like(total))
    return float(((v - p) ** 2).sum())


def test_row_search_scores_renormalized_rows_and_keeps_the_small_probabilities():
    """Flat-ish attention rows over 257 tokens at 4 bits: element-wise error prefers a finer
    base that zeroes more of each row; scored row by row after renormalization (what attn@V
    sees) the search keeps a coarser one, and its pick is the least row error of all."""
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(48, 257, generator=g, dtype=torch.float64) * 1.5, -1)
    rows = LogBaseSearch(4, signed=False, rows=True)
    for chunk in p.split(16):
        rows.update(chunk)
    direct = {s: _row_error(p, s, 4) for s in CANDIDATE_STEPS}
    best = rows.best_step()
    assert direct[best] <= min(direct.values()) * 1.001
    elementwise = LogBaseSearch(4, signed=False)
    elementwise.update(p)
    assert best > elementwise.best_step()  # 4 bits of base 2**s reach down to 2**-(14 s) only
    assert _row_error(p, best, 4) < _row_error(p, elementwise.best_step(), 4)


@pytest.mark.parametrize("rows", [None, True])
def test_search_merged_over_ranks_equals_one_search_over_all_data(rows):
    """Distributed calibration sums the search's statistics over ranks (reduce_sums): two
    shards merged score every step as one search over both."""
    g = torch.Generator().manual_seed(2)
    p = torch.softmax(torch.randn(64, 100, generator=g, dtype=torch.float64) * 2, -1)
    shards = [LogBaseSearch(4, signed=False, rows=rows) for _ in range(2)]
    whole = LogBaseSearch(4, signed=False, rows=rows)
    for shard, part in zip(shards, p.split(32)):
        shard.update(part)
        whole.update(part)
    locals_ = []
    for shard in shards:
        shard.merge(lambda d: locals_.append(d) or d)
    summed = {k: locals_[0][k] + locals_[1][k] for k in locals_[0]}
    shards[0].merge(lambda d: summed)
    assert shards[0].num_updates == 2
    for step, error in whole.errors().items():
        assert shards[0].errors()[step] == pytest.approx(error, rel=1e-9)
    assert shards[0].best_step() == whole.best_step()
