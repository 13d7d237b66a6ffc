"""smooth calibrates the observers in its own pass over the data (issue 18, compile time).

Before: the tiny ViT with planted outlier channels, traced, annotated, qkv split, with
``smooth_alpha`` set. Expected: ``smooth -> insert_observers -> calibrate`` on one context
reads the calibration data once (calibrate says so and adopts smooth's observers), and every
observer ends with the statistics it gets when calibrate reads the data itself on the
smoothed graph (the separate path, forced by dropping ``ctx.statistics``): equal up to float
rounding, because the fused pass sees the unsmoothed values (x instead of x / s, or Q from
x @ W instead of (x / s) @ (s W)). Min-max observers on rescaled values (norm1, norm2, V)
go through per-channel ranges, the others (OMSE, percentile, EMA) through kept batches.
The per-channel range rule itself is exact: a hypothesis property against a min-max
observer fed x / s batch by batch.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fxquant.infra.pass_manager import PassManager
from fxquant.passes import Annotate, Calibrate, InsertObservers, Smooth, SplitQkv
from fxquant.quant.observers import MinMaxObserver, make_observer
from fxquant.quant.observers.deferred import ChannelRange, Stash, deferred_for, scale_like
from fxquant.quant.spec import QuantSpec
from fxquant.runtime.fake_quant import observer_nodes

OUTLIER_CHANNELS, OUTLIER_FACTOR = (3, 17, 42), 50.0
RTOL = 1e-5  # float32 rounding of rescaled/refolded values, a few ulps; qparams follow


def outliers(vit):
    model = copy.deepcopy(vit.model)
    with torch.no_grad():
        for block in model.blocks:
            for norm in (block.norm1, block.norm2):
                norm.weight[list(OUTLIER_CHANNELS)] *= OUTLIER_FACTOR
    return model


def act(observer: str, mode: str = "layer_wise") -> dict:
    return {"bits": 8, "signed": False, "calibration_mode": mode, "observer_type": observer}


def observed_graph(vit, trace, make_ctx, qconfig, *, fused: bool):
    """smooth, insert_observers, calibrate on the outlier ViT; ``fused=False`` drops smooth's
    statistics between the passes, so calibrate reads the data on the smoothed graph."""
    gm = trace(outliers(vit))
    ctx = make_ctx(gm, qconfig, vit.inputs(), vit.calib(batches=3, batch_size=3))
    gm = PassManager([Annotate(), SplitQkv(), Smooth()]).run(gm, ctx)
    if not fused:
        ctx.statistics = None
    manager = PassManager([InsertObservers(), Calibrate()], holds=ctx.properties)
    return manager.run(gm, ctx), ctx


def assert_close_to_scale(actual, expected, what):
    """Equal up to float32 rounding relative to the tensor's magnitude (a GELU output near zero
    differs by a rounding of its inputs' magnitude, not of its own)."""
    bound = RTOL * float(expected.abs().max())
    assert float((actual - expected).abs().max()) <= bound, what


def observers(gm):
    return {m.point_name: m.observer for _, m in observer_nodes(gm)}


@pytest.mark.parametrize("variant", ["minmax", "omse_percentile_ema"])
def test_fused_statistics_equal_separate_ones(vit, trace, make_ctx, qconfigs, variant):
    config = {**qconfigs.gemm_inputs(), "smooth_alpha": 0.5}
    if variant != "minmax":  # every rescaled point through kept batches, other observers elsewhere too
        config.update(
            norm1=act("PercentileObserver"),
            norm2=act("OmseObserver"),
            attn_v_out=act("OmseObserver"),
            attn_v_input=act("EmaObserver", "head_wise"),
            mlp_gelu=act("OmseObserver"),
        )
    fused, fused_ctx = observed_graph(vit, trace, make_ctx, config, fused=True)
    separate, separate_ctx = observed_graph(vit, trace, make_ctx, config, fused=False)

    calibrate_notes = fused_ctx.report.pass_record("calibrate").notes
    assert any("gathered in smooth's pass over the data (3 batches)" in n for n in calibrate_notes)
    assert not any("gathered in smooth" in n for n in separate_ctx.report.pass_record("calibrate").notes)
    a, b = observers(fused), observers(separate)
    assert a.keys() == b.keys() and len(a) == 8 * vit.depth + 1  # 8 points per block + final_norm
    kinds = {type(o).__name__ for o in a.values()}
    assert ("OmseObserver" in kinds) == (variant != "minmax")
    for name, observer in a.items():
        other = b[name]
        assert type(observer) is type(other) and observer.num_updates == other.num_updates == 3, name
        for key, value in observer.state().items():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                assert_close_to_scale(value, other.state()[key], f"{name} {key}")
        qa, qb = observer.compute_qparams(), other.compute_qparams()
        torch.testing.assert_close(qa.scale, qb.scale, rtol=RTOL, atol=0.0, msg=name)
        assert torch.equal(qa.zero_point, qb.zero_point) or (qa.zero_point - qb.zero_point).abs().max() <= 1, name


def test_statistics_are_dropped_after_a_pass_that_may_change_values(vit, trace, make_ctx, qconfigs):
    """A pass between smooth and calibrate that does not declare ``keeps_statistics`` may change
    the values: the manager drops smooth's statistics and calibrate reads the data."""
    gm = trace(outliers(vit))
    ctx = make_ctx(gm, {**qconfigs.gemm_inputs(), "smooth_alpha": 0.5}, vit.inputs(), vit.calib())
    gm = PassManager([Annotate(), SplitQkv(), Smooth()]).run(gm, ctx)
    assert ctx.statistics is not None and ctx.statistics.made_by == "smooth"

    class Rewrite(SplitQkv):  # any pass that is not smooth and does not keep statistics
        name = "rewrite"

    PassManager([Rewrite()], holds=ctx.properties).run(gm, ctx)

    assert ctx.statistics is None
    gm = PassManager([InsertObservers(), Calibrate()], holds=ctx.properties).run(gm, ctx)
    assert all(m.observer.num_updates == 2 for _, m in observer_nodes(gm))


def test_nan_in_calibration_data_is_still_calibrates_error(vit, trace, make_ctx, qconfigs):
    """A batch an observer refuses ends smooth's early statistics; calibrate raises, naming the node."""
    images = vit.image(3, seed=5)
    images[1, 0, 3, 3] = float("nan")
    gm = trace(vit.model)
    ctx = make_ctx(gm, {**qconfigs.gemm_inputs(), "smooth_alpha": 0.5}, vit.inputs(), [vit.image(2), images])
    gm = PassManager([Annotate(), SplitQkv(), Smooth()]).run(gm, ctx)
    assert ctx.statistics.off is not None and "non-finite" in ctx.statistics.off
    with pytest.raises(Exception, match=r"pass 'calibrate' failed: node .*non-finite"):
        PassManager([InsertObservers(), Calibrate()], holds=ctx.properties).run(gm, ctx)


# ------------------------------------------------------------------ the deferred rules
shapes = st.sampled_from([((2, 5, 6), (-1,)), ((2, 3, 4, 2), (1, 3)), ((1, 2, 3, 3), (1, 3))])


@settings(max_examples=60, deadline=None)
@given(shape=shapes, batches=st.integers(1, 4), seed=st.integers(0, 2**31 - 1), granularity=st.sampled_from("lch"))
def test_channel_range_equals_a_minmax_observer_fed_x_over_s(shape, batches, seed, granularity):
    (size, dims) = shape
    g = torch.Generator().manual_seed(seed)
    channels = int(torch.tensor([size[d] for d in dims]).prod())
    scale = torch.rand(channels, generator=g) * 20 + 1e-3
    kw = {"layer_wise": {}, "channel_wise": {"axis": -1}, "head_wise": {"axis": 1, "num_groups": size[1]}}
    mode = {"l": "layer_wise", "c": "channel_wise", "h": "head_wise"}[granularity]
    spec = QuantSpec(bits=8, signed=True, granularity=mode, observer="minmax")
    direct = make_observer(spec, name="direct", **kw[mode])
    deferred = deferred_for(make_observer(spec, name="deferred", **kw[mode]), dims)
    assert isinstance(deferred, ChannelRange)
    for _ in range(batches):
        x = torch.randn(size, generator=g) * torch.rand(size, generator=g) * 10
        direct.update(x / scale_like(scale, x.shape, dims))
        deferred.update(x)
    deferred.finish(scale)

    assert deferred.observer.num_updates == direct.num_updates == batches
    assert torch.equal(deferred.observer.min, direct.min) and torch.equal(deferred.observer.max, direct.max)


def test_stash_feeds_the_same_batches_rescaled():
    spec = QuantSpec(bits=8, signed=False, observer="omse")
    direct, deferred = make_observer(spec, name="a"), deferred_for(make_observer(spec, name="a"), (1, 3))
    assert isinstance(deferred, Stash) and not isinstance(deferred.observer, type(None))
    scale = torch.rand(6) + 0.5
    for seed in range(3):
        x = torch.randn(2, 3, 50, 2, generator=torch.Generator().manual_seed(seed))
        direct.update(x / scale_like(scale, x.shape, (1, 3)))
        deferred.update(x)
    assert deferred.nbytes == 3 * 2 * 3 * 50 * 2 * 4
    deferred.finish(scale)
    assert torch.equal(deferred.observer.sample, direct.sample) and torch.equal(deferred.observer.max, direct.max)


def test_scale_like_refuses_a_layout_without_the_channels():
    with pytest.raises(ValueError, match=r"no 8 channels in dims \(1, 3\)"):
        scale_like(torch.ones(8), (2, 3, 4, 2), (1, 3))
    assert not isinstance(deferred_for(MinMaxObserver(QuantSpec(observer="minmax")), (-1,)), Stash)


def test_log_adaptive_point_keeps_calibrates_pass(vit, trace, make_ctx, qconfigs):
    """log_adaptive's base search is fed by the ObserverModule, not by the observer smooth would
    feed early: smooth gives up its statistics, calibrate reads the data and every search has it."""
    config = {
        **qconfigs.gemm_inputs(),
        "smooth_alpha": 0.5,
        "attn_kv_out": act("MinmaxObserver", "head_wise"),
        "intSoft": {"bits": 8, "signed": False, "quantization_method": "log_adaptive"},
    }
    gm, ctx = observed_graph(vit, trace, make_ctx, config, fused=True)

    notes = ctx.report.pass_record("calibrate").notes
    assert any("log_adaptive's base search reads the calibration data in calibrate" in n for n in notes), notes
    searches = [m for _, m in observer_nodes(gm) if m.log_search is not None]
    assert len(searches) == vit.depth
    assert all(m.observer.num_updates == 3 for _, m in observer_nodes(gm))  # each batch once, not twice
