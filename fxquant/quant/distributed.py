"""Calibration and evaluation across processes with torch.distributed (gloo on CPU, or nccl).

Under ``torchrun --nproc_per_node N`` with a process group initialised, each rank calls
``fxquant.compile`` on its own shard of the calibration data (:func:`shard_batches`: a
contiguous block of batches per rank, in rank order). The passes that read the data merge
what they saw with collectives, so every rank ends with the parameters a single process
would compute on the whole set:

- ``smooth``: per-channel activation maxima, ``all_reduce(MAX)`` (exact);
- ``calibrate``: every observer, through the per-observer-type merge registry below
  (:func:`register_merge`; looked up along the observer's class hierarchy, so a subclass
  without its own entry uses its parent's).

What each merge gives, against one process on the concatenated shards:

- ``MinMaxObserver``: ``all_reduce`` MIN / MAX: **exactly equal**.
- ``OmseObserver`` (and its subclasses ``KLObserver``, ``PtfObserver``, which keep the same
  state): min/max exactly; the per-rank weighted reservoirs are gathered in rank order and
  cut to the observer's cap by their keys, as the observer does between batches. While the
  whole calibration set fits the cap (2**16 values per group, 2**20 in all), the reservoir
  holds every value in the single-process order, so the result is **exactly equal**. Beyond
  the cap both are random subsamples of the same data: the chosen clipping factor can
  differ by the sampling noise (one factor step, 1 % of the range, in practice).
- ``EmaObserver`` and ``PercentileObserver`` keep an exponential moving average over
  batches, which depends on batch order, so there is no "whole set" answer to reproduce. A
  distributed run means: **each rank's average over its own shard, then the mean of the
  ranks' averages weighted by their batch counts**. Both that and the single-process average
  are convex combinations of the same per-batch statistics, so each merged range end lies
  within the spread (max - min over batches) of the per-batch statistics of the
  single-process value; a scale moves by at most (spread of lo + spread of hi) / (qmax - qmin).

Rank 0 writes reports and files (:func:`is_main_process`); every rank holds the same model.
For evaluation, :func:`shard_range` picks a rank's images and :func:`gather_outputs`
concatenates the ranks' outputs in order, so metrics computed on the gathered tensor equal
the single-process ones; :func:`reduce_sums` adds counters (correct, total) across ranks.

Nothing here runs unless ``torch.distributed`` is initialised with a world size above 1.
"""

from __future__ import annotations

import os
from typing import Callable, Iterable, Sequence

import torch
import torch.distributed as dist

from fxquant.errors import FxqError
from fxquant.quant.calib_data import as_batches
from fxquant.quant.observers.base import Observer
from fxquant.quant.observers.ema import EmaObserver
from fxquant.quant.observers.minmax import MinMaxObserver
from fxquant.quant.observers.omse import OmseObserver
from fxquant.quant.observers.percentile import PercentileObserver

__all__ = [
    "is_distributed",
    "rank",
    "world_size",
    "is_main_process",
    "init_from_env",
    "shard_range",
    "shard_batches",
    "register_merge",
    "merge_observers",
    "merge_calibration",
    "report_failure",
    "all_reduce_max",
    "gather_outputs",
    "reduce_sums",
    "DistributedError",
]


class DistributedError(FxqError):
    """A distributed run cannot go on (ranks disagree, a peer failed)."""


# ----------------------------------------------------------------------------- process group
def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return rank() == 0


def init_from_env(backend: str = "gloo") -> bool:
    """Initialise the default process group from torchrun's environment (WORLD_SIZE > 1).

    Returns True when this process is part of a multi-process run. Does nothing when a
    group already exists or when not launched by torchrun.
    """
    if dist.is_available() and dist.is_initialized():
        return is_distributed()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    dist.init_process_group(backend=backend)
    return is_distributed()


def _device() -> torch.device:
    """Where collectives run: CUDA for nccl, CPU otherwise (gloo)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ----------------------------------------------------------------------------------- sharding
def shard_range(n: int, rank_: int | None = None, world: int | None = None) -> range:
    """Rank ``rank_``'s contiguous block of ``range(n)``; blocks are in rank order and cover it."""
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    return range(r * n // w, (r + 1) * n // w)


def shard_batches(calib_data, rank_: int | None = None, world: int | None = None) -> list:
    """This rank's batches: a contiguous block of the batches, in order.

    ``calib_data`` as ``fxquant.compile`` takes it (an (N, C, H, W) tensor is first cut into
    compile's batches, so the union of the shards is exactly the single-process batch list).
    Contiguous blocks rather than DistributedSampler's interleaving: concatenated in rank
    order they are the single-process order, which makes OMSE's merge exact. Every rank needs
    at least one batch (``compile`` refuses empty data, and its peers would wait for it).
    """
    batches = list(as_batches(calib_data))
    w = world_size() if world is None else world
    if len(batches) < w:
        raise DistributedError(
            f"{len(batches)} calibration batch(es) for {w} ranks: every rank needs at least "
            "one; use more images or smaller batches"
        )
    return [batches[i] for i in shard_range(len(batches), rank_, world)]


# ---------------------------------------------------------------------------- merge registry
MergeFn = Callable[[Observer, list[int], dict], None]
_MERGES: dict[type, MergeFn] = {}


def register_merge(observer_type: type) -> Callable[[MergeFn], MergeFn]:
    """Decorator: ``fn(observer, counts, meta)`` merges ``observer``'s statistics in place.

    ``counts[r]`` is rank r's number of updates; ``meta`` holds the ``_describe`` entries of
    every rank for this observer (shapes, for ranks that saw nothing). Every rank calls it
    with the same observers in the same order, so collectives inside line up. Like
    ``register_observer``, it refuses a type that is not an Observer and a second merge for
    one type. This module imports the observer modules it merges one by one (not the
    ``fxquant.quant.observers`` package), so a new observer's module may register its merge
    beside itself without an import cycle.
    """
    if not (isinstance(observer_type, type) and issubclass(observer_type, Observer)):
        raise TypeError(f"register_merge({observer_type!r}): not a subclass of fxquant.quant.observers.Observer")

    def decorate(fn: MergeFn) -> MergeFn:
        if observer_type in _MERGES:
            raise ValueError(
                f"a distributed merge for {observer_type.__name__} is already registered "
                f"({_MERGES[observer_type].__qualname__}); cannot register {fn.__qualname__} too"
            )
        _MERGES[observer_type] = fn
        return fn

    return decorate


def merge_for(observer: Observer | type) -> MergeFn:
    """The merge registered for the observer's class or its nearest registered parent."""
    cls = observer if isinstance(observer, type) else type(observer)
    for parent in cls.__mro__:
        if parent in _MERGES:
            return _MERGES[parent]
    raise DistributedError(
        f"no distributed merge for {cls.__name__} (observer {getattr(observer, 'name', '?')!r}); "
        "register one with fxquant.quant.distributed.register_merge"
    )


_STATE_ATTRS = ("min", "max", "lower", "upper", "sample", "keys")


def _describe(observer: Observer) -> dict:
    shapes = {
        a: tuple(getattr(observer, a).shape)
        for a in _STATE_ATTRS
        if isinstance(getattr(observer, a, None), torch.Tensor)
    }
    return {
        "type": type(observer).__name__,
        "n": observer.num_updates,
        "shapes": shapes,
        "channels": observer._grouping.channels,
    }


def merge_observers(observers: Sequence[Observer]) -> None:
    """Merge every observer's statistics across ranks, in place (same list on every rank)."""
    if not is_distributed():
        return
    described: list = [None] * world_size()
    dist.all_gather_object(described, [_describe(o) for o in observers])
    for r, theirs in enumerate(described):
        if [d["type"] for d in theirs] != [d["type"] for d in described[0]]:
            raise DistributedError(
                f"rank {r} has different observers than rank 0 ({len(theirs)} vs "
                f"{len(described[0])}): every rank must compile the same model and qconfig"
            )
    for i, observer in enumerate(observers):
        metas = [theirs[i] for theirs in described]
        counts = [m["n"] for m in metas]
        if sum(counts) == 0:
            continue  # nobody saw data: lower_fake_quant names the point
        merge_for(observer)(observer, counts, metas)
        observer._n = sum(counts)
        if observer._grouping.channels is None:  # a rank without data learns the layout
            observer._grouping.channels = next(m["channels"] for m in metas if m["n"])


def report_failure() -> None:
    """Called by a rank whose calibration failed: its peers raise instead of waiting for it."""
    if is_distributed():
        dist.all_reduce(torch.tensor([1, 0], dtype=torch.int64, device=_device()))


def merge_calibration(observers: Sequence[Observer], batches: int) -> int:
    """After a rank's calibration loop: check no rank failed, merge, return the total batch count."""
    status = torch.tensor([0, batches], dtype=torch.int64, device=_device())
    dist.all_reduce(status)
    failed, total = (int(v) for v in status)
    if failed:
        raise DistributedError(
            f"{failed} other rank(s) failed during calibration (see their errors); rank {rank()} stops too"
        )
    merge_observers(observers)
    return total


# ------------------------------------------------------------------------- tensor collectives
def _placeholder(observer: Observer, attr: str, metas: list[dict], fill: float, dtype=torch.float32) -> torch.Tensor:
    """This rank's tensor, or one filled with ``fill`` shaped like a rank that has it."""
    value = getattr(observer, attr, None)
    if isinstance(value, torch.Tensor):
        return value
    shape = next(m["shapes"][attr] for m in metas if attr in m["shapes"])
    return torch.full(shape, fill, dtype=dtype)


def _all_reduce(t: torch.Tensor, op) -> torch.Tensor:
    work = t.detach().to(_device(), copy=True)
    dist.all_reduce(work, op=op)
    return work.to(t.device)


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """Elementwise maximum over ranks (the identity outside a distributed run)."""
    return _all_reduce(t, dist.ReduceOp.MAX) if is_distributed() else t


def _gather_along(t: torch.Tensor, dim: int, sizes: Sequence[int]) -> torch.Tensor:
    """Concatenate every rank's ``t`` along ``dim`` in rank order (sizes may differ)."""
    longest = max(sizes)
    pad_shape = list(t.shape)
    pad_shape[dim] = longest - t.shape[dim]
    padded = torch.cat([t, t.new_zeros(pad_shape)], dim).to(_device())
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p.narrow(dim, 0, s) for p, s in zip(parts, sizes)], dim).to(t.device)


def gather_outputs(local: torch.Tensor) -> torch.Tensor:
    """Every rank's ``local`` (e.g. model outputs on its :func:`shard_range`), concatenated
    along dim 0 in rank order, on every rank; ``local`` itself outside a distributed run."""
    if not is_distributed():
        return local
    sizes: list = [None] * world_size()
    dist.all_gather_object(sizes, (int(local.shape[0]), tuple(local.shape[1:]), str(local.dtype)))
    if len({s[1:] for s in sizes}) != 1:
        raise DistributedError(f"gather_outputs: ranks hold tensors of different shapes/dtypes {sizes}")
    return _gather_along(local, 0, [s[0] for s in sizes])


def reduce_sums(values: dict[str, float]) -> dict[str, float]:
    """Sum named counters over ranks (e.g. {"correct": 91, "total": 128}); same keys on every rank."""
    if not is_distributed():
        return dict(values)
    keys = sorted(values)
    summed = _all_reduce(torch.tensor([float(values[k]) for k in keys], dtype=torch.float64), dist.ReduceOp.SUM)
    return {k: float(v) for k, v in zip(keys, summed)}


# -------------------------------------------------------------------------- observer merges
@register_merge(MinMaxObserver)
def _merge_minmax(observer: MinMaxObserver, counts: list[int], metas: list[dict]) -> None:
    observer.min = _all_reduce(_placeholder(observer, "min", metas, float("inf")), dist.ReduceOp.MIN)
    observer.max = _all_reduce(_placeholder(observer, "max", metas, float("-inf")), dist.ReduceOp.MAX)


def _weighted_mean(observer: Observer, attr: str, counts: list[int], metas: list[dict]) -> torch.Tensor:
    """Batch-count-weighted mean of the ranks' ``attr`` (float64 sums, deterministic order)."""
    own = counts[rank()]
    value = _placeholder(observer, attr, metas, 0.0)
    total = _all_reduce(value.double() * own, dist.ReduceOp.SUM)
    return (total / sum(counts)).to(value.dtype)


@register_merge(EmaObserver)
def _merge_ema(observer: EmaObserver, counts: list[int], metas: list[dict]) -> None:
    observer.min = _weighted_mean(observer, "min", counts, metas)
    observer.max = _weighted_mean(observer, "max", counts, metas)


@register_merge(PercentileObserver)
def _merge_percentile(observer: PercentileObserver, counts: list[int], metas: list[dict]) -> None:
    observer.lower = _weighted_mean(observer, "lower", counts, metas)
    observer.upper = _weighted_mean(observer, "upper", counts, metas)


@register_merge(OmseObserver)
def _merge_omse(observer: OmseObserver, counts: list[int], metas: list[dict]) -> None:
    """Min/max exactly; the reservoirs gathered in rank order and cut to the cap by key."""
    _merge_minmax(observer, counts, metas)
    sizes = [m["shapes"].get("keys", (0,))[0] for m in metas]
    groups = next(m["shapes"]["sample"][0] for m in metas if "sample" in m["shapes"])
    sample = observer.sample if observer.sample is not None else torch.zeros(groups, 0)
    keys = observer.keys if observer.keys is not None else torch.zeros(0, dtype=torch.float64)
    sample = _gather_along(sample.float(), 1, sizes)
    keys = _gather_along(keys.double(), 0, sizes)
    cap = max(1, min(observer.group_cap, observer.total_cap // groups))
    if keys.numel() > cap:  # as OmseObserver._observe keeps its reservoir
        keep = keys.topk(cap).indices
        sample, keys = sample[:, keep.to(sample.device)], keys[keep]
    observer.sample, observer.keys = sample, keys


def observers_in(modules: Iterable) -> list[Observer]:
    """The observers of ObserverModules (graph order)."""
    return [m.observer for m in modules]
