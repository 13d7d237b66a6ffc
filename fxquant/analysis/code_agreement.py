"""Integer graph against fake-quant graph: the codes of every lowered point compared.

``fxquant.compile`` writes these numbers into the report after an integer pipeline
(``fxquant.analysis.equivalence``); tests and ``bench/int_equivalence.py`` call
``code_agreement`` directly. A node of the integer graph that holds a point's codes carries
``node.meta[CODES_OF]`` = (the FakeQuantize node's name in the fake graph, the code shift).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from fxquant.ir.capture import capture_values
from fxquant.ir.meta import CODES_OF
from fxquant.quant.quantizers import quantize

__all__ = ["PointAgreement", "code_agreement", "agreement_summary"]


@dataclass
class PointAgreement:
    point: str
    label: str
    codes: int
    off_by_one: int
    worst: int  # largest |int code - fake code|


class _ForcedCodes(fx.Interpreter):
    """Runs the integer graph, records its codes at every point, then continues with the
    fake-quant graph's codes there: each point then shows only the error of the integer ops
    since the previous points, not rounding flips inherited from upstream."""

    def __init__(self, gm: fx.GraphModule, expected: dict[str, torch.Tensor]):
        super().__init__(gm)
        self.expected, self.got = expected, {}

    def run_node(self, n: fx.Node):
        value = super().run_node(n)
        if CODES_OF in n.meta:
            name, shift = n.meta[CODES_OF]
            self.got[n.name] = value
            value = (self.expected[n.name] - shift).to(value.dtype)
        return value


@torch.no_grad()
def code_agreement(
    fake_gm: fx.GraphModule, int_gm: fx.GraphModule, inputs: tuple, isolated: bool = False
) -> list[PointAgreement]:
    """Codes of every lowered point in the integer graph against the fake-quant graph's codes
    of the same point (``quantize`` of the FakeQuantize's input), on ``inputs``.

    ``isolated=False``: both graphs run freely, so a code that flips at one point (two
    roundings of values within float32 rounding of a step boundary) perturbs every later
    point, and deep random-init models amplify such flips. ``isolated=True``: the integer
    graph continues from the fake-quant codes at every point (the lowering's own error).
    """
    fake_nodes = {n.name: n for n in fake_gm.graph.nodes}
    fake_values = capture_values(fake_gm, tuple(inputs))
    expected, labels = {}, {}
    for node in int_gm.graph.nodes:
        if CODES_OF in node.meta:
            fq_node = fake_nodes[node.meta[CODES_OF][0]]
            fq = fake_gm.get_submodule(str(fq_node.target))
            expected[node.name] = quantize(fake_values[fq_node.args[0].name], fq.qparams)
            labels[node.name] = fq.point.label
    if isolated:
        runner = _ForcedCodes(int_gm, expected)
        runner.run(*inputs)
        got = runner.got
    else:
        got = capture_values(int_gm, tuple(inputs))
    int_nodes = {n.name: n for n in int_gm.graph.nodes}
    rows = []
    for name, want in expected.items():
        point, shift = int_nodes[name].meta[CODES_OF]
        diff = (got[name].to(torch.float64) + shift - want.to(torch.float64)).abs()
        rows.append(PointAgreement(point, labels[name], diff.numel(), int((diff == 1).sum()), int(diff.max())))
    return rows


def agreement_summary(rows: list[PointAgreement]) -> str:
    codes = sum(r.codes for r in rows)
    off = sum(r.off_by_one for r in rows)
    worst = max((r.worst for r in rows), default=0)
    share = off / codes if codes else 0.0
    return (
        f"integer vs fake-quant codes at {len(rows)} points: {off} of {codes} ({100 * share:.3f}%) differ "
        f"by 1 LSB, largest difference {worst} LSB"
    )
