"""calibrate, Before -> Expected: the graph is unchanged; every observer saw every batch.

Before: the hand-written MLP with observers after norm2 and the GELU (w8a8_minmax). Expected:
the same graph, each observer's range the min/max of its value over the calibration batches
(computed here from the float module), so its QParams are min-max's affine 8-bit grid; the
observers stop observing afterwards; the output is unchanged.
"""

from __future__ import annotations

import copy

import torch

from fxquant.runtime.fake_quant import ObserverModule
from tests.passes.graph_compare import (
    Mlp,
    apply,
    assert_same_structure,
    calib_batches,
    outputs,
    stage,
    tokens,
    w8a8_minmax,
)


def _affine_u8(values: list) -> tuple[torch.Tensor, torch.Tensor]:
    """min-max's (scale, zero point) of 8-bit unsigned codes over ``values``, with 0 in range."""
    lo = min(float(v.min()) for v in values)
    hi = max(float(v.max()) for v in values)
    lo, hi = torch.tensor(min(lo, 0.0)), torch.tensor(max(hi, 0.0))
    scale = (hi - lo) / 255
    return scale, torch.clamp(-torch.round(lo / scale), 0, 255)


def test_observers_hold_the_ranges_of_the_calibration_data():
    model, x, calib = Mlp(), tokens(), calib_batches(3)
    staged = stage(model, w8a8_minmax(), (x,), before="calibrate", calib_data=calib)
    expected = copy.deepcopy(staged.gm)
    gm = apply(staged, "calibrate")

    assert_same_structure(gm, expected)
    with torch.no_grad():
        normed = [model.norm2(b) for b in calib]
        gelu = [model.act(model.fc1(n)) for n in normed]
    for path, values in (("fxq_norm2", normed), ("fxq_act", gelu)):
        observer: ObserverModule = gm.get_submodule(path)
        assert observer.observer.num_updates == len(calib) and not observer.observing
        qparams = observer.observer.compute_qparams()
        scale, zero = _affine_u8(values)
        torch.testing.assert_close(qparams.scale, scale.float(), rtol=1e-6, atol=0)
        assert torch.equal(qparams.zero_point, zero.float())
    torch.testing.assert_close(outputs(gm, (x,)), outputs(model, (x,)), rtol=0, atol=0)
