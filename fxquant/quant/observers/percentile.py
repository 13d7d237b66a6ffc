"""The percentile observer (FQ-ViT): smoothed per-batch tail percentiles per group."""

from __future__ import annotations

import torch

from fxquant.quant.observers.base import Observer
from fxquant.quant.observers.registry import register_observer
from fxquant.quant.spec import QuantSpec
from fxquant.quant.tail_quantiles import tail_quantiles

__all__ = ["PercentileObserver"]


@register_observer("percentile")
class PercentileObserver(Observer):
    """Per-batch (1-alpha, alpha) percentiles per group, smoothed across batches like FQ-ViT.

    ``new = sigma * old + (1 - sigma) * batch``; ``alpha`` = ``percentile_alpha`` (0.99999),
    ``sigma`` = ``percentile_sigma`` (0.1). Percentiles use torch.quantile's linear
    interpolation but are computed from the tails only (see ``tail_quantiles``), so a
    10M+ element tensor never gets sorted and torch.quantile's 16M-element limit is avoided.
    """

    def __init__(self, spec: QuantSpec, **kw):
        super().__init__(spec, **kw)
        self.alpha = float(spec.option("percentile_alpha", 0.99999))
        self.sigma = float(spec.option("percentile_sigma", 0.1))
        if not 0.5 <= self.alpha <= 1.0:
            raise ValueError(f"observer {self.name!r}: percentile_alpha must be in [0.5, 1], got {self.alpha}")
        self.lower: torch.Tensor | None = None
        self.upper: torch.Tensor | None = None

    def _observe(self, x, lo, hi):
        low, up = tail_quantiles(self._grouping.matrix(x), self.alpha)
        if self.lower is None:
            self.lower, self.upper = low, up
            return
        s = self.sigma
        self.lower = s * self.lower + (1.0 - s) * low
        self.upper = s * self.upper + (1.0 - s) * up

    def _range(self):
        return self.lower, self.upper

    def state(self):
        return {"lower": self.lower, "upper": self.upper, "num_updates": self._count()}
