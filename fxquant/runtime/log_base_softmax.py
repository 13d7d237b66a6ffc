"""Log-Int-Softmax with a log base other than 2: ``log_sqrt2`` and the adaptive bases.

The scores' integer codes go through Log-Int-Softmax's integer exp (``i_exp`` on the
refined grid, ``fxquant.runtime.log_int_softmax``), giving integers ``e_i`` and their row sum
``T``. The probability's code for the step ``s = p/k`` (``fxquant.quant.log_quantizers``) is
``m = round(log2(T / e) / s)``, found with integer comparisons and no division:

1. ``a = floor(log2(T / e))``: ``2**a * e <= T < 2**(a+1) * e`` (shifts and compares);
2. the sub-octave index ``g`` in 0..2k-1: the number of ``j`` in 1..2k-1 with
   ``T >= e * 2**a * C_j``, ``C_j`` the constant ``2**(j / 2k)`` on a 2**-24 grid, so
   ``n = 2k*a + g = floor(2k * log2(T / e))``;
3. ``m = floor((n + p) / 2p)``: ``m >= j + 1`` exactly when ``2k log2(T/e) >= (2j+1) p``.

The value ``2**(-m p / k)`` is a shift ``E = floor(m p / k)`` times one of k constants
``2**(-f/k)`` (``f = m p mod k``). attn@V (:class:`LogBaseShiftMatmul`) keeps one integer
accumulator per part ``f`` (sums of V codes shifted left by ``T - E``) and folds the k
constants into its requantization: ``out = s_v * sum_f 2**(-f/k) acc_f / R``. For
``log_sqrt2`` that is the even/odd split: odd codes carry the one constant ``1/sqrt(2)``.
Rows are renormalized as in LogIntSoftmax (``lis_renormalize``): ``R = sum_f 2**(-f/k) R_f``.

Codes follow the log2 layout: unsigned, ``m`` in 0..qmax, ``qmax = 2**bits - 1`` meaning 0.
The float64 arithmetic here holds integers (an integer kernel would use 64/128-bit integers
for step 2's products); the fake-quant graph and the integer graph both run these functions,
so their codes are identical.
"""

from __future__ import annotations

from fractions import Fraction

import torch
from torch import nn

from fxquant.quant.log_quantizers import method_for_step, step_values
from fxquant.runtime.integer import UINT8_OFFSET
from fxquant.runtime.log_int_softmax import LogIntSoftmax, i_exp, refine_shift
from fxquant.runtime.savable import POINT, Schema, TensorRule, savable

__all__ = [
    "attention_output_errors",
    "base_codes",
    "base_values",
    "exp_rows",
    "codes_from_exp",
    "LogBaseSoftmax",
    "LogBaseShiftMatmul",
    "SOFTMAX_POINT_TYPES",
]

_FRAC_BITS = 24  # the sub-octave constants 2**(j / 2k) on a 2**-24 grid


def _sub_octave_constants(k: int) -> list[float]:
    return [round(2.0 ** (j / (2 * k)) * 2**_FRAC_BITS) / 2**_FRAC_BITS for j in range(1, 2 * k)]


def base_code_of_ratio(total: torch.Tensor, e: torch.Tensor, step: Fraction) -> torch.Tensor:
    """``m = round(log2(total / e) / step)`` by integer comparisons (``0 < e <= total``,
    integer-valued float64); see the module docstring."""
    p, k = step.numerator, step.denominator
    a = torch.floor(torch.log2(total / e))
    a = torch.where(torch.pow(2.0, a) * e > total, a - 1, a)  # fix float rounding of log2
    a = torch.where(torch.pow(2.0, a + 1) * e <= total, a + 1, a)
    base = torch.pow(2.0, a) * e
    g = torch.zeros_like(a)
    for c in _sub_octave_constants(k):
        g += (total >= base * c).to(g.dtype)
    n = 2 * k * a + g
    return torch.floor((n + p) / (2 * p))


def exp_rows(scores: torch.Tensor, scale: torch.Tensor, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """The integer exp of the scores' codes (Log-Int-Softmax's ``i_exp`` on the refined grid)
    and its sum along ``dim``: the ``e`` and ``T`` every code is found from."""
    x_int = torch.round(scores.double() / scale.double())
    x_int = x_int - x_int.amax(dim=dim, keepdim=True)
    shift = refine_shift(scale)
    exp_int, _ = i_exp(x_int * 2.0**shift, scale.double() / 2.0**shift)
    return exp_int, exp_int.sum(dim=dim, keepdim=True)


def codes_from_exp(exp_int: torch.Tensor, total: torch.Tensor, bits: int, step: Fraction) -> torch.Tensor:
    qmax = 2**bits - 1
    m = base_code_of_ratio(total, exp_int.clamp_min(1), step)
    m = torch.where(exp_int > 0, m, torch.full_like(m, qmax))
    return m.clamp_(0, qmax)


def base_codes(scores: torch.Tensor, scale: torch.Tensor, bits: int, step: Fraction, dim: int = -1) -> torch.Tensor:
    """Log-base-``2**step`` probability codes of softmax(scores) along ``dim`` (float tensor
    of integers); ``scale`` is the scores point's scale, broadcasting against ``scores``."""
    exp_int, total = exp_rows(scores, scale, dim)
    return codes_from_exp(exp_int, total, bits, step)


def attention_output_errors(
    scores: torch.Tensor, v: torch.Tensor, scale: torch.Tensor, bits: int, renormalize: bool, steps
) -> dict[Fraction, float]:
    """``sum |probs_step @ v - softmax(scores) @ v|**2`` for every step: what each base costs
    attn@V on these scores and values (the adaptive base's criterion, as AdaLog scores a
    base by the output it gives). ``scores`` (..., N, N) and ``v`` (..., N, d) in float."""
    exp_int, total = exp_rows(scores, scale, -1)
    v = v.double()
    reference = torch.softmax(scores.double(), -1) @ v
    errors = {}
    for step in steps:
        values = base_values(codes_from_exp(exp_int, total, bits, step), bits, step)
        if renormalize:
            row = values.sum(-1, keepdim=True)
            values = values / torch.where(row > 0, row, torch.ones_like(row))
        errors[step] = float(((values @ v - reference) ** 2).sum())
    return errors


def base_values(codes: torch.Tensor, bits: int, step: Fraction) -> torch.Tensor:
    """``2**(-m * step)`` (float64); the zero code ``qmax`` gives 0."""
    qmax = 2**bits - 1
    return step_values(codes.double(), step).masked_fill_(codes >= qmax, 0.0)


def _step(num: int, den: int) -> Fraction:
    step = Fraction(int(num), int(den))
    if step <= 0:
        raise ValueError(f"a log base step must be positive, got {step}")
    return step


@savable(
    Schema(
        {"point": POINT, "bits": int, "dim": int, "renormalize": bool, "step_num": int, "step_den": int},
        {"scale": TensorRule((torch.float32,))},
        layout="config",
    )
)
class LogBaseSoftmax(nn.Module):
    """Replaces ``softmax(x, dim)`` and a ``log_sqrt2`` / adaptive-base point after it:
    integer exp of the scores' codes, then codes of base ``2**(step_num/step_den)``.

    Duck-types :class:`LogIntSoftmax` (``scale``, ``bits``, ``dim``, ``point``,
    ``renormalize``) so that the debugging tools treat both alike; it is *not* a subclass,
    so code that lowers a LogIntSoftmax by its log2 arithmetic never takes it for one.
    """

    def __init__(
        self,
        scale: torch.Tensor,
        bits: int,
        step: Fraction,
        dim: int = -1,
        point=None,
        renormalize: bool = True,
    ):
        super().__init__()
        if bits < 2 or bits > 16:
            raise ValueError(f"a log softmax needs 2..16 bits, got {bits}")
        step = _step(Fraction(step).numerator, Fraction(step).denominator)
        self.bits, self.dim, self.point, self.renormalize = bits, dim, point, bool(renormalize)
        self.step_num, self.step_den = step.numerator, step.denominator
        self.register_buffer("scale", scale.detach().to(torch.float32).clone())

    @property
    def step(self) -> Fraction:
        return Fraction(self.step_num, self.step_den)

    @property
    def max_exponent(self) -> int:
        """The largest shift a non-zero code needs: ``floor((qmax - 1) * step)``."""
        return int((2**self.bits - 2) * self.step)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values = base_values(base_codes(x, self.scale, self.bits, self.step, self.dim), self.bits, self.step)
        if self.renormalize:  # a row whose every code underflowed stays 0 (no 0/0)
            total = values.sum(self.dim, keepdim=True)
            values = values / torch.where(total > 0, total, torch.ones_like(total))
        return values.to(x.dtype)

    def shift_matmul(self, v_scale, v_zero_point, max_shift: int, label: str = "") -> "LogBaseShiftMatmul":
        """The integer attn@V that reads this softmax's scores and V's codes."""
        head = (self.scale, self.bits, self.step_num, self.step_den, self.renormalize)
        return LogBaseShiftMatmul(*head, v_scale, v_zero_point, max_shift, label)

    def extra_repr(self) -> str:
        shown = f"{self.scale.item():.4g}" if self.scale.numel() == 1 else f"per-head[{self.scale.numel()}]"
        return (
            f"{method_for_step(self.step)} (base 2^({self.step})) {self.bits}-bit probabilities, integer exp, "
            f"scores scale={shown}"
        )


@savable(
    Schema(
        {
            "bits": int,
            "step_num": int,
            "step_den": int,
            "renormalize": bool,
            "max_shift": int,
            "label": str,
            "v_uint8": bool,
        },
        {
            "lis_scale": TensorRule((torch.float32,), required=True),
            "v_scale": TensorRule((torch.float64,), fits="lis_scale", required=True),
            "v_zero_point": TensorRule((torch.float64,), fits="lis_scale", required=True),
        },
    )
)
class LogBaseShiftMatmul(nn.Module):
    """``softmax(scores) @ v`` with log-base-``2**(p/k)`` probability codes and V's integer
    codes: k integer accumulators of shifted V codes, combined by k constants in the
    requantization (see the module docstring). Terms shifted below ``2**-max_shift`` of the
    largest are dropped (``max_shift`` keeps every partial sum an exact float64 integer)."""

    v_uint8 = False  # V read as uint8 codes (int8 code + 128): oneDNN graphs

    def __init__(
        self,
        lis_scale: torch.Tensor,
        bits: int,
        step_num: int,
        step_den: int,
        renormalize: bool,
        v_scale: torch.Tensor,
        v_zero_point: torch.Tensor,
        max_shift: int,
        label: str = "",
    ):
        super().__init__()
        _step(step_num, step_den)
        self.bits, self.step_num, self.step_den = int(bits), int(step_num), int(step_den)
        self.renormalize, self.max_shift, self.label = bool(renormalize), int(max_shift), label
        self.register_buffer("lis_scale", lis_scale.to(torch.float32).clone())
        self.register_buffer("v_scale", v_scale.to(torch.float64).clone())
        self.register_buffer("v_zero_point", v_zero_point.to(torch.float64).clone())

    def input_to_uint8(self, index: int) -> None:
        if index != 1:
            raise ValueError("LogBaseShiftMatmul reads codes only as its second operand (V)")
        self.v_uint8 = True

    def forward(self, scores: torch.Tensor, v_codes: torch.Tensor) -> torch.Tensor:
        p, k = self.step_num, self.step_den
        m = base_codes(scores, self.lis_scale, self.bits, Fraction(p, k), -1)
        qmax = 2**self.bits - 1
        e = m * p
        exponent = torch.floor(e / k)
        part = e - exponent * k
        live = (exponent <= self.max_shift) & (m < qmax)
        powers = torch.where(live, torch.pow(2.0, self.max_shift - exponent), torch.zeros_like(m))
        v = v_codes.to(torch.float64) - (self.v_zero_point + (UINT8_OFFSET if self.v_uint8 else 0))
        acc = torch.zeros(())
        weight = torch.zeros(())
        for f in range(k):  # one exact integer accumulator per constant 2**(-f/k)
            in_part = torch.where(part == f, powers, torch.zeros_like(powers))
            c = 2.0 ** (-f / k)
            acc = acc + c * torch.matmul(in_part, v)
            if self.renormalize:
                weight = weight + c * in_part.sum(-1, keepdim=True)
        if self.renormalize:  # a row whose every code underflowed stays 0 (no 0/0)
            out = acc * self.v_scale / torch.where(weight > 0, weight, torch.ones_like(weight))
        else:
            out = acc * (self.v_scale * 2.0**-self.max_shift)
        return out.to(scores.dtype)

    def extra_repr(self) -> str:
        return (
            f"{self.label}: {method_for_step(Fraction(self.step_num, self.step_den))} {self.bits}-bit probabilities "
            f"(integer exp) @ v codes by shifts up to {self.max_shift}, {self.step_den} accumulator(s)"
            + (", rows renormalized" if self.renormalize else "")
        )


#: the modules that replace a softmax and its probability point (debugging tools, guards)
SOFTMAX_POINT_TYPES = (LogIntSoftmax, LogBaseSoftmax)
