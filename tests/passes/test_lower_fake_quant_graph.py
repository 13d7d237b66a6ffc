"""lower_fake_quant, Before -> Expected: observers become FakeQuantize, Linears QuantLinear.

Before: the hand-written MLP, observed after norm2 and the GELU and calibrated (w8a8_minmax).
Expected: ``norm2 -> FakeQuantize(norm2) -> QuantLinear(fc1) -> GELU -> FakeQuantize(mlp_gelu)
-> QuantLinear(fc2)``, built here with the min-max QParams computed by hand: the activations'
affine 8-bit grid from the calibration data, the weights' symmetric int8 grid per output
channel. The outputs are bit-identical to that Expected and within the quantization error of
the float MLP.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from fxquant.quant.points import QuantPoint
from fxquant.quant.qparams import QParams
from fxquant.quant.quantizers import qsnr_db
from fxquant.quant.spec import QuantSpec
from fxquant.runtime.fake_quant import FakeQuantize, QuantLinear
from tests.passes.graph_compare import (
    Mlp,
    apply,
    assert_same_structure,
    calib_batches,
    outputs,
    stage,
    tokens,
    trace_expected,
    w8a8_minmax,
)

U8 = QuantSpec(bits=8, signed=False, granularity="layer_wise", observer="minmax")
S8_CHANNELS = QuantSpec(bits=8, signed=True, granularity="channel_wise", observer="minmax")


def _affine_u8(values: list) -> QParams:
    lo = torch.tensor(min(0.0, min(float(v.min()) for v in values)))
    hi = torch.tensor(max(0.0, max(float(v.max()) for v in values)))
    scale = (hi - lo) / 255
    return QParams(scale, torch.clamp(-torch.round(lo / scale), 0, 255), 0, 255)


def _symmetric_s8_rows(w: torch.Tensor) -> QParams:
    scale = w.abs().amax(dim=1) / 127
    return QParams(scale, torch.zeros_like(scale), -128, 127, axis=0)


class FakeQuantMlp(nn.Module):
    def __init__(self, mlp: Mlp, calib: list):
        super().__init__()
        self.norm2, self.act = copy.deepcopy(mlp.norm2), copy.deepcopy(mlp.act)
        with torch.no_grad():
            normed = [mlp.norm2(b) for b in calib]
            gelu = [mlp.act(mlp.fc1(n)) for n in normed]
        self.fxq_norm2 = FakeQuantize(QuantPoint("norm2", "act", U8, "norm2"), _affine_u8(normed))
        self.fxq_act = FakeQuantize(QuantPoint("mlp_gelu", "act", U8, "act"), _affine_u8(gelu))
        for name in ("fc1", "fc2"):
            linear = getattr(mlp, name)
            point = QuantPoint(f"mlp_{name}", "weight", S8_CHANNELS, name, axis=0)
            setattr(self, name, QuantLinear(linear, point, _symmetric_s8_rows(linear.weight.detach())))

    def forward(self, x):
        return self.fc2(self.fxq_act(self.act(self.fc1(self.fxq_norm2(self.norm2(x))))))


def test_observers_and_weights_become_fake_quant_modules():
    model, x, calib = Mlp(), tokens(), calib_batches()
    staged = stage(model, w8a8_minmax(), (x,), before="lower_fake_quant", calib_data=calib)
    gm = apply(staged, "lower_fake_quant")
    expected = FakeQuantMlp(model, calib)

    assert_same_structure(gm, trace_expected(expected))
    for name in ("fc1", "fc2"):  # the same integer weight codes, derived once from the float weight
        assert torch.equal(gm.get_submodule(name).weight_codes, getattr(expected, name).weight_codes)
    got = outputs(gm, (x,))
    torch.testing.assert_close(got, outputs(expected, (x,)), rtol=0, atol=0)
    # against the float MLP: quantized (not equal), and 8-bit close (two 8-bit points: ~30 dB)
    assert 25.0 < qsnr_db(outputs(model, (x,)), got) < float("inf")


class SharedConv(nn.Module):
    """CoaT's conditional position encoding: one module (``fc1``) called at two nodes."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(8, 8)
        self.eval()

    def forward(self, x):
        return self.fc1(x) + self.fc1(x.flip(1))


def test_a_module_called_twice_is_quantized_once():
    """Expected: both calls read the one QuantLinear, its weight rounded once. Before the fix
    the second call found the module already quantized and refused ("weight is already
    quantized"), failing CoaT."""
    model, x = SharedConv(), tokens()
    config = w8a8_minmax(mlp_fc1={"weight": {"bits": 8, "calibration_mode": "channel_wise"}})
    staged = stage(model, config, (x,), before="lower_fake_quant", calib_data=calib_batches())
    gm = apply(staged, "lower_fake_quant")

    calls = [n for n in gm.graph.nodes if n.op == "call_module"]
    assert [str(n.target) for n in calls] == ["fc1", "fc1"]
    quantized = gm.get_submodule("fc1")
    assert isinstance(quantized, QuantLinear)
    expected = copy.deepcopy(model)
    expected.fc1 = quantized
    torch.testing.assert_close(outputs(gm, (x,)), outputs(expected, (x,)), rtol=0, atol=0)
    assert qsnr_db(outputs(model, (x,)), outputs(gm, (x,))) > 30.0
