"""use_onednn_kernels, Before -> Expected: the integer Linears run on oneDNN's fused int8 kernel.

Before: the hand-written MLP lowered to the integer graph under w8a8_minmax (``int_kernels=
"onednn"`` pipeline). Expected, built here from the fake-quant graph's QParams:

    norm2 -> QuantizeCodes(norm2, uint8) -> OnednnLinear(fc1, GELU and mlp_gelu's uint8 codes
          in its epilogue) -> OnednnLinear(fc2, float out) -> + non-finite guard

(the GELU and the mlp_gelu QuantizeCodes are gone; the codes travel as uint8, ``int8 code +
128``). The output equals that Expected's exactly and the fake-quant graph's within float32
rounding of the scales (a code may move by one step). Skipped where oneDNN's int8 ops are not
available (non-x86 torch builds).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fxquant.quant.quantizers import qsnr_db
from fxquant.runtime.fake_quant import FakeQuantize, QuantLinear
from fxquant.runtime.int_modules import QuantizeCodes
from fxquant.runtime.onednn import OnednnLinear, onednn_available
from tests.passes.graph_compare import (
    Mlp,
    apply,
    assert_same_structure,
    calib_batches,
    nonfinite_guard,
    notes_of,
    outputs,
    stage,
    tokens,
    trace_expected,
    w8a8_minmax,
)

pytestmark = pytest.mark.skipif(not onednn_available(), reason="oneDNN int8 ops need an x86 torch build")


def _linear(linear: QuantLinear, source: FakeQuantize, **output) -> OnednnLinear:
    qp = source.qparams
    return OnednnLinear(
        linear.weight_codes.to(torch.int8),
        linear.weight_qparams.scale,
        linear.bias,
        float(qp.scale),
        int(qp.zero_point),  # the unsigned point's own zero point: uint8 codes are its codes
        label=linear.point.label,
        **output,
    )


class OnednnMlp(nn.Module):
    def __init__(self, fake):
        super().__init__()
        self.norm2 = copy.deepcopy(fake.norm2)
        qp = fake.fxq_norm2.qparams
        self.fxq_norm2_codes = QuantizeCodes("norm2", qp.scale, qp.zero_point - 128, -128, 127)
        self.fxq_norm2_codes.to_uint8()
        gelu = fake.fxq_act.qparams
        self.fc1 = _linear(
            fake.fc1,
            fake.fxq_norm2,
            output="uint8",
            output_scale=float(gelu.scale),
            output_zero_point=int(gelu.zero_point),
            post_op="gelu",
            out_label="mlp_gelu",
        )
        self.fc2 = _linear(fake.fc2, fake.fxq_act)

    def forward(self, x):
        normed = self.norm2(x)
        return nonfinite_guard(self.fc2(self.fc1(self.fxq_norm2_codes(normed))), normed)


def test_fc1_gelu_and_its_point_become_one_onednn_kernel():
    model, x = Mlp(), tokens()
    staged = stage(model, w8a8_minmax(), (x,), before="lower_integer", calib_data=calib_batches(), int_kernels="onednn")
    fake = copy.deepcopy(staged.gm)
    apply(staged, "lower_integer", "onednn")
    portable = copy.deepcopy(staged.gm)
    gm = apply(staged, "use_onednn_kernels", "onednn")
    expected = OnednnMlp(fake)

    assert_same_structure(gm, trace_expected(expected))
    got = outputs(gm, (x,))
    torch.testing.assert_close(got, outputs(expected, (x,)), rtol=0, atol=0)
    assert qsnr_db(outputs(portable, (x,)), got) > 35.0
    assert qsnr_db(outputs(fake, (x,)), got) > 35.0
    note = next(n for n in notes_of(staged, "use_onednn_kernels") if n.startswith("use_onednn_kernels"))
    assert "2 of 2 Linears" in note and "1 with GELU" in note
