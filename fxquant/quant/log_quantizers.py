"""Logarithmic quantizers with a base other than 2: ``log_sqrt2`` and the adaptive base.

A log quantizer of *step* ``s = p/k`` (a fraction, the base is ``2**s``) has the code
``m = clamp(round(-log2(x / scale) / s), 0, qmax)`` and the value ``scale * 2**(-m * s)``;
the code layout is the log2 quantizer's (``fxquant.quant.quantizers``): unsigned codes
0..qmax with ``qmax`` meaning exactly 0, signed magnitudes stored as ``-1 - m``. ``log2`` is
the step 1, ``log_sqrt2`` (RepQ-ViT's base sqrt(2)) the step 1/2.

Integer-friendly: ``m * p = k * E + f`` with ``E = floor(m p / k)`` and ``f`` in 0..k-1, so
the value is ``2**-E`` (a shift) times one of k constants ``2**(-f/k)``. attn@V then sums
each of the k parts by shifts and folds the k constants into its requantization scale
(``fxquant.runtime.log_base_softmax``); for ``log_sqrt2`` that is the even/odd split with
the single constant ``1/sqrt(2)``.

``log_adaptive`` (AdaLog-style, Wu et al. ECCV 2024) chooses the step per point on the
calibration data: AdaLog's base is ``2**(q/37)`` with a 37-entry table; here the candidates
are the hardware-friendly fractions ``p/k`` with ``k <= 4`` in [1/4, 2] (at most four
constants in attn@V's requantization), and the chosen step is the one with the smallest
squared error on the calibration data (:class:`LogBaseSearch`: for the attention
probabilities, the error of each row after renormalization, which is what attn@V sees).
The resolved method is then named by its step: ``log2`` for 1, ``log_sqrt2`` for 1/2,
``log2^p/k`` otherwise (every name in :data:`RESOLVED_LOG_METHODS`).
"""

from __future__ import annotations

from fractions import Fraction
from typing import Optional

import torch

from fxquant.quant.qparams import QParams

__all__ = [
    "LOG_CONFIG_METHODS",
    "RESOLVED_LOG_METHODS",
    "CANDIDATE_STEPS",
    "log_step",
    "method_for_step",
    "quantize_log_step",
    "dequantize_log_step",
    "step_values",
    "LogBaseSearch",
]

#: the candidate steps of ``log_adaptive``: p/k with k <= 4, 1/4 <= p/k <= 2
CANDIDATE_STEPS: tuple[Fraction, ...] = tuple(
    sorted({Fraction(p, k) for k in range(1, 5) for p in range(1, 2 * k + 1) if Fraction(1, 4) <= Fraction(p, k) <= 2})
)


def method_for_step(step: Fraction) -> str:
    """The resolved method name of a log quantizer of step ``step``."""
    step = Fraction(step)
    if step == 1:
        return "log2"
    if step == Fraction(1, 2):
        return "log_sqrt2"
    return f"log2^{step.numerator}/{step.denominator}"


#: every resolved log method name (what a FakeQuantize may hold) -> its step
RESOLVED_LOG_METHODS: dict[str, Fraction] = {method_for_step(s): s for s in CANDIDATE_STEPS}
#: the log methods a qconfig may name (``log_adaptive`` is resolved at calibration)
LOG_CONFIG_METHODS = ("log2", "log_sqrt2", "log_adaptive")


def log_step(method: str) -> Optional[Fraction]:
    """The step of a resolved log method, None for ``uniform``; ValueError for ``log_adaptive``
    (a per-point choice made at calibration) and for unknown names."""
    if method == "uniform":
        return None
    step = RESOLVED_LOG_METHODS.get(method)
    if step is not None:
        return step
    if method == "log_adaptive":
        raise ValueError(
            "quantization method 'log_adaptive' has no fixed base: calibration chooses it per point "
            "(a FakeQuantize holds the resolved method, e.g. 'log2^2/3')"
        )
    known = ", ".join(["uniform", *RESOLVED_LOG_METHODS])
    raise ValueError(f"unknown quantization method {method!r} (expected one of {known})")


def _as_float(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.to(torch.float32)


def _scale(qp: QParams, like: torch.Tensor) -> torch.Tensor:
    s = qp.broadcast_scale(like.dim())
    return s if s.dim() == 0 or s.device == like.device else s.to(like.device)


def quantize_log_step(x: torch.Tensor, qp: QParams, step: Fraction) -> torch.Tensor:
    """Codes of the log quantizer of step ``step`` (float tensor of integers, log2 layout)."""
    xf = _as_float(x)
    signed = qp.qmin < 0
    m = xf.abs() if signed else xf.clamp_min(0.0)
    m = m.div(_scale(qp, xf)).log2_().neg_().div_(float(step)).round_().clamp_(0, qp.qmax)
    if signed:
        m = torch.where(xf < 0, -1.0 - m, m)
    return m


def step_values(m: torch.Tensor, step: Fraction) -> torch.Tensor:
    """``2**(-m * step)`` as a shift times one of k constants: exact powers of two times
    ``2**(-f/k)`` (``m`` non-negative integer-valued floats)."""
    p, k = step.numerator, step.denominator
    e = m * p
    shift = torch.floor(e / k)
    part = e - shift * k
    return torch.pow(2.0, -shift) * torch.pow(2.0, -part / k)


def dequantize_log_step(q: torch.Tensor, qp: QParams, step: Fraction) -> torch.Tensor:
    """Values ``±scale * 2**(-m * step)``; the zero code (magnitude ``qmax``) gives exactly 0."""
    qf = _as_float(q)
    if qp.qmin < 0:
        neg = qf < 0
        m = torch.where(neg, -1.0 - qf, qf)
    else:
        neg, m = None, qf
    v = step_values(m, step).mul_(_scale(qp, qf))
    v.masked_fill_(m >= qp.qmax, 0.0)
    if neg is not None:
        v = torch.where(neg, -v, v)
    return v


_BINS_PER_OCTAVE = 64
_SEARCH_ROWS = 4096  # rows per calibration batch the row-wise search scores
_OCTAVES = 64  # |x| in [2**-64, 2**64]: smaller values add below 2**-128 to a squared error


class LogBaseSearch:
    """Chooses ``log_adaptive``'s step for one point from the calibration data.

    Two ways of scoring a candidate step, by what the point quantizes:

    * ``rows=None`` (any point): a histogram of ``-log2(|x|)`` in [-64, 64) (1/64-octave
      bins), scored after calibration with the point's scale: the squared error of every
      value, each at its bin centre. Zeros need no bin (every step maps them to 0 exactly).
    * ``rows=True`` / ``False`` (attention probabilities, on the grid from 1 that the
      integer softmax counts from): every candidate quantizes each calibration row along the
      last dimension, divided by its sum when ``rows`` is True (``lis_renormalize``), and
      the squared error against the float row is summed. That is the error attn@V sees
      (``E|dP @ V|**2 = var(v) * sum(dP**2)`` for rows summing to 1 and independent V);
      element-wise error alone misses that underflowing many small probabilities moves the
      whole row (a fine base at 4 bits zeroes most of a 257-token row).

    The step of least error wins; ties go to the larger step (shorter shifts).
    """

    def __init__(self, bits: int, signed: bool, rows: Optional[bool] = None):
        self.qmax = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
        self.signed, self.rows = signed, rows
        self.counts = torch.zeros(2 * _OCTAVES * _BINS_PER_OCTAVE, dtype=torch.float64)
        self.row_errors = {step: 0.0 for step in CANDIDATE_STEPS}
        self.num_updates = 0

    def update(self, x: torch.Tensor) -> None:
        if self.rows is not None:
            self._update_rows(x.detach().float())
        else:
            self._update_histogram(x.detach().to(torch.float64).flatten())
        self.num_updates += 1

    def _update_histogram(self, x: torch.Tensor) -> None:
        x = x.abs() if self.signed else x
        x = x[x > 0]
        t = torch.clamp(-torch.log2(x), min=-_OCTAVES, max=_OCTAVES - 1e-6)  # -log2(x) in [-64, 64)
        index = torch.floor((t + _OCTAVES) * _BINS_PER_OCTAVE).long()
        self.counts += torch.bincount(index, minlength=self.counts.numel()).double()

    def _update_rows(self, x: torch.Tensor) -> None:
        rows = x.clamp_min(0.0).reshape(-1, x.shape[-1])
        x = rows[:: max(1, rows.shape[0] // _SEARCH_ROWS)]  # an even subsample: 12 candidates per row cost
        t = -torch.log2(x)  # +inf for zeros: the zero code under every step
        for step in CANDIDATE_STEPS:
            m = torch.clamp(torch.round(t / float(step)), 0, self.qmax)
            v = torch.exp2(-m * float(step)).masked_fill_(m >= self.qmax, 0.0)
            if self.rows:
                total = v.sum(-1, keepdim=True)
                v = v / torch.where(total > 0, total, torch.ones_like(total))
            self.row_errors[step] += float(((v - x).double() ** 2).sum())

    def merge(self, reduce_sums) -> None:
        """Sum this search's statistics over the ranks of a distributed calibration
        (``reduce_sums``: ``fxquant.quant.distributed.reduce_sums``), so every rank chooses alike."""
        local = {f"step {s}": e for s, e in self.row_errors.items()} | {"updates": float(self.num_updates)}
        local |= {f"bin {i}": float(c) for i, c in enumerate(self.counts.tolist())}
        summed = reduce_sums(local)
        self.row_errors = {s: summed[f"step {s}"] for s in CANDIDATE_STEPS}
        self.counts = torch.tensor([summed[f"bin {i}"] for i in range(self.counts.numel())], dtype=torch.float64)
        self.num_updates = int(summed["updates"])

    def errors(self, scale: float = 1.0) -> dict[Fraction, float]:
        """Squared error of every candidate step (``scale``: histogram mode only)."""
        if self.rows is not None:
            return dict(self.row_errors)
        centres = (torch.arange(self.counts.numel(), dtype=torch.float64) + 0.5) / _BINS_PER_OCTAVE - _OCTAVES
        x = torch.pow(2.0, -centres)
        keep = self.counts > 0
        x, w = x[keep], self.counts[keep]
        out = {}
        for step in CANDIDATE_STEPS:
            m = torch.clamp(torch.round(-torch.log2(x / scale) / float(step)), 0, self.qmax)
            v = torch.where(m < self.qmax, scale * step_values(m, step), torch.zeros_like(x))
            out[step] = float((w * (x - v) ** 2).sum())
        return out

    def best_step(self, scale: float = 1.0) -> Fraction:
        """The candidate step of least error (ties: the larger step, the shorter shifts)."""
        if self.num_updates == 0:
            raise ValueError("log_adaptive: the base search saw no calibration data")
        errors = self.errors(scale)
        return min(CANDIDATE_STEPS, key=lambda s: (errors[s], -s))
