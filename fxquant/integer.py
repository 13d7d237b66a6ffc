"""Integer arithmetic of the ``int`` backend: dyadic multipliers, requantization, int8 GEMMs.

Conventions (what ``fxquant.int_modules`` and ``passes/lower_integer.py`` rely on):

* **Activation codes are int8 tensors.** An unsigned 8-bit point (codes 0..255, zero
  point z) is stored shifted by -128: code - 128 with zero point z - 128. The values are
  the same, and ``torch._int_mm`` takes int8 x int8 only. ``CODE_SHIFT`` says by how much
  a point's codes were shifted, so they can be compared with the fake-quant graph's.
* **Requantization is dyadic**: a real multiplier M = s_in * s_w / s_out is written as
  m * 2**-k with an integer m < 2**31 and a shift k, and ``y = (acc * m + 2**(k-1)) >> k``
  in int64 (|acc| < 2**31 and m < 2**31, so the product fits). The arithmetic shift rounds
  half up; the fake-quant graph rounds half to even: they differ only on exact ties.
* **Exact products**: int8 x int8 GEMMs accumulate in int32 (``torch._int_mm``); the
  attention matmuls use float32 on integer values, exact while every partial sum stays
  below 2**24 (``exact_float_matmul_bound`` checks that at lowering).
"""
from __future__ import annotations

import torch

MULTIPLIER_BITS = 31  # m < 2**31: an int32, and acc * m fits int64 for any int32 acc
MAX_SHIFT = 62
FLOAT32_EXACT = 2 ** 24  # every integer of magnitude <= 2**24 is exact in float32
INT8_MIN, INT8_MAX = -128, 127


def code_shift(qmin: int, qmax: int) -> int:
    """How much a point's codes are shifted to fit int8: 128 for 0..255, 0 for int8 ranges."""
    if INT8_MIN <= qmin and qmax <= INT8_MAX:
        return 0
    if 0 <= qmin and qmax <= 255:
        return 128
    raise ValueError(f"codes in [{qmin}, {qmax}] do not fit 8 bits")


def dyadic_multiplier(real: torch.Tensor | float, bits: int = MULTIPLIER_BITS) -> tuple[torch.Tensor, torch.Tensor]:
    """(m, k), int64 tensors with ``real ~= m * 2**-k``, ``2**(bits-1) <= m < 2**bits``.

    The relative error is at most 2**-bits. A multiplier so small that k would pass
    MAX_SHIFT keeps k = MAX_SHIFT and a smaller m (fewer significant bits; such a
    multiplier rounds every int32 accumulator to 0 or +-1 anyway).
    """
    real = torch.as_tensor(real, dtype=torch.float64)
    if not torch.all(torch.isfinite(real)) or not torch.all(real > 0):
        raise ValueError("a requantization multiplier must be finite and positive")
    mantissa, exponent = torch.frexp(real)  # real = mantissa * 2**exponent, mantissa in [0.5, 1)
    m = torch.round(mantissa * 2.0 ** bits).to(torch.int64)
    carry = m == 2 ** bits  # the mantissa rounded up to 1.0
    m = torch.where(carry, m // 2, m)
    k = bits - (exponent.to(torch.int64) + carry.to(torch.int64))
    if torch.any(k < 1):
        raise ValueError(f"requantization multiplier {float(real.max()):g} is too large for a "
                         f"{bits}-bit dyadic multiplier (needs < 2**{bits - 1})")
    too_small = k > MAX_SHIFT
    if torch.any(too_small):
        m = torch.where(too_small, torch.round(real * 2.0 ** MAX_SHIFT).to(torch.int64), m)
        k = k.clamp(max=MAX_SHIFT)
    return m, k


def dyadic_value(m: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The real number ``m * 2**-k`` (float64), for checks and reports."""
    return m.to(torch.float64) * torch.pow(2.0, -k.to(torch.float64))


def rounding_offset(k: torch.Tensor) -> torch.Tensor:
    """``2**(k-1)``: added before the shift so that it rounds to nearest (ties up)."""
    return torch.ones_like(k).bitwise_left_shift(k - 1)


def requantize(acc: torch.Tensor, m: torch.Tensor, k: torch.Tensor, offset: torch.Tensor,
               zero_point: torch.Tensor | int, qmin: int = INT8_MIN, qmax: int = INT8_MAX) -> torch.Tensor:
    """int8 codes ``clamp(((acc * m + offset) >> k) + zero_point, qmin, qmax)``.

    ``offset`` is ``rounding_offset(k)`` plus whatever integer correction (bias, zero-point
    terms) was folded in as ``correction * m``: one int64 add serves both. All of m, k,
    offset and zero_point broadcast against ``acc``.
    """
    y = acc.to(torch.int64).mul_(m).add_(offset).bitwise_right_shift_(k)
    return y.add_(zero_point).clamp_(qmin, qmax).to(torch.int8)


def quantize_codes(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                   qmin: int = INT8_MIN, qmax: int = INT8_MAX) -> torch.Tensor:
    """int8 codes of a float tensor; the same arithmetic as ``fxquant.quantizers.quantize``
    (division, round half to even), so codes equal the fake-quant graph's codes exactly."""
    q = torch.div(x.float() if x.dtype != torch.float32 else x, scale)
    return q.round_().add_(zero_point).clamp_(qmin, qmax).to(torch.int8)


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                     post_scale: float = 1.0) -> torch.Tensor:
    """``(codes - zero_point) * scale * post_scale`` in float32; the fake-quant graph's
    order of operations, so a point's float value is bit-identical to its fake-quant value."""
    y = torch.sub(codes.to(torch.float32), zero_point).mul_(scale)
    return y.mul_(post_scale) if post_scale != 1.0 else y


# ``torch._int_mm`` on CUDA needs more than 16 rows; the CPU kernel takes any shape.
_CUDA_MIN_ROWS = 17


def int8_linear(codes: torch.Tensor, weight_t: torch.Tensor) -> torch.Tensor:
    """int32 ``codes @ weight_t`` over the last dimension: codes (..., K) int8, weight_t
    (K, N) int8 (the transpose of a contiguous (N, K) weight: the fastest layout for the CPU
    kernel). Leading dimensions are flattened into GEMM rows."""
    rows = codes.reshape(-1, codes.shape[-1])
    count = rows.shape[0]
    if rows.is_cuda and count < _CUDA_MIN_ROWS:
        rows = torch.cat([rows, rows.new_zeros(_CUDA_MIN_ROWS - count, rows.shape[1])])
    acc = torch._int_mm(rows, weight_t)[:count]
    return acc.reshape(*codes.shape[:-1], weight_t.shape[1])


def exact_float_matmul_bound(depth: int, left_magnitude: int, right_magnitude: int) -> bool:
    """True when a float32 matmul of integers |a| <= left, |b| <= right over ``depth`` terms
    is exact: every partial sum is an integer below 2**24, so no rounding ever happens."""
    return depth * left_magnitude * right_magnitude < FLOAT32_EXACT
