"""Observers: one calibration method per module, each registered by name; ``make_observer``
builds the one a spec names (:mod:`fxquant.quant.observers.registry`).

Importing this package imports every built-in observer module (``minmax``, ``ema``,
``percentile``, ``omse``, ``kl``, ``ptf``), which registers it.
"""

from __future__ import annotations

from fxquant.quant.observers.base import Observer, ObserverError, range_to_scale_zero_point, shrink_factors
from fxquant.quant.observers.deferred import EarlyStatistics
from fxquant.quant.observers.ema import EmaObserver
from fxquant.quant.observers.kl import KLObserver
from fxquant.quant.observers.minmax import MinMaxObserver
from fxquant.quant.observers.omse import OmseObserver
from fxquant.quant.observers.percentile import PercentileObserver
from fxquant.quant.observers.ptf import PtfObserver
from fxquant.quant.observers.registry import (
    make_observer,
    observer_class,
    register_observer,
    registered_observers,
    unregister_observer,
)

__all__ = [
    "EarlyStatistics",
    "EmaObserver",
    "KLObserver",
    "MinMaxObserver",
    "Observer",
    "ObserverError",
    "OmseObserver",
    "PercentileObserver",
    "PtfObserver",
    "make_observer",
    "observer_class",
    "range_to_scale_zero_point",
    "register_observer",
    "registered_observers",
    "shrink_factors",
    "unregister_observer",
]
