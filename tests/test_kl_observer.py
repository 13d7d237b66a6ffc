"""KLObserver: KL divergence of a clipping range, and the range it picks."""

import torch

from fxquant.quant.observers import make_observer
from fxquant.quant.observers.kl import KLObserver, best_window, kl_divergence
from fxquant.quant.spec import QuantSpec

KL8 = QuantSpec(bits=8, signed=True, observer="kl")  # kl_bins 2048


def test_divergence_is_zero_when_every_bin_is_its_own_level():
    assert kl_divergence(torch.tensor([1.0, 1.0, 1.0, 2.0], dtype=torch.float64), levels=4) == 0.0


def test_divergence_by_hand():
    # counts 1, 3, 0, 0 merged into 2 levels: level 0 holds 4 over 2 non-empty bins
    # -> Q = 2, 2, 0, 0; KL = 1/4 log(1/2) + 3/4 log(3/2)
    kl = kl_divergence(torch.tensor([1.0, 3.0, 0.0, 0.0], dtype=torch.float64), levels=2)
    expected = 0.25 * torch.log(torch.tensor(0.5)) + 0.75 * torch.log(torch.tensor(1.5))
    assert abs(kl - expected.item()) < 1e-6


def test_windows_never_narrower_than_the_grid():
    # 16 bins, 8 levels: the narrowest allowed window keeps 8 bins, i.e. f >= 0.5
    values = torch.cat([torch.zeros(1000), torch.tensor([16.0])])
    assert best_window(values, 0.0, 16.0, bins=16, levels=8, steps=100) >= 0.5


def test_kl_clips_a_lone_outlier_but_not_a_plain_gaussian():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20000, generator=g)
    obs = make_observer(KL8, name="plain")
    assert isinstance(obs, KLObserver)
    obs.update(x)
    plain = obs.compute_qparams().scale.item() * 127
    assert 2.5 < plain <= x.abs().max() + 1e-6  # the tails beyond ~3 sigma may be clipped, the bulk never

    y = torch.cat([x, torch.tensor([200.0])])
    obs = make_observer(KL8, name="outlier")
    obs.update(y)
    clipped = obs.compute_qparams().scale.item() * 127
    assert clipped < 50  # the range follows the bulk, not the single 200


def test_per_channel_kl_gives_one_range_per_channel():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5000, 4, generator=g) * torch.tensor([1.0, 2.0, 4.0, 8.0])
    obs = make_observer(KL8.with_(granularity="channel_wise"), axis=-1, name="c")
    obs.update(x)
    scale = obs.compute_qparams().scale
    assert scale.shape == (4,) and scale[3] > 4 * scale[0]  # each channel its own range
