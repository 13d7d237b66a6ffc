"""GPTQ / OPTQ (Frantar et al., 2023): quantize a weight matrix column by column with error feedback.

For a Linear ``y = x W^T`` with calibration inputs X (tokens x in), the layer's output error
of a quantized weight Q is ``trace((W - Q) H (W - Q)^T)`` with ``H = X^T X``. GPTQ quantizes
one input column at a time and spreads each column's rounding error over the columns not
yet quantized, through the upper Cholesky factor of ``H^-1`` (the optimal update of the
remaining weights, OBS). Columns are processed in blocks whose updates to the later
columns are applied once per block (lazy batch updates).

* ``damp``: ``damp * mean(diag(H))`` is added to H's diagonal; if H is still not positive
  definite the damping grows tenfold (up to three times) before giving up.
* dead columns (an input that is 0 on every calibration token): H's diagonal is set to 1
  there and the weight column to 0 (it never met a non-zero input).
* ``act_order``: columns in order of decreasing ``diag(H)`` (the permutation is undone).
* ``group_size``: one scale (and zero point) per output channel and group of input columns,
  chosen by the error search when the quantization reaches the group (without
  ``act_order``); with ``act_order`` the groups' scales are chosen up front from the
  weights (the reference implementation's ``static_groups``), so that groups stay
  contiguous input columns.
* scales: chosen first by :func:`search_qparams`, a clipping-ratio grid per output channel
  minimizing the squared error weighted by ``diag(H)``; the grid of scales is fxquant's own
  (``range_to_scale_zero_point``), so any bit width 2-8, symmetric or affine, as the spec says.

Everything is computed in float64; the codes come from fxquant's ``quantize``, so the
result is the QParams + codes a QuantLinear holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from fxquant.errors import FxqError
from fxquant.quant.observers.base import range_to_scale_zero_point
from fxquant.quant.qparams import QParams
from fxquant.quant.quantizers import dequantize, quantize
from fxquant.quant.recovery_config import GptqConfig
from fxquant.quant.spec import QuantSpec

#: clipping ratios the scale search tries (the full range first)
CLIP_RATIOS = tuple(1.0 - 0.02 * i for i in range(26))
DAMP_RETRIES = 3


@dataclass
class GptqResult:
    """``codes`` (float tensor of integers, like ``quantize``'s) and ``weight`` (their values,
    float32), both (out, in). ``qparams``: per-channel (axis 0) or per-tensor, when
    ``group_size`` is None; else ``group_qparams`` holds one per-channel QParams per group of
    ``group_size`` input columns, in column order."""

    codes: torch.Tensor
    weight: torch.Tensor
    qparams: Optional[QParams]
    group_qparams: Optional[list[QParams]] = None
    group_size: Optional[int] = None
    damp_used: float = 0.0


def weighted_error(w: torch.Tensor, q: torch.Tensor, h: torch.Tensor) -> float:
    """``trace((w - q) h (w - q)^T)`` in float64: the layer's output error for inputs with Gram ``h``."""
    d = (w.double() - q.double()).reshape(w.shape[0], -1)
    return float(torch.einsum("ik,kl,il->", d, h.double(), d))


def search_qparams(
    w: torch.Tensor, spec: QuantSpec, col_weights: Optional[torch.Tensor] = None, per_channel: bool = True
) -> QParams:
    """Per-channel (rows of ``w``, axis 0) or per-tensor QParams: for each clipping ratio r of
    the range [r*min, r*max], fxquant's scale rule; per row the ratio with the least squared
    error, each column's error weighted by ``col_weights`` (e.g. diag(H)); ties keep the full range."""
    w = w.detach().double().reshape(w.shape[0], -1)
    cw = torch.ones(w.shape[1], dtype=torch.float64) if col_weights is None else col_weights.double()
    rows = w if per_channel else w.reshape(1, -1)
    wts = cw.expand_as(w).reshape(rows.shape) if per_channel else cw.expand_as(w).reshape(1, -1)
    lo, hi = rows.amin(1), rows.amax(1)
    best_err = torch.full((rows.shape[0],), float("inf"), dtype=torch.float64)
    best_scale = best_zp = None
    for ratio in CLIP_RATIOS:
        scale, zp = range_to_scale_zero_point(lo * ratio, hi * ratio, spec)
        qp = QParams(scale, zp, spec.qmin, spec.qmax, 0)
        err = ((dequantize(quantize(rows, qp), qp) - rows) ** 2 * wts).sum(1)
        better = err < best_err
        if best_scale is None:
            best_scale, best_zp = scale.clone(), zp.clone()
        best_scale = torch.where(better, scale, best_scale)
        best_zp = torch.where(better, zp, best_zp)
        best_err = torch.minimum(err, best_err)
    if per_channel:
        return QParams(best_scale, best_zp, spec.qmin, spec.qmax, 0)
    return QParams(best_scale[0], best_zp[0], spec.qmin, spec.qmax, None)


def _upper_cholesky_of_inverse(h: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    mean_diag = float(torch.diag(h).mean())
    for attempt in range(DAMP_RETRIES + 1):
        used = damp * 10**attempt if damp > 0 else (0.0 if attempt == 0 else 1e-6 * 10**attempt)
        damped = h + torch.eye(h.shape[0], dtype=h.dtype) * (used * mean_diag)
        lower, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info) == 0:
                return upper, used
    raise FxqError(
        f"GPTQ: H is not positive definite even with damp {used:g} x mean(diag H); "
        "give more calibration data or a larger gptq.damp"
    )


def gptq_quantize(
    w: torch.Tensor,
    h: torch.Tensor,
    spec: QuantSpec,
    config: Optional[GptqConfig] = None,
    qparams: Optional[QParams] = None,
    per_channel: bool = True,
) -> GptqResult:
    """GPTQ of ``w`` (out, in) for inputs with Gram matrix ``h`` (in, in).

    ``qparams``: the grid to round to (per-channel axis 0 or per-tensor); None chooses it by
    :func:`search_qparams` (``per_channel`` decides which). Ignored with ``config.group_size``."""
    if w.dim() != 2 or h.shape != (w.shape[1], w.shape[1]):
        raise FxqError(f"GPTQ: weight {tuple(w.shape)} and H {tuple(h.shape)} do not fit: H must be (in, in)")
    config = config or GptqConfig()
    W = w.detach().double().clone()
    H = h.detach().double().clone()
    n_out, n_in = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    gs = config.group_size
    if gs is None and qparams is None:
        qparams = search_qparams(W, spec, torch.diag(H), per_channel=per_channel)
    perm = torch.argsort(torch.diag(H), descending=True, stable=True) if config.act_order else torch.arange(n_in)
    group_qp: dict[int, QParams] = {}
    if gs is not None and config.act_order:  # static groups, chosen before the permutation
        for g in range(0, n_in, gs):
            group_qp[g // gs] = search_qparams(W[:, g : g + gs], spec, torch.diag(H)[g : g + gs])
    W, H = W[:, perm], H[perm][:, perm]
    Hinv, damp_used = _upper_cholesky_of_inverse(H, config.damp)
    diag_h = torch.diag(H)
    codes = torch.zeros_like(W)
    block = config.block_size
    for i1 in range(0, n_in, block):
        i2 = min(i1 + block, n_in)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = int(perm[i1 + i])
            if gs is None:
                qp = qparams
            else:
                g = col // gs
                if g not in group_qp:  # in order (no act_order): the group starts here
                    ahead = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :gs]
                    group_qp[g] = search_qparams(ahead, spec, diag_h[i1 + i : i1 + i + gs])
                qp = group_qp[g]
            w_col = W1[:, i]
            c = quantize(w_col, qp)
            codes[:, i1 + i] = c
            err = (w_col - dequantize(c, qp)) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    codes = codes[:, torch.argsort(perm)]
    if gs is None:
        weight = dequantize(codes.float(), qparams)
        return GptqResult(codes.float(), weight, qparams, damp_used=damp_used)
    groups = [group_qp[g] for g in range(len(group_qp))]
    weight = torch.cat([dequantize(codes[:, g * gs : (g + 1) * gs].float(), qp) for g, qp in enumerate(groups)], dim=1)
    return GptqResult(codes.float(), weight, None, groups, gs, damp_used)


def round_to_nearest(w: torch.Tensor, qp: QParams) -> torch.Tensor:
    """The plain rounding GPTQ improves on: ``w``'s values on ``qp``'s grid (float32)."""
    return dequantize(quantize(w.detach().float(), qp), qp)
