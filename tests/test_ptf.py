"""PTF: the observer's power-of-two factors and LayerNorm from PTF codes in integers."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fxquant.quant.observers import make_observer
from fxquant.quant.observers.ptf import PtfObserver
from fxquant.quant.ptf import isqrt, ptf_alphas, ptf_layernorm_integer
from fxquant.quant.qparams import QParams
from fxquant.quant.quantizers import fake_quantize, quantize
from fxquant.quant.spec import QuantSpec

PTF8 = QuantSpec(bits=8, signed=False, granularity="channel_wise", observer="ptf")


def observe(x: torch.Tensor) -> QParams:
    obs = make_observer(PTF8, axis=-1, name="ln_in")
    assert isinstance(obs, PtfObserver)
    obs.update(x)
    return obs.compute_qparams()


def test_hand_made_channels_get_expected_factors():
    # channel ranges 8, 4, 2 and 1 around zero: the layer-wise grid is (16 / 255) wide per
    # step at alpha 3; each narrower channel is exact at its own power of two
    x = torch.tensor([[-8.0, -4.0, -2.0, -1.0], [8.0, 4.0, 2.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    qp = observe(x)
    base = 16.0 / 255 / 8
    assert torch.allclose(qp.scale, torch.tensor([8 * base, 4 * base, 2 * base, base]))
    # one zero point for all channels: the layer-wise grid's, qmin - round(lo / (range / 255))
    assert torch.all(qp.zero_point == -torch.round(torch.tensor(-8.0) / torch.tensor(16.0 / 255)))
    base_found, alpha = ptf_alphas(qp)
    assert alpha.tolist() == [3, 2, 1, 0]
    assert abs(float(base_found) - base) < 1e-9


def test_ptf_beats_one_scale_on_outlier_channels():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 50, 32, generator=g)
    x[..., 5] *= 30
    qp = observe(x)
    one = QParams(qp.scale.max(), qp.zero_point[0], 0, 255)
    assert (fake_quantize(x, qp) - x).pow(2).sum() < 0.2 * (fake_quantize(x, one) - x).pow(2).sum()
    _, alpha = ptf_alphas(qp)
    assert alpha[5] == 3 and alpha.max() == 3


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=2**62))
def test_isqrt_is_exact_floor(n):
    r = int(isqrt(torch.tensor([n], dtype=torch.int64))[0])
    assert r * r <= n < (r + 1) * (r + 1)


def test_isqrt_small_values():
    n = torch.arange(0, 50, dtype=torch.int64)
    assert isqrt(n).tolist() == [int(v**0.5 + 1e-9) for v in range(50)]


def test_integer_layernorm_matches_fake_quant_within_one_lsb():
    g = torch.Generator().manual_seed(1)
    c = 48
    x = torch.randn(3, 20, c, generator=g) + 0.5
    x[..., 7] *= 20
    x[..., 11] *= 6
    in_qp = observe(x)
    weight = torch.rand(c, generator=g) + 0.5
    bias = torch.randn(c, generator=g) * 0.1
    ln = torch.nn.LayerNorm(c, eps=1e-6)
    with torch.no_grad():
        ln.weight.copy_(weight)
        ln.bias.copy_(bias)
        y = ln(fake_quantize(x, in_qp))  # fake-quant: LayerNorm of the dequantized PTF input
    lo, hi = float(y.min()), float(y.max())
    out_qp = QParams(torch.tensor((hi - lo) / 255), torch.tensor(round(-lo / ((hi - lo) / 255))), 0, 255)
    expected = quantize(y, out_qp)
    got = ptf_layernorm_integer(quantize(x, in_qp), in_qp, weight, bias, 1e-6, out_qp)
    diff = (got.double() - expected.double()).abs()
    assert diff.max() <= 1
    assert (diff > 0).double().mean() < 0.005  # sigma with 8 fractional bits: flips only at exact ties


def test_alphas_refuse_non_ptf_params():
    qp = QParams(torch.tensor([0.1, 0.3]), torch.tensor([0.0, 0.0]), 0, 255, axis=-1)
    try:
        ptf_alphas(qp)
    except ValueError as exc:
        assert "power-of-two" in str(exc)
    else:
        raise AssertionError("expected a ValueError")


def test_sigma_fraction_bits_shrink_so_int64_cannot_overflow():
    """Wide layers get fewer fractional bits for the standard deviation: C * z_max squared,
    shifted left by 2 * sigma_bits, stays below 2**62."""
    from fxquant.quant.ptf import ptf_layernorm_constants

    for c, expected in ((64, 8), (4096, 8), (65536, 4)):
        scale = torch.full((c,), 0.01)
        scale[0] = 0.08  # alpha 3 on one channel
        in_qp = QParams(scale, torch.full((c,), 128.0), 0, 255, axis=-1)
        out_qp = QParams(torch.tensor(0.05), torch.tensor(128.0), 0, 255)
        k = ptf_layernorm_constants(in_qp, torch.ones(c), torch.zeros(c), 1e-6, out_qp)
        z_max = 128 << 3
        assert k.sigma_bits == expected
        assert (c * z_max) ** 2 << (2 * k.sigma_bits) < 2**62
