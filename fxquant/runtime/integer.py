"""Integer arithmetic of the ``int`` backend: dyadic multipliers, requantization, int8 GEMMs.

Conventions (what ``fxquant.runtime.int_modules`` and ``passes/lower_integer.py`` rely on):

* **Activation codes are int8 tensors.** An unsigned 8-bit point (codes 0..255, zero
  point z) is stored shifted by -128: code - 128 with zero point z - 128. The values are
  the same, and ``torch._int_mm`` takes int8 x int8 only. ``CODE_SHIFT`` says by how much
  a point's codes were shifted, so they can be compared with the fake-quant graph's.
* **Requantization is dyadic**: a real multiplier M = s_in * s_w / s_out is written as
  m * 2**-k with an integer m < 2**31 and a shift k, and ``y = (acc * m + 2**(k-1)) >> k``
  in int64 (|acc| < 2**31 and m < 2**31, so the product fits); bias, zero-point terms and
  the output zero point are folded into that one int64 constant (``requant_offset``). The arithmetic shift rounds
  half up; the fake-quant graph rounds half to even: they differ only on exact ties.
* **Exact products**: int8 x int8 GEMMs accumulate in int32 (``torch._int_mm``; the
  attention matmuls one GEMM per (batch, head) matrix, ``fxquant::int8_bmm_sums`` under
  torch.compile); on CUDA the attention matmuls use float32 on integer values, exact while
  every partial sum stays below 2**24 (``exact_float_matmul_bound`` checks that at lowering).
"""

from __future__ import annotations

from typing import Optional

import torch

MULTIPLIER_BITS = 31  # m < 2**31: an int32, and acc * m fits int64 for any int32 acc
MAX_SHIFT = 54  # zero_point * 2**k (|zp| <= 128) stays below 2**62, so acc * m + offset fits int64
FLOAT32_EXACT = 2**24  # every integer of magnitude <= 2**24 is exact in float32
FLOAT64_EXACT = 2**53  # every integer of magnitude <= 2**53 is exact in float64
INT8_MIN, INT8_MAX = -128, 127
UINT8_MIN, UINT8_MAX = 0, 255
INT8_RANGE, UINT8_RANGE = (INT8_MIN, INT8_MAX), (UINT8_MIN, UINT8_MAX)
CODE_RANGES = {torch.int8: INT8_RANGE, torch.uint8: UINT8_RANGE}  # every code each 8-bit dtype holds
UINT8_OFFSET = 128  # uint8 code = int8 code + 128 (oneDNN's activations, fxquant.runtime.onednn)


def fits(qmin: int, qmax: int, dtype: torch.dtype) -> bool:
    """True when every code of [qmin, qmax] is a value of the 8-bit ``dtype`` (int8 or uint8)."""
    low, high = CODE_RANGES[dtype]
    return low <= qmin <= qmax <= high


def fits_int8(qmin: int, qmax: int) -> bool:
    return fits(qmin, qmax, torch.int8)


def fits_uint8(qmin: int, qmax: int) -> bool:
    return fits(qmin, qmax, torch.uint8)


def code_dtype_for(qmin: int, qmax: int, prefer: torch.dtype = torch.int8) -> Optional[torch.dtype]:
    """The 8-bit dtype that holds every code of [qmin, qmax]: ``prefer`` when both do
    (0..127), the other when only it does, None when neither does (wider than 8 bits, or
    an empty range)."""
    other = torch.uint8 if prefer == torch.int8 else torch.int8
    return next((dtype for dtype in (prefer, other) if fits(qmin, qmax, dtype)), None)


def code_shift(qmin: int, qmax: int) -> int:
    """How much a point's codes are shifted to fit int8: 128 for 0..255, 0 for int8 ranges."""
    dtype = code_dtype_for(qmin, qmax)
    if dtype is None:
        raise ValueError(f"codes in [{qmin}, {qmax}] do not fit 8 bits")
    return 0 if dtype == torch.int8 else UINT8_OFFSET


def dyadic_multiplier(real: torch.Tensor | float, bits: int = MULTIPLIER_BITS) -> tuple[torch.Tensor, torch.Tensor]:
    """(m, k), int64 tensors with ``real ~= m * 2**-k``, ``2**(bits-1) <= m < 2**bits``.

    The relative error is at most 2**-bits. A multiplier below 2**(bits - 1 - MAX_SHIFT)
    (about 1e-7) keeps k = MAX_SHIFT and a smaller m: its absolute error stays below
    2**-(MAX_SHIFT + 1), far below one output step for any int32 accumulator of a GEMM.
    """
    real = torch.as_tensor(real, dtype=torch.float64)
    if not torch.all(torch.isfinite(real)) or not torch.all(real > 0):
        raise ValueError("a requantization multiplier must be finite and positive")
    mantissa, exponent = torch.frexp(real)  # real = mantissa * 2**exponent, mantissa in [0.5, 1)
    m = torch.round(mantissa * 2.0**bits).to(torch.int64)
    carry = m == 2**bits  # the mantissa rounded up to 1.0
    m = torch.where(carry, m // 2, m)
    k = bits - (exponent.to(torch.int64) + carry.to(torch.int64))
    if torch.any(k < 1):
        raise ValueError(
            f"requantization multiplier {float(real.max()):g} is too large for a "
            f"{bits}-bit dyadic multiplier (needs < 2**{bits - 1})"
        )
    too_small = k > MAX_SHIFT
    if torch.any(too_small):
        m = torch.where(too_small, torch.round(real * 2.0**MAX_SHIFT).to(torch.int64), m)
        k = k.clamp(max=MAX_SHIFT)
    return m, k


def dyadic_value(m: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The real number ``m * 2**-k`` (float64), for checks and reports."""
    return m.to(torch.float64) * torch.pow(2.0, -k.to(torch.float64))


def shared_shift_multiplier(
    real: torch.Tensor, bits: int = MULTIPLIER_BITS, min_bits: int = 24
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel multipliers with one shift for all channels when every m keeps at least
    ``min_bits`` significant bits (a scalar shift is cheaper to apply than a tensor of
    shifts); otherwise ``dyadic_multiplier``'s per-channel shifts."""
    m, k = dyadic_multiplier(real, bits)
    if k.numel() <= 1 or bool(torch.all(k == k.reshape(-1)[0])):
        return m, k.reshape(-1)[0].clone() if k.numel() else k
    shift = k.min()
    shared = torch.round(torch.as_tensor(real, dtype=torch.float64) * 2.0 ** int(shift)).to(torch.int64)
    if int(shared.min()) < 2 ** (min_bits - 1):
        return m, k
    return shared, shift


def rounding_offset(k: torch.Tensor) -> torch.Tensor:
    """``2**(k-1)``: added before the shift so that it rounds to nearest (ties up)."""
    return torch.ones_like(k).bitwise_left_shift(k - 1)


def requant_offset(
    m: torch.Tensor, k: torch.Tensor, correction: torch.Tensor | int = 0, zero_point: torch.Tensor | int = 0
) -> torch.Tensor:
    """The int64 constant of ``requantize``: rounding, an integer ``correction`` added to the
    accumulator (bias, zero-point terms) and the output zero point, all in units of 2**-k:
    ``2**(k-1) + correction * m + zero_point * 2**k``."""
    correction = torch.as_tensor(correction, dtype=torch.int64)
    zero_point = torch.as_tensor(zero_point, dtype=torch.int64)
    return rounding_offset(k) + correction * m + zero_point.bitwise_left_shift(k)


def requantize(
    acc: torch.Tensor,
    m: torch.Tensor,
    k: torch.Tensor,
    offset: torch.Tensor,
    qmin: int = INT8_MIN,
    qmax: int = INT8_MAX,
) -> torch.Tensor:
    """int8 codes ``clamp((acc * m + offset) >> k, qmin, qmax)``.

    ``offset`` comes from ``requant_offset`` (rounding, corrections, zero point folded into
    one constant). One fused multiply-add in int64 (``addcmul`` promotes the int32
    accumulator), an in-place shift and clamp, then the narrowing cast: four passes.
    """
    if acc.is_floating_point():  # an exact integer result of a float matmul
        acc = acc.to(torch.int32)
    if offset.dim() == 0:  # a 0-d int64 would not promote the int32 accumulator: overflow
        offset = offset.reshape(1)
    y = torch.addcmul(offset, acc, m).bitwise_right_shift_(k)
    return y.clamp_(qmin, qmax).to(torch.int8)


def quantize_codes(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    qmin: int = INT8_MIN,
    qmax: int = INT8_MAX,
    dtype: torch.dtype = torch.int8,
) -> torch.Tensor:
    """int8 codes of a float tensor; the same arithmetic as ``fxquant.quant.quantizers.quantize``
    (division, round half to even), so codes equal the fake-quant graph's codes exactly.
    The zero point is added in float, before the clamp: ``round(x/s)`` alone may not fit
    int8 (a float -> int8 cast of such a value is undefined, and inductor and eager differ).
    ``dtype=torch.uint8``: unshifted codes for oneDNN's kernels (``fxquant.runtime.onednn``)."""
    q = torch.div(x.float() if x.dtype != torch.float32 else x, scale)
    return q.round_().add_(zero_point).clamp_(qmin, qmax).to(dtype)


def uint8_to_int8_codes(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes from uint8 ones (``int8 code + 128``): ``u - 128`` is ``u ^ 0x80`` reinterpreted."""
    return codes.bitwise_xor(UINT8_OFFSET).view(torch.int8)


def dequantize_codes(
    codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, post_scale: float = 1.0
) -> torch.Tensor:
    """``(codes - zero_point) * scale * post_scale`` in float32; the fake-quant graph's
    order of operations, so a point's float value is bit-identical to its fake-quant value."""
    y = codes.to(torch.float32).sub_(zero_point).mul_(scale)
    return y.mul_(post_scale) if post_scale != 1.0 else y


# ``torch._int_mm`` on CUDA needs more than 16 rows; the CPU kernel takes any shape, but
# inductor (torch 2.14) miscompiles a one-row int8 GEMM whose input comes from a fused
# producer through a strided view (ViT's head on x[:, 0] at batch 1): wrong values, no
# error. A second row of zeros avoids that code path.
_CUDA_MIN_ROWS = 17
_COMPILED_MIN_ROWS = 2


def int8_linear(codes: torch.Tensor, weight_t: torch.Tensor) -> torch.Tensor:
    """int32 ``codes @ weight_t`` over the last dimension: codes (..., K) int8, weight_t
    (K, N) int8 (the transpose of a contiguous (N, K) weight: the fastest layout for the CPU
    kernel). Leading dimensions are flattened into GEMM rows."""
    rows = codes.reshape(-1, codes.shape[-1])
    count = rows.shape[0]
    min_rows = _CUDA_MIN_ROWS if rows.is_cuda else (_COMPILED_MIN_ROWS if torch.compiler.is_compiling() else 1)
    if count < min_rows:
        rows = torch.cat([rows, rows.new_zeros(min_rows - count, rows.shape[1])])
    acc = torch._int_mm(rows, weight_t)[:count]
    return acc.reshape(*codes.shape[:-1], weight_t.shape[1])


def int8_batched_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """int32 ``a @ b`` for int8 (..., N, K) x (..., K, M) with equal batch dimensions: one
    ``torch._int_mm`` per matrix (it has no batched form). ``b`` is read through its
    transpose, made contiguous once, so each GEMM gets the column-major right operand the
    CPU kernel is fastest with."""
    batch = a.shape[:-2]
    rows, depth, cols = a.shape[-2], a.shape[-1], b.shape[-1]
    left = a.reshape(-1, rows, depth)
    right_t = b.transpose(-2, -1).reshape(-1, cols, depth).contiguous()
    if left.shape[0] != right_t.shape[0]:
        raise ValueError(f"int8_batched_matmul needs equal batch dimensions, got {tuple(a.shape)} and {tuple(b.shape)}")
    out = torch.empty(left.shape[0], rows, cols, dtype=torch.int32, device=a.device)
    for lhs, rhs_t, result in zip(left.unbind(0), right_t.unbind(0), out.unbind(0)):
        torch._int_mm(lhs, rhs_t.t(), out=result)
    return out.reshape(*batch, rows, cols)


def int8_matmul_with_sums(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``int8_batched_matmul(a, b)`` with the row sums of ``a`` (..., N, 1) and the column
    sums of ``b`` (..., 1, M), all int32: what the zero-point terms of an exact
    ``(a - za) @ (b - zb)`` need."""
    if a.dtype != torch.int8 or b.dtype != torch.int8:
        raise TypeError(f"fxquant::int8_bmm_sums takes int8 operands, got {a.dtype} and {b.dtype}")
    return (
        int8_batched_matmul(a, b),
        a.sum(dim=-1, keepdim=True, dtype=torch.int32),
        b.sum(dim=-2, keepdim=True, dtype=torch.int32),
    )


@torch.library.custom_op("fxquant::int8_bmm_sums", mutates_args=())
def int8_bmm_sums(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``int8_matmul_with_sums`` as one opaque op for compiled graphs: torch.compile calls it
    as an external kernel instead of unrolling its per-matrix loop (CPU: the int8 GEMMs run
    2.5x faster than a float32 batched matmul of the same integers at ViT-B sizes), and the
    sums arrive as small buffers, so the kernel that reads the accumulator applies the terms
    as broadcast operands instead of recomputing a reduction per element. Eager callers use
    the function itself (the op's dispatch costs about 0.3 ms per call at ViT-B sizes)."""
    return int8_matmul_with_sums(a, b)


@int8_bmm_sums.register_fake
def _int8_bmm_sums_shapes(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (
        a.new_empty((*a.shape[:-1], b.shape[-1]), dtype=torch.int32),
        a.new_empty((*a.shape[:-1], 1), dtype=torch.int32),
        b.new_empty((*b.shape[:-2], 1, b.shape[-1]), dtype=torch.int32),
    )


def exact_float_matmul_bound(depth: int, left_magnitude: int, right_magnitude: int) -> bool:
    """True when a float32 matmul of integers |a| <= left, |b| <= right over ``depth`` terms
    is exact: every partial sum is an integer below 2**24, so no rounding ever happens."""
    return depth * left_magnitude * right_magnitude < FLOAT32_EXACT


def exact_shift_matmul_bound(terms: int, magnitude: int, cap: int) -> int:
    """The largest shift T <= ``cap`` for which a float64 matmul of powers of two
    ``2**(T - m)`` (m >= 0) against integers |v| <= ``magnitude`` over ``terms`` terms is
    exact: every partial sum is an integer of magnitude <= terms * magnitude * 2**T, which
    must stay within float64's exact integers (2**53). Log-Int-Softmax's attn@V
    (``LisShiftMatmul``): terms are the summed tokens, ``magnitude`` the V point's largest
    |code - zero point|; a smaller V range leaves room for a larger T (finer probabilities).
    ValueError when not even T = 0 is exact."""
    if terms < 1 or magnitude < 0:
        raise ValueError(f"a shift matmul needs terms >= 1 and magnitude >= 0, got {terms} and {magnitude}")
    if magnitude == 0:  # V holds its zero point only: every product is 0
        return cap
    room = FLOAT64_EXACT // (terms * magnitude)
    if room < 1:
        raise ValueError(f"{terms} terms of magnitude {magnitude} exceed float64's exact integers (2**53)")
    return min(cap, room.bit_length() - 1)
