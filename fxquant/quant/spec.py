"""QuantSpec: what one quantization point asks for (bits, range, granularity, observer)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Mapping

GRANULARITIES = ("layer_wise", "channel_wise", "head_wise", "group_wise")
METHODS = ("uniform", "log2", "log_sqrt2", "log_adaptive")  # log bases: fxquant.quant.log_quantizers


@dataclass(frozen=True)
class QuantSpec:
    """One quantization point's recipe.

    ``symmetric`` defaults to ``signed``: signed tensors get a symmetric grid around zero,
    unsigned ones an affine grid with a zero point (the seed's ``signed: False`` Q/K/V are
    negative too, so they need the zero point).
    ``options`` holds observer settings: ``percentile_alpha``, ``percentile_sigma``,
    ``ema_momentum``, ``kl_bins``, ``omse_steps``, ``ptf_factors``.
    ``observer`` is a name in the observer registry (:mod:`fxquant.quant.observers.registry`,
    which sits above this module, so the name is checked there: by the qconfig loader, and by
    ``make_observer`` together with the observer's own ``check_spec``).
    """

    bits: int = 8
    signed: bool = True
    symmetric: bool | None = None
    granularity: str = "layer_wise"
    observer: str = "minmax"
    method: str = "uniform"
    options: Mapping[str, Any] = field(default_factory=dict)
    enabled: bool = True

    def __post_init__(self) -> None:
        if self.symmetric is None:
            object.__setattr__(self, "symmetric", bool(self.signed))
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 16:
            raise ValueError(f"bits must be an integer in 2..16, got {self.bits!r}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if not isinstance(self.observer, str) or not self.observer:
            raise ValueError(f"observer must be a registered observer's name, got {self.observer!r}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    def option(self, key: str, default: Any) -> Any:
        return self.options.get(key, default)

    def with_(self, **changes: Any) -> "QuantSpec":
        return replace(self, **changes)

    def describe(self) -> str:
        sign = "s" if self.signed else "u"
        sym = "sym" if self.symmetric else "asym"
        return f"{self.method}{self.bits}{sign}/{sym}/{self.granularity}/{self.observer}"
