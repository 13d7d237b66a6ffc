"""insert_observers, Before -> Expected: an ObserverModule after every annotated activation.

Before: the hand-written MLP annotated under w8a8_minmax (norm2 and the GELU are points; the
Linears' weight points are not activations). Expected: ``norm2 -> fxq_norm2 -> fc1 -> GELU
-> fxq_act -> fc2``, each observer holding its point's spec; the point moves from the op to
its observer; the output is unchanged (observers pass values through).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from fxquant.ir.meta import POINT
from fxquant.quant.points import QuantPoint
from fxquant.quant.spec import QuantSpec
from fxquant.runtime.fake_quant import ObserverModule
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


class ObservedMlp(nn.Module):
    """Expected: the MLP with an observer after norm2 and after the GELU."""

    def __init__(self, mlp: Mlp):
        super().__init__()
        self.norm2, self.fc1, self.act, self.fc2 = (copy.deepcopy(m) for m in (mlp.norm2, mlp.fc1, mlp.act, mlp.fc2))
        self.fxq_norm2 = ObserverModule(QuantPoint("norm2", "act", U8, "norm2"), "norm2 (norm2)")
        self.fxq_act = ObserverModule(QuantPoint("mlp_gelu", "act", U8, "act"), "act (mlp_gelu)")

    def forward(self, x):
        return self.fc2(self.fxq_act(self.act(self.fc1(self.fxq_norm2(self.norm2(x))))))


def test_observers_follow_norm2_and_gelu():
    model, x = Mlp(), tokens()
    staged = stage(model, w8a8_minmax(), (x,), before="insert_observers", calib_data=calib_batches())
    gm = apply(staged, "insert_observers")

    assert_same_structure(gm, trace_expected(ObservedMlp(model)))
    nodes = {n.name: n for n in gm.graph.nodes}
    assert POINT not in nodes["norm2"].meta and POINT not in nodes["act"].meta  # moved to the observers
    assert nodes["fxq_norm2"].meta[POINT] == QuantPoint("norm2", "act", U8, "norm2")
    assert nodes["fxq_act"].meta[POINT] == QuantPoint("mlp_gelu", "act", U8, "act")
    for name in ("fxq_norm2", "fxq_act"):  # an observer computes the value it observes: same origin
        assert nodes[name].meta["fxq.origin"] == nodes[name].args[0].meta["fxq.origin"]
    torch.testing.assert_close(outputs(gm, (x,)), outputs(model, (x,)), rtol=0, atol=0)


def test_a_norm_input_point_observes_the_edge_into_the_norm_only():
    """``norm2: {input: ...}`` (FQ-ViT's PTF point): an observer between x and norm2 only."""
    model, x = Mlp(), tokens()
    config = w8a8_minmax(norm2={**w8a8_minmax()["norm2"], "input": {"bits": 8, "signed": True}})
    staged = stage(model, config, (x,), before="insert_observers", calib_data=calib_batches())
    gm = apply(staged, "insert_observers")

    class Expected(ObservedMlp):
        def __init__(self, mlp):
            super().__init__(mlp)
            spec = QuantSpec(bits=8, signed=True, granularity="layer_wise", observer="minmax")
            self.fxq_norm2_in = ObserverModule(QuantPoint("norm2", "input", spec, "norm2"), "norm2 (norm2.input)")

        def forward(self, x):
            h = self.fxq_norm2(self.norm2(self.fxq_norm2_in(x)))
            return self.fc2(self.fxq_act(self.act(self.fc1(h))))

    assert_same_structure(gm, trace_expected(Expected(model)))
    torch.testing.assert_close(outputs(gm, (x,)), outputs(model, (x,)), rtol=0, atol=0)
