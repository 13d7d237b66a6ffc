"""Power-of-Two Factor (PTF) quantization of LayerNorm inputs (FQ-ViT, Lin et al. 2022).

A ViT's residual stream has a few channels whose range is tens of times the median
channel's. One scale for all channels wastes the grid on them; one scale per channel
breaks integer LayerNorm, which sums over channels. PTF keeps one layer-wise base scale
``s`` and zero point ``zp`` and gives channel c the scale ``s * 2**alpha_c``
(``alpha_c`` in 0..K-1, K = ``ptf_factors`` = 4): codes of all channels become
comparable after a left shift by ``alpha_c``, so the integer mean and variance need no
multiplies.

* ``PtfObserver``: running per-channel min/max plus a bounded sample (the OMSE
  observer's reservoir). The base scale comes from the layer-wise range divided by
  ``2**(K-1)``; the zero point is that of the layer-wise grid. For each channel the
  factor with the least squared error on its sample wins (ties: the smaller factor).
* ``ptf_layernorm_integer``: LayerNorm computed from the codes the way an integer kernel
  does it: shift by alpha, integer sum and sum of squares (int64), an integer square
  root, then one dyadic multiplier per row and channel to the output grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fxquant.quant.qparams import QParams

__all__ = [
    "ptf_alphas",
    "isqrt",
    "ptf_layernorm_integer",
    "ptf_layernorm_constants",
    "ptf_layernorm_codes",
    "PtfLayerNormConstants",
    "DYADIC_SHIFT",
]


def ptf_alphas(qp: QParams) -> tuple[torch.Tensor, torch.Tensor]:
    """(base scale, integer alpha per channel) of a PTF QParams; fails if it is not one."""
    if not qp.per_channel:
        raise ValueError("a PTF QParams is per-channel; got a per-tensor scale")
    base = qp.scale.min()
    ratio = torch.log2(qp.scale / base)
    alpha = torch.round(ratio)
    if not torch.allclose(ratio, alpha, atol=1e-4) or not torch.all(qp.zero_point == qp.zero_point[0]):
        raise ValueError("scales are not power-of-two multiples of one base scale with one zero point")
    return base, alpha.to(torch.int64)


def isqrt(n: torch.Tensor) -> torch.Tensor:
    """floor(sqrt(n)) of a non-negative int64 tensor, by Newton's iteration in integers."""
    if n.dtype != torch.int64:
        raise TypeError("isqrt works on int64 tensors")
    if bool((n < 0).any()):
        raise ValueError("isqrt of a negative number")
    return _isqrt_unchecked(n)


def _isqrt_unchecked(n: torch.Tensor) -> torch.Tensor:
    """``isqrt`` without the checks (no data-dependent branch, so torch.compile keeps one graph)."""
    x = torch.sqrt(n.double()).floor().to(torch.int64).clamp_min(1)  # a start close to the root
    for _ in range(4):  # Newton from above converges in a step or two from this start
        x = torch.where(x > 0, (x + n // x.clamp_min(1)) // 2, x)
    # fix the last unit exactly: x*x <= n < (x+1)*(x+1)
    x = torch.where(x * x > n, x - 1, x)
    x = torch.where((x + 1) * (x + 1) <= n, x + 1, x)
    return torch.where(n == 0, torch.zeros_like(x), x)


DYADIC_SHIFT = 24  # fractional bits of the per-element multipliers below
SIGMA_FRACTION_BITS = 8  # fractional bits of the integer standard deviation (fewer if int64 would overflow)


@dataclass
class PtfLayerNormConstants:
    """What an integer LayerNorm kernel precomputes from the scales (see ptf_layernorm_integer)."""

    alpha: torch.Tensor  # (C,) int64 left shift per input channel
    in_zero_point: int
    eps_int: int  # LayerNorm's eps on the grid of the variance shifted left by 2 * sigma_bits
    sigma_bits: int  # fractional bits of the integer standard deviation
    weight_units: torch.Tensor  # (C,) float64: gamma_c / s_out * 2**DYADIC_SHIFT
    offset: torch.Tensor  # (C,) int64: round(beta_c / s_out * 2**DYADIC_SHIFT)
    out_zero_point: int
    qmin: int
    qmax: int


def ptf_layernorm_constants(
    in_qp: QParams, weight: torch.Tensor, bias: torch.Tensor, eps: float, out_qp: QParams
) -> PtfLayerNormConstants:
    base, alpha = ptf_alphas(in_qp)
    if out_qp.per_channel:
        raise ValueError("the LayerNorm output point must be per-tensor for the integer formulation")
    c = alpha.numel()
    s_out = float(out_qp.scale)
    one = 1 << DYADIC_SHIFT
    zp = int(in_qp.zero_point.reshape(-1)[0])
    z_max = max(zp - int(in_qp.qmin), int(in_qp.qmax) - zp) << int(alpha.max())
    var_bits = int(c * c * z_max * z_max).bit_length() + 1  # var_int <= C * sum z**2 <= (C * z_max)**2
    sigma_bits = max(0, min(SIGMA_FRACTION_BITS, (62 - var_bits) // 2))
    return PtfLayerNormConstants(
        alpha=alpha.reshape(-1),
        in_zero_point=zp,
        eps_int=int(round(eps * c * c / float(base) ** 2 * 4**sigma_bits)),
        sigma_bits=sigma_bits,
        weight_units=weight.detach().double() / s_out * one,
        offset=torch.round(bias.detach().double() / s_out * one).to(torch.int64),
        out_zero_point=int(out_qp.zero_point),
        qmin=int(out_qp.qmin),
        qmax=int(out_qp.qmax),
    )


def ptf_layernorm_codes(
    codes: torch.Tensor,
    alpha: torch.Tensor,
    in_zero_point: int,
    eps_int: int,
    sigma_bits: int,
    weight_units: torch.Tensor,
    offset: torch.Tensor,
    out_zero_point: int,
    qmin: int,
    qmax: int,
) -> torch.Tensor:
    """The integer kernel itself (int64 output codes); arguments as in PtfLayerNormConstants."""
    c = codes.shape[-1]
    z = (codes.to(torch.int64) - in_zero_point) << alpha
    s1 = z.sum(-1, keepdim=True)
    var_int = c * (z * z).sum(-1, keepdim=True) - s1 * s1  # >= 0 (Cauchy-Schwarz), exact in int64
    # sigma with sigma_bits fractional bits: a whole-unit floor would cost up to 1/sigma relative error
    sigma = _isqrt_unchecked((var_int << (2 * sigma_bits)) + eps_int).clamp_min(1)
    # one multiplier per row and channel, an integer on the 2**-DYADIC_SHIFT grid
    mult = torch.round(weight_units * (1 << sigma_bits) / sigma.double()).to(torch.int64)
    acc = (c * z - s1) * mult + offset
    out = (acc + (1 << (DYADIC_SHIFT - 1))) >> DYADIC_SHIFT  # round half up
    return (out + out_zero_point).clamp(qmin, qmax)


def ptf_layernorm_integer(
    codes: torch.Tensor, in_qp: QParams, weight: torch.Tensor, bias: torch.Tensor, eps: float, out_qp: QParams
) -> torch.Tensor:
    """Output codes of LayerNorm over the last axis, from PTF input codes, in integer arithmetic.

    ``z = (q - zp) << alpha`` puts every channel on the base scale ``s``; with C channels,
    ``S1 = sum z`` and ``var_int = C * sum z**2 - S1**2`` are exact int64, and
    ``sigma_int = isqrt(var_int + eps * C**2 / s**2)`` is C * std / s (LayerNorm's eps
    carried into the integer domain), computed with ``sigma_bits`` fractional bits (the
    variance shifted left by twice that before the square root). Output code of channel c:
    ``round((C*z - S1) * gamma_c / (s_out * sigma_int) + beta_c / s_out) + zp_out``, where the
    multiplier ``gamma_c / (s_out * sigma_int)`` (one per row and channel) is a dyadic number
    ``m / 2**DYADIC_SHIFT`` and the product is shifted with round-half-up.
    """
    k = ptf_layernorm_constants(in_qp, weight, bias, eps, out_qp)
    return ptf_layernorm_codes(
        codes,
        k.alpha.to(codes.device),
        k.in_zero_point,
        k.eps_int,
        k.sigma_bits,
        k.weight_units.to(codes.device),
        k.offset.to(codes.device),
        k.out_zero_point,
        k.qmin,
        k.qmax,
    )
