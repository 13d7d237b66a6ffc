"""Quantize / dequantize / fake-quantize kernels, uniform and log2, plus the QSNR metric.

(The log quantizers of other bases, ``log_sqrt2`` and the adaptive base, are in
``fxquant.quant.log_quantizers``; :func:`fake_quantize` dispatches to them by method name.)

Conventions every caller can rely on:

* **Codes are floating-point tensors holding integer values** (float32, or float64 when the
  input is float64; float16/bfloat16 inputs are computed in float32 because bfloat16 cannot
  hold every 8-bit code exactly). Keeping codes in float avoids int<->float casts on the hot
  fake-quant path; call ``.to(torch.int32)`` if a real integer tensor is needed.
* **Rounding is round-half-to-even** (``torch.round``) everywhere: codes, zero points, log2
  exponents. The same rule is used by the observers, so a scale/zero-point pair computed at
  calibration reproduces the same codes at inference.
* Per-channel parameters broadcast along ``qp.axis`` via ``QParams.broadcast_scale``.
* None of these functions is differentiable (no straight-through estimator): this is a
  post-training compiler, so they are meant to run under ``torch.no_grad()``.

Log2 code layout (FQ-ViT's Log-Int-Softmax output quantizer, made stateless):

* unsigned (``qp.qmin == 0``): code ``m = clamp(round(-log2(x / scale)), 0, qmax)`` with
  ``qmax = 2**bits - 1``; value ``scale * 2**-m``; the largest code ``qmax`` means exactly 0
  (zeros, negatives and underflow all land there). FQ-ViT keeps a separate mask for
  underflow; reserving the top code instead makes ``dequantize_log2`` need only the codes.
* signed (``qp.qmin < 0``, i.e. ``qmin = -2**(bits-1)``, ``qmax = 2**(bits-1) - 1``):
  the magnitude gets ``bits - 1`` bits, ``m = clamp(round(-log2(|x| / scale)), 0, qmax)``,
  and a negative value is stored as ``-1 - m`` (bitwise NOT of ``m``), so codes fill
  exactly the signed ``bits``-bit range and ``m == qmax`` still means 0.
"""

from __future__ import annotations

import math

import torch

from fxquant.quant.log_quantizers import dequantize_log_step, log_step, quantize_log_step
from fxquant.quant.qparams import QParams

__all__ = [
    "quantize",
    "dequantize",
    "fake_quantize",
    "quantize_log2",
    "dequantize_log2",
    "qsnr_db",
]


def _as_float(x: torch.Tensor) -> torch.Tensor:
    """``x`` in a dtype that holds every integer code exactly (no copy for float32/64)."""
    if x.dtype in (torch.float32, torch.float64):
        return x
    return x.to(torch.float32)


def _param(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Move a per-channel parameter to ``like``'s device.

    0-d CPU tensors are left alone: PyTorch accepts them as scalars in CUDA kernels, which
    avoids a host-to-device copy on every call of the hot path.
    """
    if t.dim() == 0 or t.device == like.device:
        return t
    return t.to(like.device)


def _scale_zp(qp: QParams, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return (
        _param(qp.broadcast_scale(x.dim()), x),
        _param(qp.broadcast_zero_point(x.dim()), x),
    )


# ----------------------------------------------------------------------------- uniform
def quantize(x: torch.Tensor, qp: QParams) -> torch.Tensor:
    """Integer codes ``clamp(round(x / scale) + zp, qmin, qmax)`` as a float tensor.

    Division (not multiplication by 1/scale) is used so that codes of values already on
    the grid are recovered exactly, which makes fake quantization idempotent.
    """
    xf = _as_float(x)
    scale, zp = _scale_zp(qp, xf)
    q = torch.div(xf, scale)  # the only allocation; everything below is in place
    q.round_().add_(zp).clamp_(qp.qmin, qp.qmax)
    return q


def dequantize(q: torch.Tensor, qp: QParams) -> torch.Tensor:
    """Real values ``(q - zp) * scale`` (float32, or float64 for float64 codes)."""
    qf = _as_float(q)
    scale, zp = _scale_zp(qp, qf)
    return torch.sub(qf, zp).mul_(scale)


def fake_quantize(x: torch.Tensor, qp: QParams, method: str = "uniform") -> torch.Tensor:
    """``dequantize(quantize(x))`` in ``x``'s dtype, with one intermediate allocation.

    This runs on every quantized activation of a forward pass, so the uniform path is a
    single chain of in-place ops on one fresh buffer: no Python loops, no extra copies.
    """
    if method == "log2":
        return dequantize_log2(quantize_log2(x, qp), qp).to(x.dtype)
    if method != "uniform":  # log_sqrt2 and the other log bases (fxquant.quant.log_quantizers)
        step = log_step(method)  # ValueError naming the method when it is unknown
        return dequantize_log_step(quantize_log_step(x, qp, step), qp, step).to(x.dtype)
    xf = _as_float(x)
    scale, zp = _scale_zp(qp, xf)
    q = torch.div(xf, scale)
    q.round_().add_(zp).clamp_(qp.qmin, qp.qmax).sub_(zp).mul_(scale)
    return q.to(x.dtype)


# -------------------------------------------------------------------------------- log2
def _log2_signed(qp: QParams) -> bool:
    return qp.qmin < 0


def quantize_log2(x: torch.Tensor, qp: QParams) -> torch.Tensor:
    """Log2 codes (see the module docstring for the layout); float tensor of integers.

    ``x > scale`` saturates to code 0 (value ``scale``); ``x == 0``, negative values (for
    unsigned) and values below ``scale * 2**-(qmax - 1)`` map to the zero code ``qmax``.
    """
    xf = _as_float(x)
    scale = _param(qp.broadcast_scale(xf.dim()), xf)
    signed = _log2_signed(qp)
    m = xf.abs() if signed else xf.clamp_min(0.0)
    # log2(0) = -inf -> +inf after negation -> clamped to the zero code qmax.
    m.div_(scale).log2_().neg_().round_().clamp_(0, qp.qmax)
    if signed:
        m = torch.where(xf < 0, -1.0 - m, m)
    return m


def dequantize_log2(q: torch.Tensor, qp: QParams) -> torch.Tensor:
    """Values ``±scale * 2**-m``; the zero code (magnitude ``qmax``) gives exactly 0."""
    qf = _as_float(q)
    scale = _param(qp.broadcast_scale(qf.dim()), qf)
    if _log2_signed(qp):
        neg = qf < 0
        m = torch.where(neg, -1.0 - qf, qf)
    else:
        neg, m = None, qf
    v = torch.neg(m).exp2_().mul_(scale)
    v.masked_fill_(m >= qp.qmax, 0.0)
    if neg is not None:
        v = torch.where(neg, -v, v)
    return v


# ------------------------------------------------------------------------------ metric
def qsnr_db(ref: torch.Tensor, x: torch.Tensor) -> float:
    """Quantization SNR ``10*log10(sum(ref^2) / sum((ref - x)^2))`` in dB, in float64.

    Never NaN: identical tensors -> ``inf``; zero signal with any error -> ``-inf``;
    non-finite values anywhere (a broken quantized path) -> ``-inf``, the worst score.
    """
    r = ref.detach().to(torch.float64)
    d = x.detach().to(device=r.device, dtype=torch.float64)
    if r.shape != d.shape:
        raise ValueError(f"qsnr_db: shape mismatch {tuple(r.shape)} vs {tuple(d.shape)}")
    if not (torch.isfinite(r).all() and torch.isfinite(d).all()):
        return float("-inf")
    noise = float(torch.sum((r - d) ** 2))
    signal = float(torch.sum(r * r))
    if noise == 0.0:
        return float("inf")
    if signal == 0.0:
        return float("-inf")
    if math.isinf(signal) or math.isinf(noise):  # float64 overflow of the sums
        return float("inf") if math.isinf(signal) and not math.isinf(noise) else float("-inf")
    return 10.0 * math.log10(signal / noise)
