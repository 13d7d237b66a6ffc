"""Tests for fxquant.quant.observers.base: granularity, scale rule, each observer's statistic, errors."""

from __future__ import annotations

import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fxquant.quant.observers import (
    EmaObserver,
    MinMaxObserver,
    ObserverError,
    OmseObserver,
    PercentileObserver,
    make_observer,
    range_to_scale_zero_point,
)
from fxquant.quant.quantizers import fake_quantize, quantize
from fxquant.quant.spec import QuantSpec
from fxquant.quant.tail_quantiles import tail_quantiles


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _observe(spec: QuantSpec, *batches, **kw):
    obs = make_observer(spec, name=kw.pop("name", "pt"), **kw)
    for b in batches:
        obs.update(b)
    return obs.compute_qparams()


def _mse(x, qp, method="uniform") -> float:
    return float(((fake_quantize(x, qp, method) - x) ** 2).mean())


# ------------------------------------------------------------------------ scale rule
def test_minmax_symmetric_scale_is_amax_over_127_exactly():
    x = torch.randn(10, 20, generator=_gen()) * 3
    qp = _observe(QuantSpec(bits=8, signed=True), x)
    assert qp.scale.dim() == 0 and qp.zero_point.item() == 0
    assert qp.scale.item() == (x.abs().max() / 127).item()
    assert (qp.qmin, qp.qmax) == (-128, 127)


def test_unsigned_symmetric_uses_max_over_qmax():
    x = torch.rand(100, generator=_gen()) * 5
    qp = _observe(QuantSpec(bits=8, signed=False, symmetric=True), x)
    assert qp.scale.item() == (x.max() / 255).item() and qp.zero_point.item() == 0


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("bits", [4, 8])
def test_asymmetric_represents_min_and_max_within_one_step(signed, bits):
    x = torch.randn(1000, generator=_gen()) * 2 + 1.5  # negative min, larger positive max
    qp = _observe(QuantSpec(bits=bits, signed=signed, symmetric=False), x)
    assert qp.qmin <= qp.zero_point.item() <= qp.qmax
    ends = torch.stack([x.min(), x.max()])
    err = (fake_quantize(ends, qp) - ends).abs()
    assert torch.all(err <= qp.scale * 0.5 * (1 + 1e-5))
    assert fake_quantize(torch.zeros(1), qp).item() == 0.0


def test_range_always_includes_zero():
    lo, hi = torch.tensor([2.0]), torch.tensor([4.0])  # all-positive data
    scale, zp = range_to_scale_zero_point(lo, hi, QuantSpec(bits=8, signed=False))
    assert scale.item() == pytest.approx(4.0 / 255) and zp.item() == 0


def test_zero_tensor_and_constant_channels_give_finite_scales():
    w = torch.zeros(4, 6)
    w[1] = 3.0  # constant nonzero channel
    w[2] = torch.linspace(-1, 1, 6)
    for spec in (QuantSpec(), QuantSpec(signed=False), QuantSpec(method="log2", signed=False)):
        qp = _observe(spec.with_(granularity="channel_wise"), w, axis=0)
        assert torch.all(torch.isfinite(qp.scale)) and torch.all(qp.scale > 0)
        fq = fake_quantize(w, qp, spec.method)
        assert torch.all(fq[w == 0] == 0)  # zeros (whole channel 0, and w[2]'s middle) stay exact
        assert torch.allclose(fq[1], w[1], rtol=1e-6)
    qp = _observe(QuantSpec(), torch.zeros(3, 3))
    assert qp.scale.item() == 1.0 and fake_quantize(torch.zeros(3), qp).abs().sum() == 0


# ------------------------------------------------------------------------ granularity
def test_channel_wise_weight_matches_per_row_layer_wise():
    w = torch.randn(16, 32, generator=_gen())
    qp = _observe(QuantSpec(granularity="channel_wise"), w, axis=0)
    assert qp.scale.shape == (16,) and qp.axis == 0
    for i in range(16):
        assert qp.scale[i] == _observe(QuantSpec(), w[i]).scale


def test_channel_wise_activation_last_axis():
    x = torch.randn(2, 5, 8, generator=_gen())
    qp = _observe(QuantSpec(granularity="channel_wise", signed=False), x, axis=-1)
    assert qp.scale.shape == (8,)
    for c in range(8):
        ref = _observe(QuantSpec(signed=False), x[..., c])
        assert qp.scale[c] == ref.scale and qp.zero_point[c] == ref.zero_point


def test_head_wise_blocks_equal_layer_wise_of_each_block():
    heads, c = 4, 32
    x = torch.randn(3, 7, c, generator=_gen()) * torch.arange(1, c + 1)
    qp = _observe(QuantSpec(granularity="head_wise", signed=False), x, axis=-1, num_groups=heads)
    assert qp.scale.shape == (c,) and qp.axis == -1
    d = c // heads
    for h in range(heads):
        block = qp.scale[h * d : (h + 1) * d]
        assert torch.all(block == block[0])
        ref = _observe(QuantSpec(signed=False), x[..., h * d : (h + 1) * d])
        assert block[0] == ref.scale and qp.zero_point[h * d] == ref.zero_point


def test_head_wise_on_attention_scores_axis_1():
    s = torch.randn(2, 3, 5, 5, generator=_gen()) * torch.tensor([1.0, 10.0, 100.0]).view(1, 3, 1, 1)
    qp = _observe(QuantSpec(granularity="head_wise"), s, axis=1, num_groups=3)
    for h in range(3):
        assert qp.scale[h] == _observe(QuantSpec(), s[:, h]).scale


def test_group_wise_qkv_equals_three_layer_wise_observers():
    c = 12
    w = torch.randn(3 * c, c, generator=_gen()) * torch.tensor([1.0, 5.0, 0.2]).repeat_interleave(c).unsqueeze(1)
    for obs in ("minmax", "percentile", "omse"):
        spec = QuantSpec(granularity="group_wise", observer=obs, options={"percentile_alpha": 0.99})
        qp = _observe(spec, w, axis=0, num_groups=3)
        for i in range(3):
            ref = _observe(spec.with_(granularity="layer_wise"), w[i * c : (i + 1) * c])
            assert torch.allclose(qp.scale[i * c : (i + 1) * c], ref.scale.expand(c), rtol=1e-6), obs


def test_indivisible_groups_raise_naming_everything():
    obs = make_observer(QuantSpec(granularity="head_wise"), axis=-1, num_groups=5, name="blocks.0.attn.q")
    with pytest.raises(ValueError) as err:
        obs.update(torch.randn(2, 12))
    msg = str(err.value)
    assert "blocks.0.attn.q" in msg and "12" in msg and "5" in msg


def test_missing_axis_or_groups_rejected_at_construction():
    with pytest.raises(ValueError, match="axis"):
        make_observer(QuantSpec(granularity="channel_wise"), name="w")
    with pytest.raises(ValueError, match="num_groups"):
        make_observer(QuantSpec(granularity="group_wise"), axis=0, name="w")


def test_channel_count_change_between_batches_raises():
    obs = make_observer(QuantSpec(granularity="channel_wise"), axis=-1, name="fc1")
    obs.update(torch.randn(2, 8))
    with pytest.raises(ObserverError, match="fc1"):
        obs.update(torch.randn(2, 9))


# ------------------------------------------------------------------------ errors
@pytest.mark.parametrize("obs", ["minmax", "ema", "percentile", "omse"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_batch_raises_with_name_and_count(obs, bad):
    x = torch.randn(4, 8)
    x[0, 1] = bad
    x[2, 3] = bad
    o = make_observer(QuantSpec(observer=obs, granularity="channel_wise"), axis=-1, name="blocks.3.mlp.fc2")
    with pytest.raises(ObserverError) as err:
        o.update(x)
    msg = str(err.value)
    assert "blocks.3.mlp.fc2" in msg and "2 non-finite" in msg and "calibration data" in msg
    assert isinstance(err.value, ValueError)


def test_compute_before_update_raises():
    o = make_observer(QuantSpec(), name="head.fc")
    o.update(torch.empty(0))  # empty batches are ignored
    with pytest.raises(ObserverError, match=r"head\.fc.*no calibration data"):
        o.compute_qparams()


# ------------------------------------------------------------------------ observers
def test_factory_classes_and_state():
    kinds = {"minmax": MinMaxObserver, "ema": EmaObserver, "percentile": PercentileObserver, "omse": OmseObserver}
    for name, cls in kinds.items():
        o = make_observer(QuantSpec(observer=name), name="p")
        assert type(o) is cls
        o.update(torch.randn(10))
        o.update(torch.randn(10))
        assert o.num_updates == 2
        st_ = o.state()
        assert all(isinstance(v, torch.Tensor) for v in st_.values()) and int(st_["num_updates"]) == 2


def test_minmax_accumulates_across_batches():
    o = make_observer(QuantSpec(signed=False), name="p")
    o.update(torch.tensor([0.0, 1.0]))
    o.update(torch.tensor([-3.0, 0.5]))
    assert (o.state()["min"].item(), o.state()["max"].item()) == (-3.0, 1.0)


def test_ema_follows_formula():
    m = 0.7
    o = make_observer(QuantSpec(observer="ema", options={"ema_momentum": m}), name="p")
    batches = [torch.tensor([-1.0, 2.0]), torch.tensor([-4.0, 10.0]), torch.tensor([0.5, 1.0])]
    lo, hi = -1.0, 2.0
    for i, b in enumerate(batches):
        o.update(b)
        if i:
            lo, hi = m * lo + (1 - m) * b.min().item(), m * hi + (1 - m) * b.max().item()
    s = o.state()
    assert s["min"].item() == pytest.approx(lo) and s["max"].item() == pytest.approx(hi)
    assert o.compute_qparams().scale.item() == pytest.approx(max(-lo, hi) / 127)


@pytest.mark.parametrize("n,alpha", [(1, 0.99), (2, 0.9), (1000, 0.999), (100_003, 0.99999), (50_000, 0.9)])
def test_tail_quantiles_match_torch_quantile(n, alpha):
    x = torch.randn(3, n, generator=_gen(n))
    low, up = tail_quantiles(x, alpha)
    ref = x.double()  # float32 torch.quantile rounds alpha itself to float32
    assert torch.allclose(up.double(), torch.quantile(ref, alpha, dim=1), rtol=1e-6, atol=1e-6)
    assert torch.allclose(low.double(), torch.quantile(ref, 1 - alpha, dim=1), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("groups", [1, 5])
def test_chunked_topk_tail_is_exact(monkeypatch, groups):
    import fxquant.quant.tail_quantiles as quantiles

    monkeypatch.setattr(quantiles, "_CHUNK", 2000)  # force many chunks
    x = torch.randn(groups, 30_001, generator=_gen(groups))
    x[0] = x[0].sort().values  # all of the tail inside one chunk
    for alpha in (0.999, 0.99):
        low, up = tail_quantiles(x, alpha)
        ref = x.double()
        assert torch.allclose(up.double(), torch.quantile(ref, alpha, dim=1), rtol=1e-6, atol=1e-6)
        assert torch.allclose(low.double(), torch.quantile(ref, 1 - alpha, dim=1), rtol=1e-6, atol=1e-6)


def test_tail_quantiles_large_k_fallback_matches_kthvalue():
    x = torch.randn(1, 400_000, generator=_gen())
    low, up = tail_quantiles(x, 0.6)  # k ~ 160k > topk limit -> kthvalue path
    ref = x.double()
    assert torch.allclose(up.double(), torch.quantile(ref, 0.6, dim=1), rtol=1e-6, atol=1e-6)
    assert torch.allclose(low.double(), torch.quantile(ref, 0.4, dim=1), rtol=1e-6, atol=1e-6)


def test_percentile_on_12m_elements_is_fast_and_never_sorts(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("full sort / quantile used")

    monkeypatch.setattr(torch, "sort", boom)
    monkeypatch.setattr(torch.Tensor, "sort", boom)
    monkeypatch.setattr(torch, "quantile", boom)
    x = torch.randn(12_000_000, generator=_gen())
    o = make_observer(QuantSpec(observer="percentile"), name="big")
    t = time.perf_counter()
    o.update(x)
    qp = o.compute_qparams()
    assert time.perf_counter() - t < 5.0
    # the 0.99999 quantile of N(0,1) is ~4.26
    assert 4.0 < qp.scale.item() * 127 < 4.6


def test_percentile_clips_planted_outlier_but_minmax_does_not():
    x = torch.randn(200_000, generator=_gen())
    x[1234] = 1000 * x.abs().max()
    spec = QuantSpec(observer="percentile", options={"percentile_alpha": 0.9999})
    p = _observe(spec, x)
    m = _observe(spec.with_(observer="minmax"), x)
    assert m.scale.item() == pytest.approx(x.abs().max().item() / 127)
    assert p.scale.item() * 127 < 6.0
    assert _mse(x[:1234], p) < _mse(x[:1234], m) / 100


def test_percentile_smoothing_formula():
    sigma, alpha = 0.3, 0.75
    spec = QuantSpec(observer="percentile", options={"percentile_alpha": alpha, "percentile_sigma": sigma})
    o = make_observer(spec, name="p")
    a, b = torch.randn(101, generator=_gen(1)), torch.randn(101, generator=_gen(2)) * 3
    o.update(a)
    o.update(b)
    exp_up = sigma * torch.quantile(a, alpha) + (1 - sigma) * torch.quantile(b, alpha)
    exp_lo = sigma * torch.quantile(a, 1 - alpha) + (1 - sigma) * torch.quantile(b, 1 - alpha)
    assert o.state()["upper"].item() == pytest.approx(exp_up.item(), rel=1e-5)
    assert o.state()["lower"].item() == pytest.approx(exp_lo.item(), rel=1e-5)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    bits=st.sampled_from([4, 6, 8]),
    signed=st.booleans(),
    heavy=st.booleans(),
    gran=st.sampled_from(["layer_wise", "channel_wise"]),
)
def test_omse_never_worse_than_minmax(seed, bits, signed, heavy, gran):
    g = _gen(seed)
    x = torch.randn(6, 300, generator=g)
    if heavy:
        x = x**3
    kw = {"axis": 0} if gran == "channel_wise" else {}
    spec = QuantSpec(bits=bits, signed=signed, granularity=gran)
    om = _observe(spec.with_(observer="omse"), x, **kw)
    mm = _observe(spec, x, **kw)
    assert _mse(x, om) <= _mse(x, mm) * (1 + 1e-6)


def test_omse_clips_heavy_tails_and_is_deterministic():
    x = torch.randn(20_000, generator=_gen()) ** 3
    spec = QuantSpec(bits=4, observer="omse")
    a, b = _observe(spec, x), _observe(spec, x)
    assert torch.equal(a.scale, b.scale)
    mm = _observe(spec.with_(observer="minmax"), x)
    assert a.scale < mm.scale and _mse(x, a) < _mse(x, mm)


def test_omse_sample_is_bounded():
    spec = QuantSpec(observer="omse", granularity="channel_wise", options={"omse_group_samples": 64})
    o = make_observer(spec, axis=-1, name="p")
    for i in range(5):
        o.update(torch.randn(10, 50, 4, generator=_gen(i)))
    assert o.state()["sample"].shape == (4, 64)
    spec = QuantSpec(observer="omse", granularity="channel_wise", options={"omse_total_samples": 100})
    o = make_observer(spec, axis=-1, name="p")
    o.update(torch.randn(1000, 10, generator=_gen()))
    assert o.state()["sample"].shape == (10, 10)


def test_log2_observer_scale_is_the_max():
    probs = torch.softmax(torch.randn(2, 3, 5, 5, generator=_gen()), dim=-1)
    qp = _observe(QuantSpec(bits=4, signed=False, method="log2"), probs)
    assert (qp.qmin, qp.qmax) == (0, 15) and qp.zero_point.item() == 0
    assert qp.scale.item() == probs.max().item()
    assert _observe(QuantSpec(bits=4, signed=False, method="log2"), torch.zeros(4)).scale.item() == 1.0
    signed = _observe(QuantSpec(bits=4, signed=True, method="log2"), torch.tensor([-3.0, 0.5]))
    assert signed.scale.item() == 3.0 and (signed.qmin, signed.qmax) == (-8, 7)


@settings(max_examples=40, deadline=None)
@given(
    obs=st.sampled_from(["minmax", "ema", "percentile", "omse"]),
    gran=st.sampled_from(["layer_wise", "channel_wise", "head_wise"]),
    bits=st.integers(2, 8),
    signed=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
    zero_channel=st.booleans(),
)
def test_any_observer_gives_valid_params(obs, gran, bits, signed, seed, zero_channel):
    x = torch.randn(3, 5, 8, generator=_gen(seed)) * 10 ** torch.empty(1).uniform_(-3, 3, generator=_gen(seed))
    if zero_channel:
        x[..., :2] = 0
    kw = {} if gran == "layer_wise" else {"axis": -1, "num_groups": 4 if gran == "head_wise" else None}
    qp = _observe(QuantSpec(bits=bits, signed=signed, granularity=gran, observer=obs), x, x * 0.5, **kw)
    assert torch.all(torch.isfinite(qp.scale)) and torch.all(qp.scale > 0)
    q = quantize(x, qp)
    assert torch.all(q >= qp.qmin) and torch.all(q <= qp.qmax)
    assert torch.all(fake_quantize(x, qp)[x == 0] == 0)
