"""Per-row tail quantiles of a (groups, values) matrix without sorting it (PercentileObserver)."""

from __future__ import annotations

import math

import torch

__all__ = ["tail_quantiles"]

_CHUNK = 2**20  # elements per topk call: bounds topk's (value, index) scratch to ~16 MB
_TOPK_MAX_K = 2**16  # beyond this, two kthvalue calls are cheaper than a topk tail


def tail_quantiles(xg: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (1-alpha, alpha) quantiles of a (G, M) matrix, as torch.quantile ('linear').

    Only the order statistics next to each quantile are needed, so the k extreme values
    are found with chunked topk (exact: the top k of a union is within the union of the
    chunks' top k) instead of sorting; very large k falls back to torch.kthvalue.
    """
    return _quantile(xg, 1.0 - alpha, largest=False), _quantile(xg, alpha, largest=True)


def _quantile(xg: torch.Tensor, q: float, *, largest: bool) -> torch.Tensor:
    m = xg.shape[1]
    pos = q * (m - 1)
    i0 = min(int(math.floor(pos)), m - 1)
    i1 = min(i0 + 1, m - 1)
    frac = pos - i0
    # ranks counted from the end the tail is taken from
    r0, r1 = (m - 1 - i0, m - 1 - i1) if largest else (i0, i1)
    k = max(r0, r1) + 1
    if k > _TOPK_MAX_K:
        v0 = xg.kthvalue(i0 + 1, dim=1).values
        v1 = v0 if i1 == i0 else xg.kthvalue(i1 + 1, dim=1).values
    else:
        tail = _topk(xg, k, largest)
        v0, v1 = tail[:, r0], tail[:, r1]
    return torch.lerp(v0, v1, frac)


def _topk(xg: torch.Tensor, k: int, largest: bool) -> torch.Tensor:
    """Sorted k most extreme values per row, scanning the columns in bounded chunks."""
    g, m = xg.shape
    cols = max(4 * k, _CHUNK // g)
    if m > cols:
        parts = [c.topk(min(k, c.shape[1]), dim=1, largest=largest, sorted=False).values for c in xg.split(cols, 1)]
        xg = torch.cat(parts, 1)
    return xg.topk(k, dim=1, largest=largest, sorted=True).values
