"""Observer statistics gathered before the values they describe exist: ``smooth`` goes over the
calibration data once, and in that pass also calibrates the observers, so ``calibrate`` need
not read the data again (:class:`EarlyStatistics`).

Most points keep their values when ``smooth`` folds its scales (their values change by float
rounding only), so their observers see them directly. A point on a smoothed activation ends
up holding ``x / S``, where ``S`` is the per-channel smoothing scale, known only once every
batch has been seen. Its observer is fed through a :class:`DeferredScale`:

* :class:`ChannelRange` (a :class:`~fxquant.quant.observers.minmax.MinMaxObserver`, exactly
  that class): keeps the running per-channel min and max of ``x`` (per channel and per index
  along the observer's own axis). The observer needs only
  the per-group min/max of ``x / S``, and dividing by a positive number keeps the order (in
  float too: rounding is monotone), so ``min(x / s) = min(x) / s`` channel by channel: the
  same range as the observer fed ``x / S`` batch by batch, from a few numbers per channel.
* :class:`Stash` (any other observer: OMSE, percentile, KL, EMA ... need the values or the
  per-batch sequence): keeps each batch's ``x`` and feeds ``x / S`` batch by batch at the end,
  in the same order, so seeded subsamples draw the same columns. Costs memory
  (``nbytes``); the caller bounds it.

The channel layout (``channel_dims``): the dimensions that hold the smoothed channel index,
row-major: ``(-1,)`` for (B, N, C) activations, ``(1, 3)`` for attention's (B, H, N, D)
(channel ``h * D + d``, as the V Linear's output is split into heads).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from fxquant.quant.observers.base import Observer
from fxquant.quant.observers.minmax import MinMaxObserver

__all__ = ["ChannelRange", "DeferredScale", "EarlyStatistics", "Stash", "deferred_for", "scale_like"]


def scale_like(scale: torch.Tensor, shape: torch.Size | tuple, channel_dims: tuple[int, ...]) -> torch.Tensor:
    """The per-channel ``scale`` (C,) shaped to broadcast against a value of ``shape`` whose
    ``channel_dims`` hold the channel index (row-major); ValueError when they do not hold C."""
    ndim = len(shape)
    dims = sorted(d % ndim for d in channel_dims)
    sizes = [shape[d] for d in dims]
    if int(torch.tensor(sizes).prod()) != scale.numel():
        raise ValueError(f"a value of shape {tuple(shape)} has no {scale.numel()} channels in dims {channel_dims}")
    view = [1] * ndim
    for d in dims:
        view[d] = shape[d]
    return scale.reshape(sizes).reshape(view)


class DeferredScale:
    """Feeds ``observer`` with ``x / S`` for batches ``x`` seen before ``S`` is known."""

    def __init__(self, observer: Observer, channel_dims: tuple[int, ...]):
        self.observer, self.channel_dims = observer, tuple(channel_dims)
        self.batches = 0
        self.nbytes = 0

    def update(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def finish(self, scale: torch.Tensor) -> None:
        """``scale``: the positive per-channel smoothing scale (C,); feeds the observer."""
        raise NotImplementedError


class ChannelRange(DeferredScale):
    """Running per-channel min/max (other dims reduced, kept as size 1); see the module doc."""

    def __init__(self, observer: Observer, channel_dims: tuple[int, ...]):
        super().__init__(observer, channel_dims)
        self.lo: Optional[torch.Tensor] = None
        self.hi: Optional[torch.Tensor] = None

    def update(self, x: torch.Tensor) -> None:
        x = x.detach()
        if x.numel() == 0:
            return
        if x.dtype not in (torch.float32, torch.float64):
            x = x.float()
        kept = {d % x.dim() for d in self.channel_dims}
        if self.observer.axis is not None and -x.dim() <= self.observer.axis < x.dim():
            kept.add(self.observer.axis % x.dim())  # its groups must stay apart
        reduce = tuple(d for d in range(x.dim()) if d not in kept)
        lo, hi = (
            (torch.amin(x, dim=reduce, keepdim=True), torch.amax(x, dim=reduce, keepdim=True)) if reduce else (x, x)
        )
        if not bool(torch.isfinite(lo).all() & torch.isfinite(hi).all()):
            self.observer.update(x)  # raises the observer's own error, naming this batch
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)
        self.batches += 1

    def finish(self, scale: torch.Tensor) -> None:
        if self.lo is None:
            return
        s = scale_like(scale.to(self.lo), self.lo.shape, self.channel_dims)
        # one tensor holding each channel's smallest and largest x / s: the same per-group range
        self.observer.update(torch.cat([self.lo / s, self.hi / s]), batches=self.batches)


class Stash(DeferredScale):
    """Every batch kept, fed as ``x / S`` in order at the end; see the module doc."""

    def __init__(self, observer: Observer, channel_dims: tuple[int, ...]):
        super().__init__(observer, channel_dims)
        self.values: list[torch.Tensor] = []

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().clone()
        self.values.append(x)
        self.nbytes += x.numel() * x.element_size()
        self.batches += 1

    def finish(self, scale: torch.Tensor) -> None:
        for x in self.values:
            self.observer.update(x / scale_like(scale.to(x.dtype), x.shape, self.channel_dims))
        self.values = []


def deferred_for(observer: Observer, channel_dims: tuple[int, ...]) -> DeferredScale:
    """The cheapest exact way to feed ``observer`` with values rescaled later."""
    if type(observer) is MinMaxObserver:
        return ChannelRange(observer, channel_dims)
    return Stash(observer, channel_dims)


@dataclass
class EarlyStatistics:
    """Observers calibrated by the pass ``made_by`` in its own pass over the data, by observer
    name (``"<node> (<point label>)"``, the name ``insert_observers`` gives them), and how many
    batches they saw. ``insert_observers`` adopts them (``adopted``) when it creates exactly
    these observers; ``calibrate`` then skips its pass over the data. ``off``: why the pass
    could not calibrate them (no observers then; ``calibrate`` reads the data and says why)."""

    made_by: str
    observers: dict[str, Observer] = field(default_factory=dict)
    batches: int = 0
    adopted: bool = False
    off: Optional[str] = None
