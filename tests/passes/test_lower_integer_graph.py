"""lower_integer, Before -> Expected: the fake-quant graph becomes int8 codes and integer GEMMs.

Before: the hand-written MLP (norm2 -> fc1 -> GELU -> fc2) lowered to fake quant under
w8a8_minmax. Expected, built here from the Before's QParams:

    norm2 -> QuantizeCodes(norm2) -> IntLinear(fc1, float out) -> GELU
          -> QuantizeCodes(mlp_gelu) -> IntLinear(fc2, float out) -> + non-finite guard

(unsigned 8-bit codes stored as int8, shifted by -128; no DequantizeCodes left, since no float
op reads a point's value; the guard checks norm2's output, the one float tensor from the input
that becomes codes). The output equals that Expected's exactly and the fake-quant graph's up
to float32 rounding of the GEMMs (which may move a GELU value across a step boundary).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from fxquant.quant.quantizers import qsnr_db
from fxquant.runtime.fake_quant import FakeQuantize, QuantLinear
from fxquant.runtime.int_modules import IntLinear, QuantizeCodes
from tests.passes.graph_compare import (
    Mlp,
    apply,
    assert_same_structure,
    calib_batches,
    nonfinite_guard,
    outputs,
    stage,
    tokens,
    trace_expected,
    w8a8_minmax,
)

SHIFT = 128  # unsigned codes 0..255 are stored as int8 code - 128


def _codes(fq: FakeQuantize) -> QuantizeCodes:
    qp = fq.qparams
    return QuantizeCodes(fq.point.label, qp.scale, qp.zero_point - SHIFT, qp.qmin - SHIFT, qp.qmax - SHIFT)


def _int_linear(linear: QuantLinear, source: FakeQuantize) -> IntLinear:
    qp = source.qparams
    return IntLinear(
        linear.weight_codes,
        linear.weight_qparams.scale,
        linear.bias,
        float(qp.scale) * source.post_scale,
        int(qp.zero_point) - SHIFT,
        linear.point.label,
    )


class IntegerMlp(nn.Module):
    def __init__(self, fake):
        super().__init__()
        self.norm2, self.act = copy.deepcopy(fake.norm2), copy.deepcopy(fake.act)
        self.fxq_norm2_codes, self.fxq_act_codes = _codes(fake.fxq_norm2), _codes(fake.fxq_act)
        self.fc1 = _int_linear(fake.fc1, fake.fxq_norm2)
        self.fc2 = _int_linear(fake.fc2, fake.fxq_act)
        for linear in (self.fc1, self.fc2):
            linear.release_setup_tensors()

    def forward(self, x):
        normed = self.norm2(x)
        out = self.fc2(self.fxq_act_codes(self.act(self.fc1(self.fxq_norm2_codes(normed)))))
        return nonfinite_guard(out, normed)


def test_mlp_runs_on_int8_codes():
    model, x = Mlp(), tokens()
    staged = stage(model, w8a8_minmax(), (x,), before="lower_integer", calib_data=calib_batches())
    fake = copy.deepcopy(staged.gm)
    gm = apply(staged, "lower_integer")
    expected = IntegerMlp(fake)

    assert_same_structure(gm, trace_expected(expected))
    assert gm.fc1.weight_codes.dtype == torch.int8 and torch.equal(
        gm.fc1.weight_codes, fake.fc1.weight_codes.to(torch.int8)
    )
    got = outputs(gm, (x,))
    torch.testing.assert_close(got, outputs(expected, (x,)), rtol=0, atol=0)
    assert qsnr_db(outputs(fake, (x,)), got) > 40.0  # the fake-quant graph's result, but for GEMM rounding
    nan_sample = x.clone()
    nan_sample[1, 2, 3] = float("nan")  # the guard: that sample's outputs are NaN, the other's unchanged
    poisoned = outputs(gm, (nan_sample,))
    assert torch.isnan(poisoned[1]).all() and torch.equal(poisoned[0], got[0])
