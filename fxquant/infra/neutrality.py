"""The check behind ``Pass.neutral``: a neutral pass leaves the model output as it was.

The pass manager runs the graph on ``ctx.diff_inputs`` before and after a neutral pass and
refuses the pass when the two outputs differ by more than float rounding (QSNR below
``NEUTRAL_MIN_DB``): a "neutral" rewrite that changes the numbers is a bug, and the per-node
diff would otherwise take its values as the new reference for the nodes it created.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from fxquant.ir.capture import flatten_tensors
from fxquant.quant.quantizers import qsnr_db

NEUTRAL_MIN_DB = 100.0  # float32 reordering keeps about 130-150 dB; a real change is far below


def output_qsnr(ref: Any, out: Any) -> float:
    """QSNR (dB) of a model output against a reference output of the same structure."""
    refs, outs = flatten_tensors(ref), flatten_tensors(out)
    if len(refs) != len(outs) or any(r.shape != o.shape for r, o in zip(refs, outs)):
        raise ValueError("the graph's output no longer has the reference output's structure")
    ref_cat = torch.cat([r.reshape(-1).double() for r in refs])
    out_cat = torch.cat([o.reshape(-1).double() for o in outs])
    return qsnr_db(ref_cat, out_cat)


@torch.no_grad()
def graph_output(gm: fx.GraphModule, inputs: tuple) -> Any:
    return gm(*inputs)
