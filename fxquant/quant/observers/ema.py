"""The EMA observer: an exponential moving average of each batch's per-group min/max."""

from __future__ import annotations

from fxquant.quant.observers.minmax import MinMaxObserver
from fxquant.quant.observers.registry import register_observer
from fxquant.quant.spec import QuantSpec

__all__ = ["EmaObserver"]


@register_observer("ema")
class EmaObserver(MinMaxObserver):
    """EMA of per-batch min/max: ``new = m * old + (1 - m) * batch``; the first batch initialises.

    Damps the influence of a single extreme batch. ``m`` = ``spec.option("ema_momentum", 0.9)``.
    """

    def __init__(self, spec: QuantSpec, **kw):
        super().__init__(spec, **kw)
        self.momentum = float(spec.option("ema_momentum", 0.9))

    def _observe(self, x, lo, hi):
        if self.min is None:
            self.min, self.max = lo, hi
            return
        m = self.momentum
        self.min = m * self.min + (1.0 - m) * lo
        self.max = m * self.max + (1.0 - m) * hi
