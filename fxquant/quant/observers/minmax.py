"""The min-max observer: the running per-group minimum and maximum."""

from __future__ import annotations

import torch

from fxquant.quant.observers.base import Observer
from fxquant.quant.observers.registry import register_observer
from fxquant.quant.spec import QuantSpec

__all__ = ["MinMaxObserver"]


@register_observer("minmax")
class MinMaxObserver(Observer):
    """Running per-group min and max over all batches (merge: elementwise min/max)."""

    def __init__(self, spec: QuantSpec, **kw):
        super().__init__(spec, **kw)
        self.min: torch.Tensor | None = None
        self.max: torch.Tensor | None = None

    def _observe(self, x, lo, hi):
        self.min = lo if self.min is None else torch.minimum(self.min, lo)
        self.max = hi if self.max is None else torch.maximum(self.max, hi)

    def _range(self):
        return self.min, self.max

    def state(self):
        return {"min": self.min, "max": self.max, "num_updates": self._count()}
