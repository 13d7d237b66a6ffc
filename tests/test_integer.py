"""fxquant.runtime.integer: dyadic multipliers, requantization, int8 GEMM, and the integer modules."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fxquant.quant.qparams import QParams
from fxquant.quant.quantizers import dequantize, quantize
from fxquant.runtime.int_modules import IntLinear, IntMatmul
from fxquant.runtime.integer import (
    MAX_SHIFT,
    MULTIPLIER_BITS,
    UINT8_OFFSET,
    code_dtype_for,
    code_shift,
    dequantize_codes,
    dyadic_multiplier,
    dyadic_value,
    exact_float_matmul_bound,
    fits_int8,
    fits_uint8,
    int8_linear,
    quantize_codes,
    requant_offset,
    requantize,
    shared_shift_multiplier,
)

multipliers = st.floats(min_value=1e-9, max_value=1e3, allow_nan=False, allow_infinity=False)


@settings(max_examples=300, deadline=None)
@given(multipliers)
def test_dyadic_multiplier_is_an_int32_with_31_bits_of_precision(real):
    m, k = dyadic_multiplier(real)
    assert 1 <= int(k) <= MAX_SHIFT and 0 <= int(m) < 2**MULTIPLIER_BITS
    error = abs(Fraction(int(m), 2 ** int(k)) - Fraction(real))
    if int(k) < MAX_SHIFT:
        assert 2 ** (MULTIPLIER_BITS - 1) <= int(m)
        assert error <= Fraction(real) * Fraction(1, 2**MULTIPLIER_BITS)
    else:  # a tiny multiplier: the shift is capped, the absolute error is half a unit of 2**-k
        assert error <= Fraction(1, 2 ** (MAX_SHIFT + 1))


@settings(max_examples=300, deadline=None)
@given(
    multipliers, st.integers(min_value=-(2**31) + 1, max_value=2**31 - 1), st.integers(min_value=-128, max_value=127)
)
def test_requantize_is_round_half_up_of_the_dyadic_product(real, acc, zero_point):
    """Checked against exact rational arithmetic: floor(acc * m / 2**k + 1/2) + zp, clamped."""
    m, k = dyadic_multiplier(real)
    got = requantize(torch.tensor([acc], dtype=torch.int32), m, k, requant_offset(m, k, 0, zero_point))
    exact = Fraction(acc * int(m), 2 ** int(k)) + Fraction(1, 2)
    expected = max(-128, min(127, (exact.numerator // exact.denominator) + zero_point))
    assert got.dtype == torch.int8 and int(got) == expected


@settings(max_examples=200, deadline=None)
@given(multipliers, st.integers(min_value=-(2**24), max_value=2**24))
def test_requantize_is_within_one_step_of_real_rounding(real, acc):
    """Against round(acc * real) in float64: equal except within 2**-31 of a tie, never more than 1 off."""
    m, k = dyadic_multiplier(real)
    got = int(requantize(torch.tensor([acc], dtype=torch.int32), m, k, requant_offset(m, k)))
    assert abs(got - max(-128, min(127, round(acc * real)))) <= 1


def test_requantize_folds_an_integer_correction_into_the_offset():
    acc = torch.arange(-1000, 1000, dtype=torch.int32).reshape(4, 500)
    m, k = dyadic_multiplier(torch.tensor([0.01, 0.02, 0.03, 0.05]).reshape(4, 1))
    correction = torch.tensor([5, -7, 11, 0]).reshape(4, 1)
    folded = requantize(acc, m, k, requant_offset(m, k, correction, 3))
    separate = requantize(acc + correction.to(torch.int32), m, k, requant_offset(m, k)).to(torch.int32) + 3
    assert torch.equal(folded.to(torch.int32), separate.clamp(-128, 127))


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.floats(min_value=1e-6, max_value=1e-2), min_size=2, max_size=8),
    st.integers(min_value=-(2**24), max_value=2**24),
)
def test_a_shared_shift_keeps_24_bits_or_falls_back_to_per_channel_shifts(reals, acc):
    real = torch.tensor(reals, dtype=torch.float64)
    m, k = shared_shift_multiplier(real)
    assert torch.all(m < 2**31)
    value = dyadic_value(m, k.expand_as(m))
    assert torch.all((value - real).abs() <= real * 2.0**-23)
    acc_t = torch.full((len(reals),), acc, dtype=torch.int32)
    got = requantize(acc_t, m, k, requant_offset(m, k)).to(torch.int64)
    want = torch.clamp(torch.round(acc * real), -128, 127).to(torch.int64)
    assert (got - want).abs().max() <= 1


def test_dyadic_multiplier_refuses_what_it_cannot_represent():
    with pytest.raises(ValueError, match="finite and positive"):
        dyadic_multiplier(0.0)
    with pytest.raises(ValueError, match="too large"):
        dyadic_multiplier(2.0**31)
    m, k = dyadic_multiplier(1e-12)  # the shift is capped, m keeps 14 bits
    assert int(k) == MAX_SHIFT and float(dyadic_value(m, k)) == pytest.approx(1e-12, rel=1e-4)


def test_code_shift_puts_every_8_bit_range_into_int8():
    assert code_shift(0, 255) == 128 and code_shift(-128, 127) == 0 and code_shift(0, 15) == 0
    with pytest.raises(ValueError, match="do not fit 8 bits"):
        code_shift(-32768, 32767)


def test_quantize_and_dequantize_codes_match_the_fake_quant_kernels_exactly():
    x = torch.randn(64, 48, generator=torch.Generator().manual_seed(0)) * 3
    qp = QParams(torch.tensor(0.021), torch.tensor(131.0), 0, 255)
    codes = quantize_codes(x, qp.scale, qp.zero_point - 128, -128, 127)
    assert codes.dtype == torch.int8
    assert torch.equal(codes.to(torch.float32) + 128, quantize(x, qp))
    assert torch.equal(dequantize_codes(codes, qp.scale, qp.zero_point - 128), dequantize(quantize(x, qp), qp))


@pytest.mark.parametrize("rows", [1, 7, 17, 64])
def test_int8_linear_is_the_exact_integer_product(rows):
    generator = torch.Generator().manual_seed(rows)
    codes = torch.randint(-128, 128, (2, rows, 96), generator=generator, dtype=torch.int8)
    weight = torch.randint(-127, 128, (40, 96), generator=generator, dtype=torch.int8)
    acc = int8_linear(codes, weight.t())
    expected = codes.to(torch.int64) @ weight.to(torch.int64).t()
    assert acc.dtype == torch.int32 and acc.shape == (2, rows, 40) and torch.equal(acc.to(torch.int64), expected)


def test_exact_float_matmul_bound():
    assert exact_float_matmul_bound(64, 255, 255)  # head dim 64: 4.2e6 < 2**24
    assert not exact_float_matmul_bound(512, 255, 255)


def test_int_linear_float_output_equals_the_dequantized_linear():
    generator = torch.Generator().manual_seed(3)
    weight = torch.randint(-127, 128, (24, 32), generator=generator, dtype=torch.int8)
    w_scale = torch.rand(24, generator=generator) * 0.01 + 1e-3
    bias = torch.randn(24, generator=generator)
    codes = torch.randint(-128, 128, (5, 32), generator=generator, dtype=torch.int8)
    s_x, z_x = 0.05, -17
    layer = IntLinear(weight, w_scale, bias, s_x, z_x)
    expected = ((codes.double() - z_x) * s_x) @ (weight.double() * w_scale.double()[:, None]).t() + bias.double()
    torch.testing.assert_close(layer(codes).double(), expected, rtol=1e-6, atol=1e-5)

    out_scale, out_zero = torch.full((24,), 0.04), torch.full((24,), -3.0)
    layer.set_codes_output(out_scale, out_zero, -128, 127, "next")
    want = torch.clamp(torch.round(expected / 0.04) - 3, -128, 127)
    got = layer(codes).double()
    assert layer(codes).dtype == torch.int8
    assert (got - want).abs().max() <= 1 and (got != want).float().mean() < 0.05  # bias rounding, ties
    assert "weight" not in dict(layer.named_buffers()) and layer.weight_codes.dtype == torch.int8


def test_int_matmul_is_exact_and_requantizes_per_head():
    generator = torch.Generator().manual_seed(4)
    a = torch.randint(-128, 128, (2, 3, 9, 16), generator=generator, dtype=torch.int8)
    b = torch.randint(-128, 128, (2, 3, 16, 9), generator=generator, dtype=torch.int8)
    za, zb = torch.tensor([1.0, -5.0, 7.0]).reshape(1, 3, 1, 1), torch.tensor([0.0, 2.0, -9.0]).reshape(1, 3, 1, 1)
    acc_scale = torch.tensor([1e-4, 2e-4, 3e-4], dtype=torch.float64).reshape(1, 3, 1, 1)
    matmul = IntMatmul(za, zb, acc_scale)
    exact = (a.to(torch.int64) - za.to(torch.int64)) @ (b.to(torch.int64) - zb.to(torch.int64))
    torch.testing.assert_close(matmul(a, b).double(), exact.double() * acc_scale, rtol=1e-6, atol=0)
    matmul.set_codes_output(torch.full((1, 3, 1, 1), 0.5), torch.zeros(1, 3, 1, 1), -128, 127, "scores")
    want = torch.clamp(torch.round(exact.double() * acc_scale / 0.5), -128, 127)
    assert (matmul(a, b).double() - want).abs().max() <= 1


def test_int_linear_under_torch_compile_with_one_strided_row():
    """Inductor miscompiled a one-row int8 GEMM fed by a fused producer through x[:, 0] (ViT's
    head at batch 1); int8_linear pads such a call to two rows. Also: codes whose float value
    before the zero point exceeds int8 must come out the same compiled and eager."""
    generator = torch.Generator().manual_seed(5)
    weight = torch.randint(-127, 128, (10, 64), generator=generator, dtype=torch.int8)
    layer = IntLinear(
        weight, torch.rand(10, generator=generator) * 0.01 + 1e-3, torch.randn(10, generator=generator), 0.02, -100
    )

    def head(x):
        codes = quantize_codes(x, torch.tensor(0.02), torch.tensor(-100.0))
        return layer(codes[:, 0])

    compiled = torch.compile(head)
    for batch in (1, 3):
        x = torch.randn(batch, 17, 64, generator=generator) + 1.5  # many codes past 127 before the zero point
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), head(x), rtol=1e-6, atol=1e-5)


def test_int_matmul_eager_int8_path_equals_the_exact_float_path():
    """The per-matrix int8 GEMM path with integer zero-point terms, eager and under
    torch.compile (one opaque ``fxquant::int8_bmm_sums`` op), gives the exact accumulator."""
    generator = torch.Generator().manual_seed(6)
    a = torch.randint(-128, 128, (2, 3, 9, 16), generator=generator, dtype=torch.int8)
    k = torch.randint(-128, 128, (2, 3, 9, 16), generator=generator, dtype=torch.int8)
    za, zb = (
        torch.tensor([-100.0, 0.0, 90.0]).reshape(1, 3, 1, 1),
        torch.tensor([3.0, -128.0, 127.0]).reshape(1, 3, 1, 1),
    )
    matmul = IntMatmul(za, zb, torch.ones(1, 3, 1, 1, dtype=torch.float64))
    eager = matmul(a, k.transpose(-2, -1))
    exact = (a.to(torch.int64) - za.to(torch.int64)) @ (k.to(torch.int64) - zb.to(torch.int64)).transpose(-2, -1)
    assert torch.equal(eager.to(torch.int64), exact)
    compiled = torch.compile(matmul)(a, k.transpose(-2, -1))
    assert torch.equal(compiled.to(torch.int64), exact)


def test_int8_bmm_sums_op_gives_the_product_and_the_zero_point_sums():
    generator = torch.Generator().manual_seed(8)
    a = torch.randint(-128, 128, (2, 3, 5, 7), generator=generator, dtype=torch.int8)
    b = torch.randint(-128, 128, (2, 3, 4, 7), generator=generator, dtype=torch.int8).transpose(-2, -1)
    acc, row_sums, col_sums = torch.ops.fxquant.int8_bmm_sums(a, b)
    assert acc.dtype == row_sums.dtype == col_sums.dtype == torch.int32
    assert torch.equal(acc.to(torch.int64), a.to(torch.int64) @ b.to(torch.int64))
    assert torch.equal(row_sums, a.sum(-1, keepdim=True, dtype=torch.int32))
    assert torch.equal(col_sums, b.sum(-2, keepdim=True, dtype=torch.int32))
    with pytest.raises(TypeError, match="int8 operands"):
        torch.ops.fxquant.int8_bmm_sums(a.to(torch.uint8), b)


# -- which 8-bit dtype holds a code range: one rule for lowering, fake-quant weights, oneDNN and ONNX
@settings(max_examples=300, deadline=None)
@given(st.integers(-300, 300), st.integers(-300, 300), st.sampled_from([torch.int8, torch.uint8]))
def test_code_dtype_holds_every_code_of_the_range(qmin, qmax, prefer):
    dtype = code_dtype_for(qmin, qmax, prefer)
    codes = torch.arange(qmin, max(qmin, qmax + 1))  # empty when qmin > qmax
    held = {d for d in (torch.int8, torch.uint8) if codes.numel() and torch.equal(codes.to(d).long(), codes)}
    assert fits_int8(qmin, qmax) == (torch.int8 in held) and fits_uint8(qmin, qmax) == (torch.uint8 in held)
    if not held:
        assert dtype is None
        with pytest.raises(ValueError, match="do not fit 8 bits"):
            code_shift(qmin, qmax)
        return
    assert dtype == (prefer if prefer in held else next(iter(held)))
    shift = code_shift(qmin, qmax)  # int8 storage: a uint8-only range is shifted by 128
    assert shift == (0 if torch.int8 in held else UINT8_OFFSET)
    assert fits_int8(qmin - shift, qmax - shift)


def test_code_dtype_at_the_edges():
    assert code_dtype_for(-128, 127) == torch.int8 and code_dtype_for(0, 255) == torch.uint8
    assert code_dtype_for(0, 127) == torch.int8 and code_dtype_for(0, 127, prefer=torch.uint8) == torch.uint8
    assert code_dtype_for(-129, 0) is None and code_dtype_for(0, 256) is None and code_dtype_for(-1, 128) is None
