"""Observers: one calibration method each; ``make_observer`` builds the one a spec names."""

from __future__ import annotations

from fxquant.quant.observers.base import (
    EmaObserver,
    MinMaxObserver,
    Observer,
    ObserverError,
    OmseObserver,
    PercentileObserver,
    range_to_scale_zero_point,
    shrink_factors,
)
from fxquant.quant.observers.kl import KLObserver
from fxquant.quant.observers.ptf import PtfObserver
from fxquant.quant.spec import QuantSpec

_OBSERVERS = {
    "minmax": MinMaxObserver,
    "ema": EmaObserver,
    "percentile": PercentileObserver,
    "omse": OmseObserver,
    "kl": KLObserver,
    "ptf": PtfObserver,
}


def make_observer(
    spec: QuantSpec, *, axis: int | None = None, num_groups: int | None = None, name: str = "?"
) -> Observer:
    """The observer class named by ``spec.observer``."""
    return _OBSERVERS[spec.observer](spec, axis=axis, num_groups=num_groups, name=name)


__all__ = [
    "EmaObserver",
    "KLObserver",
    "MinMaxObserver",
    "Observer",
    "ObserverError",
    "OmseObserver",
    "PercentileObserver",
    "PtfObserver",
    "make_observer",
    "range_to_scale_zero_point",
    "shrink_factors",
]
