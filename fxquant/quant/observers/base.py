"""The observers' base class and shared rules: collect statistics of a tensor, then turn them
into QParams. Each observer lives in its own module (``minmax``, ``ema``, ...) and registers
itself by name (:mod:`fxquant.quant.observers.registry`).

Every observer reduces a batch to one statistic per *group*:

* ``layer_wise``: one group (the whole tensor) -> 0-d scale;
* ``channel_wise``: one group per index along ``axis``;
* ``head_wise`` / ``group_wise``: the ``axis`` dimension (size C) split into ``num_groups``
  contiguous blocks of C / num_groups channels. The resulting QParams is still per-channel
  along ``axis`` (each group's scale repeated over its block), so consumers see one layout.

All observers share the grouping helper (``_Grouping``) and one range -> (scale, zero
point) rule (``range_to_scale_zero_point``); they differ only in how the per-group range
is estimated (OMSE, KL and PTF also share ``shrink_factors``). Statistics are kept in
float32 on the device the data came from.
"""

from __future__ import annotations

import torch

from fxquant.errors import FxqError
from fxquant.quant.qparams import QParams
from fxquant.quant.spec import QuantSpec

__all__ = ["ObserverError", "Observer", "range_to_scale_zero_point", "shrink_factors", "SCALE_EPS"]

#: Smallest scale ever produced; keeps ``x / scale`` finite for any representable range.
SCALE_EPS = torch.finfo(torch.float32).tiny * 1e3


class ObserverError(FxqError, ValueError):
    """Bad calibration input (non-finite values, wrong shape, no data) for a named point, or an
    observer name that nobody registered."""


# ------------------------------------------------------------------------ scale rule
def range_to_scale_zero_point(lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group (scale, zero_point) from per-group [lo, hi]; the one rule all observers use.

    The range is widened to include 0 so that 0 (padding, ReLU/GELU zeros, masked
    attention) is always exact. A zero-width range gets scale 1.0 (any scale represents
    0 exactly) and scales never go below ``SCALE_EPS``, so there is no division by zero.
    For the log methods (``log2``, ``log_sqrt2``, ``log_adaptive``) the scale is the largest magnitude (values are
    ``scale * 2**-m``, so the largest code-0 value is the observed maximum; softmax gives
    a scale <= 1), or 1.0 when that maximum is <= 0; the zero point is 0.
    """
    lo = torch.clamp(lo.float(), max=0.0)
    hi = torch.clamp(hi.float(), min=0.0)
    qmin, qmax = spec.qmin, spec.qmax
    zero = torch.zeros_like(lo)
    if spec.method != "uniform":
        top = torch.maximum(-lo, hi) if spec.signed else hi
        return _safe(top, top), zero
    if spec.symmetric:
        top = torch.maximum(-lo, hi) if spec.signed else hi
        return _safe(top / qmax, top), zero
    scale = _safe((hi - lo) / (qmax - qmin), hi - lo)
    zp = torch.clamp(qmin - torch.round(lo / scale), qmin, qmax)
    return scale, zp


def _safe(scale: torch.Tensor, width: torch.Tensor) -> torch.Tensor:
    """Scale 1.0 where the range has zero width, and never below ``SCALE_EPS``."""
    return torch.where(width > 0, scale, torch.ones_like(scale)).clamp_min(SCALE_EPS)


# -------------------------------------------------------------------------- grouping
class _Grouping:
    """How a tensor is cut into groups; validates shapes and expands group results."""

    def __init__(self, granularity: str, axis: int | None, num_groups: int | None, name: str):
        self.granularity, self.axis, self.name = granularity, axis, name
        self.channels: int | None = None
        if granularity == "layer_wise":
            self.num_groups: int | None = 1
            return
        if axis is None:
            raise ValueError(f"observer {name!r}: {granularity} quantization needs an axis")
        if granularity == "channel_wise":
            self.num_groups = None  # = channels, known at the first update
        elif num_groups is None or num_groups < 1:
            raise ValueError(f"observer {name!r}: {granularity} needs num_groups >= 1, got {num_groups!r}")
        else:
            self.num_groups = int(num_groups)

    @property
    def layer_wise(self) -> bool:
        return self.granularity == "layer_wise"

    def _resolve(self, x: torch.Tensor) -> tuple[int, int, int]:
        """(axis index, channels C, groups G) for ``x``, validated against earlier batches."""
        if x.dim() == 0 or not -x.dim() <= self.axis < x.dim():
            raise ObserverError(
                f"observer {self.name!r}: axis {self.axis} is out of range for a tensor of shape {tuple(x.shape)}"
            )
        ax = self.axis % x.dim()
        c = x.shape[ax]
        g = c if self.num_groups is None else self.num_groups
        if c % g:
            raise ObserverError(
                f"observer {self.name!r}: axis size {c} is not divisible by num_groups={g} ({self.granularity})"
            )
        if self.channels is not None and c != self.channels:
            raise ObserverError(
                f"observer {self.name!r}: axis {self.axis} has size {c} but earlier batches had {self.channels}"
            )
        self.channels = c
        return ax, c, g

    def minmax(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-group (min, max), shape (G,), without copying ``x``; NaN propagates."""
        if self.layer_wise:
            lo, hi = torch.aminmax(x)
            return lo.reshape(1), hi.reshape(1)
        ax, c, g = self._resolve(x)
        v = x.unflatten(ax, (g, c // g))  # a view
        dims = tuple(d for d in range(v.dim()) if d != ax)
        return torch.amin(v, dim=dims), torch.amax(v, dim=dims)

    def matrix(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as (G, M): row g holds every value of group g (copies unless layer-wise)."""
        if self.layer_wise:
            return x.reshape(1, -1)
        ax, _, g = self._resolve(x)
        return x.movedim(ax, 0).reshape(g, -1)

    def to_qparams(self, scale: torch.Tensor, zp: torch.Tensor, spec: QuantSpec) -> QParams:
        """Group results -> QParams: 0-d for layer-wise, else one entry per channel."""
        if self.layer_wise:
            return QParams(scale[0], zp[0], spec.qmin, spec.qmax, None)
        rep = self.channels // scale.numel()
        return QParams(scale.repeat_interleave(rep), zp.repeat_interleave(rep), spec.qmin, spec.qmax, self.axis)


# --------------------------------------------------------------------------- observers
class Observer:
    """Base class: validation, grouping and the shared range -> QParams step.

    Subclasses implement ``_observe(x, lo, hi)`` (``lo``/``hi`` are this batch's per-group
    min/max, already checked finite), ``_range()`` (the per-group range to quantize to)
    and ``state()``; one that accepts only some specs overrides ``check_spec``. A subclass
    becomes usable by name (qconfig ``observer_type``, ``make_observer``) once decorated with
    ``@register_observer("name")`` (:mod:`fxquant.quant.observers.registry`), which also sets
    ``registered_name``.
    """

    registered_name: str | None = None

    @classmethod
    def check_spec(cls, spec: QuantSpec) -> None:
        """Raise ValueError when this observer cannot serve ``spec`` (the qconfig loader calls
        it, so the error names the file and key); every spec is fine by default."""

    def __init__(self, spec: QuantSpec, *, axis: int | None = None, num_groups: int | None = None, name: str = "?"):
        type(self).check_spec(spec)
        self.spec, self.name = spec, name
        self._grouping = _Grouping(spec.granularity, axis, num_groups, name)
        self._n = 0

    @property
    def axis(self) -> int | None:
        """The axis its groups run along (None for layer-wise)."""
        return None if self._grouping.layer_wise else self._grouping.axis

    @property
    def num_updates(self) -> int:
        return self._n

    def update(self, x: torch.Tensor, *, batches: int = 1) -> None:
        """Fold one calibration batch (any shape) into the statistics; empty tensors are ignored.
        ``batches``: how many calibration batches ``x`` stands for (a summary of several, e.g.
        their per-channel ranges: :mod:`fxquant.quant.observers.deferred`)."""
        x = x.detach()
        if x.dtype not in (torch.float32, torch.float64):
            x = x.float()
        if x.numel() == 0:
            return
        lo, hi = self._grouping.minmax(x)
        if not bool(torch.isfinite(lo).all() & torch.isfinite(hi).all()):
            bad = int((~torch.isfinite(x)).sum())
            raise ObserverError(
                f"observer {self.name!r}: calibration batch {self._n} of shape {tuple(x.shape)} contains "
                f"{bad} non-finite value(s) (NaN/inf); check the calibration data and the op feeding this point"
            )
        self._observe(x, lo.float(), hi.float())
        self._n += batches

    def compute_qparams(self) -> QParams:
        if self._n == 0:
            raise ObserverError(
                f"observer {self.name!r} received no calibration data: update() was never called "
                "with a non-empty tensor before compute_qparams()"
            )
        lo, hi = self._range()
        scale, zp = range_to_scale_zero_point(lo, hi, self.spec)
        return self._grouping.to_qparams(scale, zp, self.spec)

    def state(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _observe(self, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> None:
        raise NotImplementedError

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _count(self) -> torch.Tensor:
        return torch.tensor(self._n, dtype=torch.int64)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {self.spec.describe()}, updates={self._n})"


def shrink_factors(steps: int) -> torch.Tensor:
    """The candidate factors 1, 1 - 1/steps, ..., 1/steps (float32, as ``x * f`` rounds them)."""
    return (1.0 - torch.arange(steps, dtype=torch.float64) / steps).float()
