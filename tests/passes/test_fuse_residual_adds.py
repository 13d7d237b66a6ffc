"""fuse_residual_adds: which adds it fuses, which it leaves, and that nothing changes numerically.

The Before -> Expected structure is in test_fuse_residual_adds_graph.py; here the kernel's
residual argument itself (oneDNN and portable paths, the broadcast fallback), the patterns the
pass must not fuse, and a whole timm ViT compiled, saved and loaded with the pass on.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fxquant
import fxquant.runtime.onednn as onednn_module
from fxquant.passes import FuseResidualAdds
from fxquant.pipeline import default_passes
from fxquant.runtime.onednn import OnednnLinear, onednn_available
from tests.passes.graph_compare import (
    DIM,
    Mlp,
    apply,
    calib_batches,
    notes_of,
    outputs,
    stage,
    tokens,
    w8a8_minmax,
)

pytestmark = pytest.mark.skipif(not onednn_available(), reason="the oneDNN integer graph needs an x86 torch build")


def _linear(out_features: int = 16, in_features: int = 32, **kw) -> OnednnLinear:
    g = torch.Generator().manual_seed(0)
    weight = torch.randint(-127, 128, (out_features, in_features), dtype=torch.int8, generator=g)
    scale = torch.rand(out_features, generator=g) * 0.01 + 0.001
    bias = torch.randn(out_features, generator=g)
    return OnednnLinear(weight, scale, bias, input_scale=0.05, input_zero_point=128, **kw)


def _codes(rows: int = 10, in_features: int = 32) -> torch.Tensor:
    return torch.randint(0, 256, (2, rows, in_features), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("path", ["onednn", "portable"])
def test_the_residual_is_added_exactly_as_a_separate_add(path, monkeypatch):
    if path == "portable":
        monkeypatch.setattr(onednn_module, "_AVAILABLE", False)
    linear, codes = _linear(), _codes()
    residual = torch.randn(2, 10, 16, generator=torch.Generator().manual_seed(2)) * 100
    torch.testing.assert_close(linear(codes, residual), residual + linear(codes), rtol=0, atol=0)


def test_a_residual_of_another_shape_or_dtype_broadcasts_as_the_add_did():
    linear, codes = _linear(), _codes()
    for residual in (torch.randn(16), torch.randn(2, 1, 16), torch.randn(2, 10, 16, dtype=torch.float64)):
        torch.testing.assert_close(linear(codes, residual), residual + linear(codes), rtol=0, atol=0)


def test_a_residual_needs_a_float_output_without_gelu():
    codes, residual = _codes(), torch.randn(2, 10, 16)
    with pytest.raises(TypeError, match="float output without GELU"):
        _linear(post_op="gelu")(codes, residual)
    with pytest.raises(TypeError, match="float output without GELU"):
        _linear(output="uint8", output_scale=0.1, output_zero_point=128)(codes, residual)


class _TwoReaders(nn.Module):
    """fc2's output is added to x and also returned: fusing would lose the second reader's value."""

    def __init__(self):
        super().__init__()
        self.mlp = Mlp()
        self.eval()

    def forward(self, x):
        y = self.mlp(x)
        return x + y, y


class _BroadcastAdd(nn.Module):
    """fc2's output plus a per-channel vector: an add, but no residual of fc2's shape."""

    def __init__(self):
        super().__init__()
        self.mlp = Mlp()
        self.offset = nn.Parameter(torch.linspace(-1, 1, DIM))
        self.eval()

    def forward(self, x):
        return self.mlp(x) + self.offset


@pytest.mark.parametrize("model", [_TwoReaders(), _BroadcastAdd()], ids=["two readers", "broadcast"])
def test_adds_that_are_not_a_residual_of_one_linear_stay(model):
    x = tokens()
    staged = stage(
        model, w8a8_minmax(), (x,), before="fuse_residual_adds", calib_data=calib_batches(), int_kernels="onednn"
    )
    before = copy.deepcopy(staged.gm)
    gm = apply(staged, "fuse_residual_adds", "onednn")
    assert [n.name for n in gm.graph.nodes] == [n.name for n in before.graph.nodes]
    assert notes_of(staged, "fuse_residual_adds") == [
        "fuse_residual_adds: 0 residual adds in the epilogue of the oneDNN Linear before them"
    ]


def _tiny_vit():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    kw = dict(img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=2, num_classes=10)
    return timm.create_model("vit_tiny_patch16_224", **kw).eval()


def test_a_timm_vit_fuses_both_branch_adds_of_every_block_and_keeps_its_outputs(tmp_path):
    model = _tiny_vit()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    fused = fxquant.compile(model, "w8a8", calib_data=x, backend="int", int_kernels="onednn", progress=False)
    passes = [p for p in default_passes("int", "onednn", fused.qconfig) if not isinstance(p, FuseResidualAdds)]
    unfused = fxquant.compile(model, "w8a8", calib_data=x, backend="int", passes=passes, progress=False)

    note = next(n for n in fused.report.notes if n.startswith("fuse_residual_adds"))
    assert note.startswith("fuse_residual_adds: 4 residual adds")  # 2 blocks x (attention, MLP)
    residual_calls = [
        n
        for n in fused.graph.nodes
        if n.op == "call_module" and len(n.args) == 2 and isinstance(fused.get_submodule(n.target), OnednnLinear)
    ]
    assert len(residual_calls) == 4
    torch.testing.assert_close(outputs(fused, (x,)), outputs(unfused, (x,)), rtol=0, atol=0)
    # the diff pairs each fused call with the float model's add: the same QSNR as the add had
    records = {r.name: r for r in fused.report.passes}
    before = {n["origin"]: n["qsnr_db"] for n in records["use_onednn_kernels"].nodes}
    after = {n["node"]: n for n in records["fuse_residual_adds"].nodes}
    for call in residual_calls:
        row = after[call.name]
        assert row["origin"].startswith("add") and row["qsnr_db"] == before[row["origin"]]
    assert records["fuse_residual_adds"].output_qsnr_db == records["use_onednn_kernels"].output_qsnr_db

    loaded = fxquant.load(fxquant.save(fused, tmp_path / "fused.fxq"))
    torch.testing.assert_close(outputs(loaded, (x,)), outputs(fused, (x,)), rtol=0, atol=0)
