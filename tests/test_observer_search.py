"""The OMSE and KL range searches: the same choice as the one-candidate-at-a-time definition,
all channels at once, bounded options, and a progress bar for long searches."""

from __future__ import annotations

import time

import pytest
import torch

import fxquant
import fxquant.quant.progress as progress
from fxquant.errors import QConfigError
from fxquant.quant.observers import make_observer, range_to_scale_zero_point
from fxquant.quant.observers.kl import best_window, best_windows, kl_divergence
from fxquant.quant.progress import observer_progress
from fxquant.quant.qconfig import load_qconfig
from fxquant.quant.qparams import QParams
from fxquant.quant.quantizers import fake_quantize
from fxquant.quant.spec import QuantSpec


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------ references
def omse_reference(obs):
    """OMSE by its definition: one factor at a time, ties keep the earlier factor."""
    lo, hi, s = obs.min, obs.max, obs.sample
    best_err = best_f = None
    for i in range(obs.steps):
        f = 1.0 - i / obs.steps
        scale, zp = range_to_scale_zero_point(lo * f, hi * f, obs.spec)
        err = fake_quantize(s, QParams(scale, zp, obs.spec.qmin, obs.spec.qmax, axis=0), obs.spec.method) - s
        err = err.pow(2).sum(1)
        if best_err is None:
            best_err, best_f = err, torch.ones_like(err)
            continue
        better = err < best_err
        best_err, best_f = torch.where(better, err, best_err), torch.where(better, torch.full_like(best_f, f), best_f)
    return lo * best_f, hi * best_f


def kl_reference(values, lo, hi, bins, levels, steps):
    """KL's window search by its definition: every factor in turn, one histogram slice each."""
    if hi - lo <= 0 or bins <= levels:
        return 1.0
    width = max(hi - lo, torch.finfo(torch.float32).tiny)
    idx = ((values.double() - lo) / width * bins).floor_().clamp_(0, bins - 1).to(torch.int64)
    hist = torch.zeros(bins, dtype=torch.float64).index_add_(0, idx, torch.ones_like(idx, dtype=torch.float64))
    zero = -lo / (hi - lo) * bins
    best_f, best_kl = 1.0, None
    for i in range(steps):
        f = 1.0 - i / steps
        a, b = int(round(zero * (1 - f))), int(round(zero + f * (bins - zero)))
        if b - a < levels:
            break
        p = hist[a:b].clone()
        p[0] += hist[:a].sum()
        p[-1] += hist[b:].sum()
        kl = kl_divergence(p, levels)
        if best_kl is None or kl < best_kl - 1e-12:
            best_f, best_kl = f, kl
    return best_f


# ------------------------------------------------------------------------ OMSE
@pytest.mark.parametrize(
    "spec",
    [
        dict(bits=8, signed=False),
        dict(bits=8, signed=True),
        dict(bits=4, signed=True, symmetric=False),
        dict(bits=4, signed=False, method="log2"),
        dict(bits=6, signed=True, method="log2"),
    ],
    ids=["u8", "s8", "s4-affine", "log2-u4", "log2-s6"],
)
@pytest.mark.parametrize("granularity", ["layer_wise", "channel_wise"])
def test_omse_matches_the_one_factor_at_a_time_definition(spec, granularity):
    x = torch.randn(400, 6, generator=_gen(3)) ** 3
    spec = QuantSpec(observer="omse", granularity=granularity, options={"omse_steps": 150}, **spec)
    obs = make_observer(spec, axis=-1 if granularity == "channel_wise" else None, name="p")
    obs.update(x)
    lo, hi = obs._range()
    want_lo, want_hi = omse_reference(obs)
    assert torch.equal(lo, want_lo) and torch.equal(hi, want_hi)


# -------------------------------------------------------------------------- KL
@pytest.mark.parametrize("case", range(8))
def test_kl_windows_of_all_groups_match_the_definition(case):
    g = _gen(case)
    x = torch.randn(5, 3000, generator=g)
    if case % 4 == 1:
        x = x.abs()  # all mass on one side of zero
    if case % 4 == 2:
        x = torch.cat([x, torch.full((5, 1), 40.0)], 1)  # a lone outlier
    if case % 4 == 3:
        x = (x * 3).round() / 3  # many empty bins
    lo, hi = x.min(1).values.clamp(max=0), x.max(1).values.clamp(min=0)
    if case % 2:
        hi = torch.maximum(-lo, hi)
        lo = -hi
    bins, levels, steps = [(2048, 256, 100), (512, 16, 300), (128, 16, 1000), (64, 8, 50)][case % 4]
    got = best_windows(x, lo, hi, bins, levels, steps)
    want = [kl_reference(x[r], float(lo[r]), float(hi[r]), bins, levels, steps) for r in range(5)]
    assert got.tolist() == torch.tensor(want, dtype=torch.float32).tolist()
    assert best_window(x[0], float(lo[0]), float(hi[0]), bins, levels, steps) == got[0].item()


def test_kl_empty_range_and_too_few_bins_keep_the_full_range():
    x = torch.zeros(2, 100)
    assert best_windows(x, torch.zeros(2), torch.zeros(2), 2048, 256, 100).tolist() == [1.0, 1.0]
    y = torch.randn(1, 100, generator=_gen(0))
    assert best_windows(y, y.min(1).values, y.max(1).values, 256, 256, 100).tolist() == [1.0]


def test_channel_wise_kl_with_many_steps_is_fast():
    """64 channels, 2000 factors, 2048 bins: about 10 s one window at a time, well under a second now."""
    x = torch.randn(4096, 64, generator=_gen(1)) * torch.linspace(0.5, 4, 64)
    spec = QuantSpec(bits=8, signed=True, observer="kl", granularity="channel_wise", options={"omse_steps": 2000})
    obs = make_observer(spec, axis=-1, name="c")
    obs.update(x)
    start = time.perf_counter()
    scale = obs.compute_qparams().scale
    assert time.perf_counter() - start < 10.0
    assert scale.shape == (64,) and scale[-1] > 4 * scale[0]


# --------------------------------------------------------------- qconfig bounds
@pytest.mark.parametrize(
    "key, value, allowed",
    [
        ("omse_steps", 2001, "[1, 2000]"),
        ("omse_steps", 10_000, "[1, 2000]"),
        ("omse_steps", 0, "[1, 2000]"),
        ("kl_bins", 1 << 17, "[16, 65536]"),
        ("kl_bins", 8, "[16, 65536]"),
    ],
)
def test_search_options_are_bounded(key, value, allowed):
    with pytest.raises(QConfigError) as info:
        load_qconfig({"mlp_gelu": {"observer_type": "KLObserver", key: value}})
    message = str(info.value)
    assert f"<dict>: mlp_gelu.{key}: {value} is outside {allowed}" in message
    if key == "omse_steps" and value > 2000:
        assert "cost time" in message


def test_largest_allowed_search_options_parse():
    spec = load_qconfig({"mlp_gelu": {"observer_type": "KLObserver", "omse_steps": 2000, "kl_bins": 65536}}).spec_for(
        "mlp_gelu", "act"
    )
    assert spec.option("omse_steps", None) == 2000 and spec.option("kl_bins", None) == 65536


# -------------------------------------------------------------------- progress
def _long_search(capsys, enabled: bool) -> str:
    spec = QuantSpec(bits=8, signed=True, observer="omse", options={"omse_steps": 20})
    obs = make_observer(spec, name="blocks_0_mlp_act (mlp_gelu)")
    obs.update(torch.randn(1000, generator=_gen(0)))
    with observer_progress(enabled):
        obs.compute_qparams()
    return capsys.readouterr().err


def test_long_searches_show_a_bar_unless_switched_off(capsys, monkeypatch):
    monkeypatch.setattr(progress, "SHOW_ABOVE", 0)  # every search counts as long
    assert "OMSE blocks_0_mlp_act (mlp_gelu)" in _long_search(capsys, True)
    assert _long_search(capsys, False) == ""


def test_short_searches_show_no_bar(capsys):
    assert _long_search(capsys, True) == ""  # 20 x 1000 element operations


def test_compile_progress_false_shows_no_observer_bar(capsys, monkeypatch):
    import timm

    from tests.tiny import TINY_VIT, images

    monkeypatch.setattr(progress, "SHOW_ABOVE", 0)
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", **TINY_VIT).eval()
    fxquant.compile(model, "w8a8", calib_data=images(2, 32), progress=False, numeric_diff=False)
    assert "OMSE" not in capsys.readouterr().err
    fxquant.compile(model, "w8a8", calib_data=images(2, 32), progress=True, numeric_diff=False)
    assert "OMSE" in capsys.readouterr().err
