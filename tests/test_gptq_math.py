"""fxquant.quant.gptq: GPTQ's rounding against the exhaustive optimum, and its invariants.

On a 4 x 6 layer at 2 and 3 bits the H-weighted error ``trace((W - Q) H (W - Q)^T)`` is
separable by output row, so the optimum over every code assignment (4**6 or 8**6 per row)
is computed exactly. GPTQ is greedy: over 12 seeded layers its total error must be at most
1.5x the optimum's (measured ~1.35x) and at most 0.8x round-to-nearest's (measured ~0.75x
and ~0.65x), and no single layer worse than 5x the optimum. With H = identity (or any
diagonal H) there is no error to feed back, so GPTQ must equal round-to-nearest exactly,
whatever the column order: this also proves act_order's permutation is undone.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fxquant.errors import FxqError
from fxquant.quant.gptq import gptq_quantize, round_to_nearest, search_qparams, weighted_error
from fxquant.quant.qparams import QParams
from fxquant.quant.quantizers import dequantize
from fxquant.quant.recovery_config import GptqConfig
from fxquant.quant.spec import QuantSpec


def _layer(seed: int, out: int = 4, k: int = 6, tokens: int = 64):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, k, generator=g, dtype=torch.float64)
    x = torch.randn(tokens, k, generator=g, dtype=torch.float64) @ torch.randn(k, k, generator=g, dtype=torch.float64)
    return w, x.T @ x


def _optimum(w: torch.Tensor, h: torch.Tensor, qp: QParams) -> float:
    """min over all code assignments of the H-weighted error, row by row (it is separable)."""
    codes = torch.tensor(list(itertools.product(range(qp.qmin, qp.qmax + 1), repeat=w.shape[1])), dtype=torch.float64)
    total = 0.0
    for r in range(w.shape[0]):
        err = (codes - qp.zero_point[r].double()) * qp.scale[r].double() - w[r]
        total += float(((err @ h) * err).sum(1).min())
    return total


@pytest.mark.parametrize("bits,symmetric", [(2, True), (3, False)])
def test_gptq_close_to_the_exhaustive_optimum_and_far_better_than_rounding(bits, symmetric):
    spec = QuantSpec(bits=bits, symmetric=symmetric, granularity="channel_wise")
    opt = rtn = gptq = 0.0
    for seed in range(12):
        w, h = _layer(seed)
        qp = search_qparams(w, spec, torch.diag(h))
        layer_opt = _optimum(w, h, qp)
        layer_gptq = weighted_error(w, gptq_quantize(w, h, spec, GptqConfig(), qparams=qp).weight, h)
        assert layer_opt <= layer_gptq * (1 + 1e-6)  # nothing beats the optimum (weights are float32)
        assert layer_gptq <= 5.0 * layer_opt, f"seed {seed}"
        opt, gptq = opt + layer_opt, gptq + layer_gptq
        rtn += weighted_error(w, round_to_nearest(w, qp), h)
    assert gptq <= 1.5 * opt
    assert gptq <= 0.8 * rtn


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("symmetric", [True, False])
def test_diagonal_h_gives_round_to_nearest_exactly(act_order, symmetric):
    spec = QuantSpec(bits=3, symmetric=symmetric, granularity="channel_wise")
    w, _ = _layer(3, out=8, k=20)
    diag = torch.linspace(0.5, 4.0, 20, dtype=torch.float64)[
        torch.randperm(20, generator=torch.Generator().manual_seed(0))
    ]
    for h in (torch.eye(20, dtype=torch.float64), torch.diag(diag)):
        qp = search_qparams(w, spec, torch.diag(h))
        result = gptq_quantize(w, h, spec, GptqConfig(act_order=act_order, block_size=7), qparams=qp)
        assert torch.equal(result.weight, round_to_nearest(w, qp))
        assert torch.equal(result.weight, dequantize(result.codes, qp))


def test_act_order_is_gptq_on_permuted_columns_with_the_permutation_undone():
    spec = QuantSpec(bits=3, granularity="channel_wise")
    w, h = _layer(5, out=6, k=10)
    qp = search_qparams(w, spec, torch.diag(h))
    ordered = gptq_quantize(w, h, spec, GptqConfig(act_order=True, damp=0.01), qparams=qp)
    perm = torch.argsort(torch.diag(h), descending=True, stable=True)
    by_hand = gptq_quantize(w[:, perm], h[perm][:, perm], spec, GptqConfig(act_order=False, damp=0.01), qparams=qp)
    assert not torch.equal(perm, torch.arange(10))
    assert torch.equal(ordered.codes, by_hand.codes[:, torch.argsort(perm)])


@pytest.mark.parametrize("act_order", [False, True])
def test_group_size_gives_each_group_of_columns_its_own_scales(act_order):
    spec = QuantSpec(bits=4, granularity="channel_wise")
    w, h = _layer(7, out=5, k=12)
    w[:, 8:] *= 20.0  # the last group is much larger: one scale per row would crush the others
    result = gptq_quantize(w, h, spec, GptqConfig(group_size=4, act_order=act_order), qparams=None)
    assert result.qparams is None and result.group_size == 4 and len(result.group_qparams) == 3
    for g, qp in enumerate(result.group_qparams):
        cols = slice(4 * g, 4 * g + 4)
        assert torch.equal(result.weight[:, cols], dequantize(result.codes[:, cols], qp))
        assert float(result.codes[:, cols].min()) >= qp.qmin and float(result.codes[:, cols].max()) <= qp.qmax
    assert torch.all(result.group_qparams[2].scale > 5 * result.group_qparams[0].scale)
    per_channel = gptq_quantize(w, h, spec, GptqConfig(act_order=act_order))
    assert weighted_error(w, result.weight, h) < 0.5 * weighted_error(w, per_channel.weight, h)


def test_group_size_with_identity_h_is_rounding_with_each_groups_searched_scale():
    spec = QuantSpec(bits=3, symmetric=False, granularity="channel_wise")
    w, _ = _layer(9, out=4, k=10)
    h = torch.eye(10, dtype=torch.float64)
    result = gptq_quantize(w, h, spec, GptqConfig(group_size=4, act_order=False))
    for g in range(3):
        cols = slice(4 * g, 4 * g + 4)
        qp = search_qparams(w[:, cols], spec)
        assert torch.equal(result.weight[:, cols], round_to_nearest(w[:, cols], qp))


def test_damp_handles_singular_h_and_dead_columns():
    spec = QuantSpec(bits=4, granularity="channel_wise")
    g = torch.Generator().manual_seed(11)
    w = torch.randn(3, 8, generator=g, dtype=torch.float64)
    x = torch.randn(5, 2, generator=g, dtype=torch.float64) @ torch.randn(2, 8, generator=g, dtype=torch.float64)
    x[:, 3] = 0.0  # an input that never fires
    h = x.T @ x  # rank 2 of 8
    for damp in (0.01, 0.0):  # without damping, it grows until H is positive definite
        result = gptq_quantize(w, h, spec, GptqConfig(damp=damp))
        assert torch.isfinite(result.weight).all()
        assert torch.all(result.weight[:, 3] == 0)
        assert result.damp_used > 0
        assert weighted_error(w, result.weight, h) <= weighted_error(w, round_to_nearest(w, result.qparams), h) * 1.01


def test_mismatched_h_is_refused():
    with pytest.raises(FxqError, match="must be \\(in, in\\)"):
        gptq_quantize(torch.zeros(2, 3), torch.eye(4), QuantSpec(bits=4))


def test_per_tensor_scale_and_search_minimizes_the_weighted_error():
    spec = QuantSpec(bits=4, granularity="layer_wise")
    w, h = _layer(13, out=4, k=8)
    qp = search_qparams(w, spec, torch.diag(h), per_channel=False)
    assert not qp.per_channel
    result = gptq_quantize(w, h, spec, per_channel=False)
    assert not result.qparams.per_channel and torch.equal(result.qparams.scale, qp.scale)
    top = float(w.abs().max())
    full = QParams(torch.tensor(top / spec.qmax), torch.tensor(0.0), spec.qmin, spec.qmax)
    searched = ((round_to_nearest(w, qp) - w) ** 2 * torch.diag(h)).sum()
    assert searched <= ((round_to_nearest(w, full) - w) ** 2 * torch.diag(h)).sum()


@settings(max_examples=25, deadline=None)
@given(
    bits=st.integers(2, 8),
    symmetric=st.booleans(),
    act_order=st.booleans(),
    seed=st.integers(0, 10_000),
    block=st.integers(1, 9),
)
def test_codes_are_integers_in_range_and_block_size_changes_nothing(bits, symmetric, act_order, seed, block):
    """Lazy batch updates are the same algebra as column-by-column ones: only float rounding
    differs, which may move a value sitting on a rounding boundary by one step."""
    spec = QuantSpec(bits=bits, symmetric=symmetric, granularity="channel_wise")
    w, h = _layer(seed, out=3, k=9, tokens=30)
    result = gptq_quantize(w, h, spec, GptqConfig(act_order=act_order, block_size=block))
    codes = result.codes
    assert torch.equal(codes, codes.round())
    assert float(codes.min()) >= spec.qmin and float(codes.max()) <= spec.qmax
    assert torch.equal(result.weight, dequantize(codes, result.qparams))
    one_block = gptq_quantize(w, h, spec, GptqConfig(act_order=act_order, block_size=128))
    differ = codes != one_block.codes
    assert int(differ.sum()) <= 1 and float((codes - one_block.codes).abs().max()) <= 1
