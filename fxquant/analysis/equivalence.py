"""The integer backend's equivalence measurement: one analysis step after the pipeline.

``fxquant.compile(backend="int")`` keeps the fake-quant graph from before the integer passes
and, once they ran, compares the final integer graph with it on the diff inputs: the codes
of every lowered point (isolated and propagated, :mod:`fxquant.analysis.code_agreement`)
and the output QSNRs. The lines go into ``report.notes``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx as fx

from fxquant.analysis.code_agreement import PointAgreement, agreement_summary, code_agreement
from fxquant.infra.neutrality import output_qsnr


@dataclass
class Equivalence:
    isolated: list[PointAgreement]  # each point computed from the fake-quant codes of the points before it
    propagated: list[PointAgreement]  # both graphs run freely: flips carried downstream
    int_vs_fake_db: float
    int_vs_fp32_db: Optional[float] = None
    fake_vs_fp32_db: Optional[float] = None

    def notes(self) -> list[str]:
        line = f"output QSNR on the diff inputs: integer vs fake-quant {self.int_vs_fake_db:.2f} dB"
        if self.int_vs_fp32_db is not None:
            line += f", integer vs FP32 {self.int_vs_fp32_db:.2f} dB, fake-quant vs FP32 {self.fake_vs_fp32_db:.2f} dB"
        return [
            agreement_summary(self.isolated) + " (diff inputs; isolated: each point from the fake-quant codes of "
            "the points before it)",
            agreement_summary(self.propagated) + " (diff inputs; propagated: flips carried downstream)",
            line,
        ]


@torch.no_grad()
def measure_equivalence(
    fake: fx.GraphModule, int_gm: fx.GraphModule, inputs: tuple, reference: Optional[fx.GraphModule] = None
) -> Equivalence:
    """The integer graph ``int_gm`` against the fake-quant graph ``fake`` it was lowered from,
    on ``inputs``; with ``reference`` (the FP32 graph) both outputs against FP32 as well."""
    inputs = tuple(inputs)
    result = Equivalence(
        isolated=code_agreement(fake, int_gm, inputs, isolated=True),
        propagated=code_agreement(fake, int_gm, inputs),
        int_vs_fake_db=0.0,
    )
    fake_out, int_out = fake(*inputs), int_gm(*inputs)
    result.int_vs_fake_db = output_qsnr(fake_out, int_out)
    if reference is not None:
        fp32 = reference(*inputs)
        result.int_vs_fp32_db, result.fake_vs_fp32_db = output_qsnr(fp32, int_out), output_qsnr(fp32, fake_out)
    return result
