"""KLObserver: the clipping range whose quantized histogram diverges least from the data's.

TensorRT's entropy calibration, per group and for affine as well as symmetric grids. The
observer keeps the running min/max and the OMSE observer's bounded, seeded sample. At
compute time each group's sample is histogrammed once over its full [min, max] range
([-m, m] with m = max |x| for symmetric grids) into
``kl_bins`` (= 2048) bins. Candidate ranges shrink that range around zero by factors
f = 1, 0.99, ... while the window still spans at least as many bins as the grid has levels
(below that the histogram cannot show the rounding any more). For each window, P is the
histogram inside it with the mass outside added to its edge bins (what clipping does),
and Q is P merged into as many buckets as the grid has levels, each bucket's mass spread
evenly over its non-empty bins. The window with the smallest KL(P || Q) wins (ties: the
wider one). Resolution is fixed by the one histogram, so wide and narrow ranges are scored
alike.
"""
from __future__ import annotations

import torch

from .observers import OmseObserver

__all__ = ["KLObserver", "kl_divergence"]


def kl_divergence(p: torch.Tensor, levels: int) -> float:
    """KL(P || Q) of one histogram ``p`` against its merge into ``levels`` buckets."""
    n = p.numel()
    bucket = torch.div(torch.arange(n) * levels, n, rounding_mode="floor")
    nonzero = (p > 0).double()
    mass = torch.zeros(levels, dtype=torch.float64).index_add_(0, bucket, p)
    count = torch.zeros(levels, dtype=torch.float64).index_add_(0, bucket, nonzero)
    q = (mass / count.clamp_min(1))[bucket] * nonzero
    total = p.sum().clamp_min(1)
    p, q = p / total, q / total
    keep = p > 0
    return float((p[keep] * torch.log(p[keep] / q[keep])).sum())


def _histogram(values: torch.Tensor, lo: float, hi: float, bins: int) -> torch.Tensor:
    width = max(hi - lo, torch.finfo(torch.float32).tiny)
    idx = ((values.double() - lo) / width * bins).floor_().clamp_(0, bins - 1).to(torch.int64)
    return torch.zeros(bins, dtype=torch.float64).index_add_(0, idx, torch.ones_like(idx, dtype=torch.float64))


def best_window(values: torch.Tensor, lo: float, hi: float, bins: int, levels: int, steps: int) -> float:
    """The shrink factor f of [lo, hi] (lo <= 0 <= hi) with the least divergence."""
    if hi - lo <= 0 or bins <= levels:
        return 1.0
    hist = _histogram(values, lo, hi, bins)
    zero = -lo / (hi - lo) * bins  # position of 0 in bins
    best_f, best_kl = 1.0, None
    for i in range(steps):
        f = 1.0 - i / steps
        a = int(round(zero * (1 - f)))
        b = int(round(zero + f * (bins - zero)))
        if b - a < levels:
            break
        p = hist[a:b].clone()
        p[0] += hist[:a].sum()
        p[-1] += hist[b:].sum()
        kl = kl_divergence(p, levels)
        if best_kl is None or kl < best_kl - 1e-12:
            best_f, best_kl = f, kl
    return best_f


class KLObserver(OmseObserver):
    """Clipping range by minimum KL divergence between data and quantized histograms."""

    def __init__(self, spec, **kw):
        super().__init__(spec, **kw)
        self.bins = int(spec.option("kl_bins", 2048))

    def _range(self):
        lo = torch.clamp(self.min, max=0.0)
        hi = torch.clamp(self.max, min=0.0)
        if self.spec.symmetric:  # the grid is [-m, m] whatever the data's skew: shrink that
            hi = torch.maximum(-lo, hi)
            lo = -hi
        levels = self.spec.qmax - self.spec.qmin + 1
        sample = self.sample.cpu()
        factors = [best_window(sample[g], float(lo[g]), float(hi[g]), self.bins, levels, self.steps)
                   for g in range(sample.shape[0])]
        f = torch.tensor(factors, dtype=lo.dtype, device=lo.device)
        return lo * f, hi * f
