"""KLObserver: the clipping range whose quantized histogram diverges least from the data's.

TensorRT's entropy calibration, applied per group. The observer keeps the running min/max
and the OMSE observer's bounded, seeded sample. At compute time it tries ``omse_steps``
(= 100) shrink factors f = 1, 0.99, ... of the min/max range; for each, the sample is
clipped into [f*lo, f*hi] and histogrammed into ``kl_bins`` (= 2048) bins (P, outliers land
in the edge bins), P is merged into as many buckets as the grid has levels and each bucket's
mass spread evenly over its non-empty bins (Q), and KL(P || Q) is scored. The factor with
the smallest divergence wins (ties: the wider range).
"""
from __future__ import annotations

import torch

from .observers import OmseObserver

__all__ = ["KLObserver", "kl_divergence_of_range"]


def _histograms(sample: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bins: int) -> torch.Tensor:
    """Per-row histogram (G, bins) of ``sample`` clipped into [lo, hi] (per row)."""
    width = (hi - lo).clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(1)
    idx = ((sample - lo.unsqueeze(1)) / width * bins).floor_().clamp_(0, bins - 1).to(torch.int64)
    hist = torch.zeros(sample.shape[0], bins, dtype=torch.float64, device=sample.device)
    return hist.scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float64))


def kl_divergence_of_range(sample: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bins: int,
                           levels: int) -> torch.Tensor:
    """KL(P || Q) per row for clipping range [lo, hi] with ``levels`` quantization levels."""
    p = _histograms(sample, lo, hi, bins)
    levels = min(levels, bins)
    bucket = torch.div(torch.arange(bins, device=p.device) * levels, bins, rounding_mode="floor")
    nonzero = (p > 0).double()
    mass = torch.zeros(p.shape[0], levels, dtype=torch.float64, device=p.device).index_add_(1, bucket, p)
    count = torch.zeros_like(mass).index_add_(1, bucket, nonzero)
    q = (mass / count.clamp_min(1))[:, bucket] * nonzero
    total = p.sum(1, keepdim=True).clamp_min(1)
    p, q = p / total, q / total
    terms = torch.where(p > 0, p * torch.log(p / q.clamp_min(1e-30)), torch.zeros_like(p))
    return terms.sum(1)


class KLObserver(OmseObserver):
    """Clipping range by minimum KL divergence between data and quantized histograms."""

    def __init__(self, spec, **kw):
        super().__init__(spec, **kw)
        self.bins = int(spec.option("kl_bins", 2048))

    def _range(self):
        lo, hi, s = self.min, self.max, self.sample
        levels = self.spec.qmax - self.spec.qmin + 1
        best_kl = best_f = None
        for i in range(self.steps):
            f = 1.0 - i / self.steps
            kl = kl_divergence_of_range(s, torch.clamp(lo, max=0.0) * f, torch.clamp(hi, min=0.0) * f,
                                        self.bins, levels)
            if best_kl is None:
                best_kl, best_f = kl, torch.ones_like(kl)
                continue
            better = kl < best_kl - 1e-12
            best_kl = torch.where(better, kl, best_kl)
            best_f = torch.where(better, torch.full_like(best_f, f), best_f)
        best_f = best_f.to(lo.dtype)
        return lo * best_f, hi * best_f
