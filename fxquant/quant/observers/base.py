"""Calibration observers: collect statistics of a tensor, then turn them into QParams.

Every observer reduces a batch to one statistic per *group*:

* ``layer_wise``: one group (the whole tensor) -> 0-d scale;
* ``channel_wise``: one group per index along ``axis``;
* ``head_wise`` / ``group_wise``: the ``axis`` dimension (size C) split into ``num_groups``
  contiguous blocks of C / num_groups channels. The resulting QParams is still per-channel
  along ``axis`` (each group's scale repeated over its block), so consumers see one layout.

All observers share the grouping helper (``_Grouping``) and one range -> (scale, zero
point) rule (``range_to_scale_zero_point``); they differ only in how the per-group range
is estimated. Statistics are kept in float32 on the device the data came from.
"""

from __future__ import annotations

import torch

from fxquant.errors import FxqError
from fxquant.quant.progress import work_bar
from fxquant.quant.qparams import QParams
from fxquant.quant.quantizers import fake_quantize
from fxquant.quant.spec import QuantSpec
from fxquant.quant.tail_quantiles import tail_quantiles

__all__ = [
    "ObserverError",
    "Observer",
    "MinMaxObserver",
    "EmaObserver",
    "PercentileObserver",
    "OmseObserver",
    "range_to_scale_zero_point",
]

#: Smallest scale ever produced; keeps ``x / scale`` finite for any representable range.
SCALE_EPS = torch.finfo(torch.float32).tiny * 1e3


class ObserverError(FxqError, ValueError):
    """Bad calibration input (non-finite values, wrong shape, no data) for a named point."""


# ------------------------------------------------------------------------ scale rule
def range_to_scale_zero_point(lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group (scale, zero_point) from per-group [lo, hi]; the one rule all observers use.

    The range is widened to include 0 so that 0 (padding, ReLU/GELU zeros, masked
    attention) is always exact. A zero-width range gets scale 1.0 (any scale represents
    0 exactly) and scales never go below ``SCALE_EPS``, so there is no division by zero.
    For ``method == "log2"`` the scale is the largest magnitude (values are
    ``scale * 2**-m``, so the largest code-0 value is the observed maximum; softmax gives
    a scale <= 1), or 1.0 when that maximum is <= 0; the zero point is 0.
    """
    lo = torch.clamp(lo.float(), max=0.0)
    hi = torch.clamp(hi.float(), min=0.0)
    qmin, qmax = spec.qmin, spec.qmax
    zero = torch.zeros_like(lo)
    if spec.method == "log2":
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
    and ``state()``.
    """

    def __init__(self, spec: QuantSpec, *, axis: int | None = None, num_groups: int | None = None, name: str = "?"):
        self.spec, self.name = spec, name
        self._grouping = _Grouping(spec.granularity, axis, num_groups, name)
        self._n = 0

    @property
    def num_updates(self) -> int:
        return self._n

    def update(self, x: torch.Tensor) -> None:
        """Fold one calibration batch (any shape) into the statistics; empty tensors are ignored."""
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
        self._n += 1

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


class OmseObserver(MinMaxObserver):
    """FQ-ViT's OMSE: pick per group the clipping range minimising the quantization MSE.

    Keeps the running min/max plus a bounded, deterministic subsample of the calibration
    values (at most ``omse_group_samples`` = 2**16 per group and ``omse_total_samples`` =
    2**20 in all; seeded by ``omse_seed`` = 0). At compute time it tries ``omse_steps`` =
    100 shrink factors 1, 0.99, ..., 0.01 of the min/max range (at most 2000, see
    ``fxquant.quant.qconfig``) and keeps, per group, the one whose fake-quantized sample has the
    smallest squared error; each factor is scored for all groups at once, in one reused
    buffer. Factor 1.0 is tried first and ties keep the earlier factor, so the result is
    never worse than min-max on the sample.
    """

    def __init__(self, spec: QuantSpec, **kw):
        super().__init__(spec, **kw)
        self.steps = int(spec.option("omse_steps", 100))
        self.group_cap = int(spec.option("omse_group_samples", 2**16))
        self.total_cap = int(spec.option("omse_total_samples", 2**20))
        self._gen = torch.Generator().manual_seed(int(spec.option("omse_seed", 0)))
        self.sample: torch.Tensor | None = None  # (G, S) on the data's device
        self.keys: torch.Tensor | None = None  # (S,) float64 on CPU, larger = kept

    def _observe(self, x, lo, hi):
        super()._observe(x, lo, hi)
        xg = self._grouping.matrix(x)
        g, m = xg.shape
        cap = max(1, min(self.group_cap, self.total_cap // g))
        if m <= cap:
            cols, weight = xg.to(torch.float32, copy=True), 1.0
        else:  # uniform columns, with replacement: cheap for any m
            idx = torch.randint(m, (cap,), generator=self._gen)
            cols, weight = xg[:, idx.to(xg.device)].float(), m / cap
        # Weighted reservoir (Efraimidis-Spirakis, log keys): each kept column stands for
        # ``weight`` values, so batches of different sizes are represented fairly.
        keys = torch.rand(cols.shape[1], generator=self._gen, dtype=torch.float64).log_().div_(weight)
        if self.sample is not None:
            cols, keys = torch.cat([self.sample, cols], 1), torch.cat([self.keys, keys])
        if keys.numel() > cap:
            keep = keys.topk(cap).indices
            cols, keys = cols[:, keep.to(cols.device)], keys[keep]
        self.sample, self.keys = cols, keys

    def _range(self):
        lo, hi, s = self.min, self.max, self.sample
        factors = shrink_factors(self.steps).to(lo.device)
        errors = torch.empty(self.steps, lo.numel(), dtype=s.dtype, device=s.device)
        buf = torch.empty_like(s)  # one scratch buffer for every factor: no allocation per step
        qmin, qmax = self.spec.qmin, self.spec.qmax
        with work_bar(self.steps, self.steps * s.numel(), f"OMSE {self.name}") as bar:
            for i, f in enumerate(factors):
                scale, zp = range_to_scale_zero_point(lo * f, hi * f, self.spec)
                if self.spec.method == "uniform":  # fake_quantize's ops, in place on buf
                    scale, zp = scale[:, None], zp[:, None]
                    torch.div(s, scale, out=buf).round_().add_(zp).clamp_(qmin, qmax).sub_(zp).mul_(scale)
                else:
                    buf.copy_(fake_quantize(s, QParams(scale, zp, qmin, qmax, axis=0), self.spec.method))
                torch.sum(buf.sub_(s).pow_(2), 1, out=errors[i])
                bar.update(1)
        best = errors.argmin(0)  # the first minimum: factor 1.0 first, ties keep the earlier
        return lo * factors[best], hi * factors[best]

    def state(self):
        return {**super().state(), "sample": self.sample, "sample_keys": self.keys}


def shrink_factors(steps: int) -> torch.Tensor:
    """The candidate factors 1, 1 - 1/steps, ..., 1/steps (float32, as ``x * f`` rounds them)."""
    return (1.0 - torch.arange(steps, dtype=torch.float64) / steps).float()
