"""KLObserver: the clipping range whose quantized histogram diverges least from the data's.

TensorRT's entropy calibration, per group and for affine as well as symmetric grids. The
observer keeps the running min/max and the OMSE observer's bounded, seeded sample. At
compute time each group's sample is histogrammed once over its full [min, max] range
([-m, m] with m = max |x| for symmetric grids) into
``kl_bins`` (= 2048) bins. Candidate ranges shrink that range around zero by factors
f = 1, 0.99, ... (``omse_steps`` = 100 of them) while the window still spans at least as
many bins as the grid has levels (below that the histogram cannot show the rounding any
more). For each window, P is the histogram inside it with the mass outside added to its
edge bins (what clipping does), and Q is P merged into as many buckets as the grid has
levels, each bucket's mass spread evenly over its non-empty bins. The window with the
smallest KL(P || Q) wins (ties within ``KL_TIE`` = 1e-10: the wider one). Resolution is
fixed by the one histogram, so wide and narrow ranges are scored alike.

All groups and candidates are scored together: with H (counts), N (non-empty bins) and
E (h log h) as prefix sums over the bins (counts are integers, so H and N are exact),
bucket j of a window holds mass M_j and C_j
non-empty bins, and KL = (sum of E over the window - sum_j M_j log(M_j / C_j)) / total,
so one candidate costs O(levels), not O(bins), whatever ``kl_bins`` is. Factors that give
the same window as the previous one (more steps than bins) are scored once.
"""

from __future__ import annotations

import torch

from fxquant.quant.observers.omse import OmseObserver
from fxquant.quant.observers.registry import register_observer
from fxquant.quant.progress import work_bar

__all__ = ["KLObserver", "kl_divergence", "best_window", "best_windows"]

KL_TIE = 1e-10  # KL divergences closer than this are a tie (prefix sums are not exact below)
_GROUP_BINS = 2**20  # groups x bins per histogram block (8 MB per 64-bit array)
_WINDOW_BUCKETS = 2**21  # candidate windows x (levels + 1) per scoring block


def kl_divergence(p: torch.Tensor, levels: int) -> float:
    """KL(P || Q) of one histogram ``p`` against its merge into ``levels`` buckets (the
    definition, one window at a time; :func:`best_windows` computes the same in bulk)."""
    n = p.numel()
    bucket = torch.div(torch.arange(n) * levels, n, rounding_mode="floor")
    nonzero = (p > 0).double()
    mass = torch.zeros(levels, dtype=torch.float64).index_add_(0, bucket, p)
    count = torch.zeros(levels, dtype=torch.float64).index_add_(0, bucket, nonzero)
    q = (mass / count.clamp_min(1))[bucket] * nonzero
    total = p.sum().clamp_min(1)
    p, q = p / total, q / total
    keep = p > 0
    return float((p[keep] * torch.log(p[keep] / q[keep])).sum())


def _histograms(values: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bins: int) -> torch.Tensor:
    """(G, bins) float64 counts of each row of ``values`` over its own [lo, hi]."""
    width = (hi - lo).clamp_min(torch.finfo(torch.float32).tiny)
    idx = ((values.double() - lo[:, None]) / width[:, None] * bins).floor_().clamp_(0, bins - 1).to(torch.int64)
    return torch.zeros(values.shape[0], bins, dtype=torch.float64).scatter_add_(
        1, idx, torch.ones_like(idx, dtype=torch.float64)
    )


def _windows(lo: torch.Tensor, hi: torch.Tensor, bins: int, levels: int, factors: torch.Tensor):
    """Bin windows [a, b) of every factor per group; ``score``: the ones to evaluate (wide
    enough, before the first too narrow one, not a repeat of the previous factor's)."""
    f = factors[None, :]  # float64, as the factors 1 - i / steps are computed
    zero = (-lo / (hi - lo) * bins)[:, None]  # position of 0 in bins
    a = torch.round(zero * (1 - f)).to(torch.int64)
    b = torch.round(zero + f * (bins - zero)).to(torch.int64)
    wide = (b - a >= levels).to(torch.int64).cumprod(1).bool()  # the search stops at the first narrow one
    repeat = torch.zeros_like(wide)
    repeat[:, 1:] = (a[:, 1:] == a[:, :-1]) & (b[:, 1:] == b[:, :-1])
    return a, b, wide & ~repeat


def _xlogx(x: torch.Tensor) -> torch.Tensor:
    return torch.special.xlogy(x, x)


def _at(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``table[index]`` for a 1-d table (index_select: several times faster than indexing)."""
    return table.index_select(0, index.flatten()).view(index.shape)


def _score(hist: torch.Tensor, g: torch.Tensor, a: torch.Tensor, b: torch.Tensor, levels: int) -> torch.Tensor:
    """KL(P || Q) of the windows [a, b) of the histograms ``hist[g]`` (one per entry).

    Counts are integers: the prefix sums of counts (H) and of non-empty bins (N) are packed
    into one int64 (H << 32 | N) so one gather gives both, and m log m, log c come from tables.
    """
    width = hist.shape[1] + 1
    counts = hist.to(torch.int64)
    zeros = counts.new_zeros(counts.shape[0], 1)
    packed = torch.cat([zeros, (counts << 32 | (counts > 0)).cumsum(1)], 1).flatten()
    cum_e = torch.cat([hist.new_zeros(hist.shape[0], 1), _xlogx(hist).cumsum(1)], 1).flatten()
    total = counts.sum(1)
    ints = torch.arange(int(total.max()) + 1, dtype=torch.float64)
    xlogx, log = _xlogx(ints), torch.log(ints.clamp_min(1))
    shift = levels.bit_length() - 1 if levels & (levels - 1) == 0 else None
    j = torch.arange(levels + 1)
    out = []
    step = max(1, _WINDOW_BUCKETS // (levels + 1))
    for gs, as_, bs in zip(g.split(step), a.split(step), b.split(step)):
        spans = j * (bs - as_)[:, None] + (levels - 1)
        starts = spans >> shift if shift is not None else torch.div(spans, levels, rounding_mode="floor")
        base = gs * width
        cells = _at(packed, (base + as_)[:, None] + starts).diff(dim=1)  # bucket j: mass << 32 | non-empty bins
        mass, count = cells >> 32, cells & 0xFFFFFFFF
        left = _at(packed, base + as_) >> 32  # what clipping adds to the edge bins
        right = total[gs] - (_at(packed, base + bs) >> 32)
        first, last = counts[gs, as_], counts[gs, bs - 1]
        mass[:, 0] += left
        mass[:, -1] += right
        count[:, 0] += (first == 0) & (left > 0)
        count[:, -1] += (last == 0) & (right > 0)
        e = (
            _at(cum_e, base + bs)
            - _at(cum_e, base + as_)
            - xlogx[first]
            - xlogx[last]
            + xlogx[first + left]
            + xlogx[last + right]
        )
        merged = (_at(xlogx, mass) - mass * _at(log, count.clamp_min(1))).sum(1)  # sum_j M_j log(M_j / C_j)
        out.append((e - merged) / total[gs].clamp_min(1))
    return torch.cat(out) if out else hist.new_zeros(0)


def best_windows(
    values: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bins: int, levels: int, steps: int, name: str = "?"
) -> torch.Tensor:
    """Per row of ``values`` (G, S): the shrink factor f of [lo, hi] (lo <= 0 <= hi) with the
    least divergence, 1.0 where the range is empty or ``bins <= levels``; float32, (G,)."""
    lo, hi = lo.double().cpu(), hi.double().cpu()
    factors = 1.0 - torch.arange(steps, dtype=torch.float64) / steps
    best = torch.ones(values.shape[0], dtype=torch.float32)
    live = torch.nonzero(hi - lo > 0).flatten()
    if bins <= levels or live.numel() == 0:
        return best
    block = max(1, _GROUP_BINS // bins)
    with work_bar(
        live.numel(), float(live.numel()) * min(steps, bins) * levels + values.numel() * 4.0, f"KL {name}", unit="group"
    ) as bar:
        for rows in live.split(block):
            hist = _histograms(values[rows].cpu(), lo[rows], hi[rows], bins)
            a, b, score = _windows(lo[rows], hi[rows], bins, levels, factors)
            g, k = torch.nonzero(score, as_tuple=True)
            kl = torch.full(score.shape, float("inf"), dtype=torch.float64)
            kl[g, k] = _score(hist, g, a[g, k], b[g, k], levels)
            tied = kl <= kl.min(1, keepdim=True).values + KL_TIE
            best[rows] = factors[tied.to(torch.int8).argmax(1)].float()  # the first (widest) of the ties
            bar.update(rows.numel())
    return best


def best_window(values: torch.Tensor, lo: float, hi: float, bins: int, levels: int, steps: int) -> float:
    """:func:`best_windows` for one group (``values`` 1-d, ``lo``/``hi`` numbers)."""
    return float(
        best_windows(values.reshape(1, -1), torch.tensor([float(lo)]), torch.tensor([float(hi)]), bins, levels, steps)[
            0
        ]
    )


@register_observer("kl")
class KLObserver(OmseObserver):
    """Clipping range by minimum KL divergence between data and quantized histograms."""

    def __init__(self, spec, **kw):
        super().__init__(spec, **kw)
        self.bins = int(spec.option("kl_bins", 2048))

    def _range(self):
        lo = torch.clamp(self.min, max=0.0)
        hi = torch.clamp(self.max, min=0.0)
        if self.spec.symmetric:  # the grid is [-m, m] whatever the data's skew: shrink that
            hi = torch.maximum(-lo, hi)
            lo = -hi
        levels = self.spec.qmax - self.spec.qmin + 1
        f = best_windows(self.sample, lo, hi, self.bins, levels, self.steps, self.name)
        f = f.to(dtype=lo.dtype, device=lo.device)
        return lo * f, hi * f
