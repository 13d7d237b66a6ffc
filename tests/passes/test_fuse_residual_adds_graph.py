"""fuse_residual_adds, Before -> Expected: the residual add goes into fc2's oneDNN call.

Before: ``x + ls(drop(mlp(x)))`` (timm's block tail: Dropout and an Identity LayerScale
between fc2 and the add) lowered to the oneDNN integer graph under w8a8_minmax, up to
``use_onednn_kernels``:

    fc2 (OnednnLinear, float output) -> drop -> ls -> add(x, .)

Expected: ``fc2(fc1 codes, x)``, the pass-through modules and the add gone; everything else as
it was. The output equals the unfused graph's bit for bit (one float32 addition either way).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fxquant.runtime.onednn import onednn_available
from tests.passes.graph_compare import (
    Mlp,
    apply,
    assert_same_structure,
    calib_batches,
    copy_submodules,
    nonfinite_guard,
    notes_of,
    outputs,
    stage,
    tokens,
    trace_expected,
    w8a8_minmax,
)

pytestmark = pytest.mark.skipif(not onednn_available(), reason="the oneDNN integer graph needs an x86 torch build")


class ResidualMlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = Mlp()
        self.drop = nn.Dropout(0.1)
        self.ls = nn.Identity()
        self.eval()

    def forward(self, x):
        return x + self.ls(self.drop(self.mlp(x)))


class FusedResidualMlp(nn.Module):
    def __init__(self, unfused):
        super().__init__()
        copy_submodules(self, unfused, "mlp.norm2", "fxq_mlp_norm2_codes", "mlp.fc1", "mlp.fc2")

    def forward(self, x):
        normed = self.mlp.norm2(x)
        hidden = self.mlp.fc1(self.fxq_mlp_norm2_codes(normed))
        return nonfinite_guard(self.mlp.fc2(hidden, x), normed)


def test_residual_add_goes_into_the_linear():
    x = tokens()
    staged = stage(
        ResidualMlp(),
        w8a8_minmax(),
        (x,),
        before="fuse_residual_adds",
        calib_data=calib_batches(),
        int_kernels="onednn",
    )
    unfused = copy.deepcopy(staged.gm)
    gm = apply(staged, "fuse_residual_adds", "onednn")
    expected = FusedResidualMlp(unfused)

    assert_same_structure(gm, trace_expected(expected))
    got = outputs(gm, (x,))
    torch.testing.assert_close(got, outputs(expected, (x,)), rtol=0, atol=0)
    torch.testing.assert_close(got, outputs(unfused, (x,)), rtol=0, atol=0)
    assert notes_of(staged, "fuse_residual_adds") == [
        "fuse_residual_adds: 1 residual adds in the epilogue of the oneDNN Linear before them (add into mlp.fc2)"
    ]
