"""reparameterize: per-channel grids for post-LayerNorm activations on a per-tensor grid.

Before: the tiny ViT (norm1/norm2 gammas with planted outlier channels and shifted betas),
traced, annotated, qkv split, with affine per-tensor points on norm1/norm2. Expected: no key,
no change; with ``reparameterize: true`` the FP32 output unchanged (neutral), the structure
unchanged, every channel of the new LayerNorm outputs spanning the same range on the
calibration data (so a per-tensor min-max grid is each channel's own grid), the LayerNorm
nodes re-originated, and the quantized output closer to FP32 than without the pass.
"""

from __future__ import annotations

import copy

import pytest
import torch

from fxquant.errors import QConfigError
from fxquant.infra.contracts import PipelineOrderError
from fxquant.infra.neutrality import output_qsnr
from fxquant.infra.pass_manager import PassManager
from fxquant.ir.meta import ORIGIN
from fxquant.passes import Annotate, Calibrate, InsertObservers, LowerFakeQuant, Reparameterize, Smooth, SplitQkv
from fxquant.quant.qconfig import load_qconfig

OUTLIERS = (3, 17, 42)
BITS = 6


@pytest.fixture(scope="module")
def skewed():
    from tests.passes.conftest import tiny_model

    tiny = tiny_model("vit")
    model = copy.deepcopy(tiny.model)
    with torch.no_grad():
        for block in model.blocks:
            for norm in (block.norm1, block.norm2):
                norm.weight[list(OUTLIERS)] *= 30.0
                norm.bias[list(OUTLIERS)] += 5.0
    return tiny, model


def config(qconfigs, on=True):
    """8-bit weights (r1 scales weight columns up: the weights need their grid), BITS-bit
    post-LayerNorm activations."""
    base = qconfigs.gemm_inputs(8)
    for group in ("norm1", "norm2"):
        base[group] = {**base[group], "bits": BITS}
    return {**base, "reparameterize": on}


def split(tiny, model, trace, make_ctx, run, qconfig):
    gm = trace(model)
    ctx = make_ctx(gm, qconfig, tiny.inputs(), tiny.calib())
    return run(gm, ctx, Annotate(), SplitQkv()), ctx


def test_without_the_key_nothing_changes(skewed, trace, make_ctx, run, qconfigs):
    tiny, model = skewed
    gm, ctx = split(tiny, model, trace, make_ctx, run, config(qconfigs, False))
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    gm = run(gm, ctx, Reparameterize())
    assert all(torch.equal(before[k], v) for k, v in gm.state_dict().items())


def test_every_channel_gets_the_same_range(skewed, trace, make_ctx, run, qconfigs):
    tiny, model = skewed
    gm, ctx = split(tiny, model, trace, make_ctx, run, config(qconfigs))
    nodes = [n.name for n in gm.graph.nodes]
    gm = run(gm, ctx, Reparameterize())
    record = ctx.report.passes[-1]
    assert record.output_qsnr_db >= 100.0
    assert [n.name for n in gm.graph.nodes] == nodes
    norms = [f"blocks.{i}.norm{j}" for i in range(tiny.depth) for j in (1, 2)]
    assert sum("per-channel grids" in n for n in record.notes) == len(norms)
    ranges = {}
    handles = [
        gm.get_submodule(name).register_forward_hook(
            lambda m, a, out, name=name: ranges.setdefault(name, []).append(out.reshape(-1, out.shape[-1]))
        )
        for name in norms
    ]
    with torch.no_grad():
        for batch in tiny.calib():
            gm(batch)
    for h in handles:
        h.remove()
    for name in norms:
        flat = torch.cat(ranges[name])
        low, high = flat.amin(0).clamp(max=0), flat.amax(0).clamp(min=0)
        step = float((high - low).mean()) / (2**BITS - 1)
        # equal up to the rounding of each channel's zero point to an integer: one step
        assert float((low - low.mean()).abs().max()) <= step * 1.01, name
        assert float((high - high.mean()).abs().max()) <= step * 1.01, name
    node = next(n for n in gm.graph.nodes if n.name == "blocks_0_norm1")
    assert node.meta[ORIGIN] == "blocks_0_norm1@reparameterize"


def test_per_channel_grids_buy_accuracy(skewed, trace, make_ctx, run, qconfigs):
    tiny, model = skewed
    qsnr = {}
    for on in (False, True):
        gm, ctx = split(tiny, model, trace, make_ctx, run, config(qconfigs, on))
        gm = run(gm, ctx, Reparameterize(), InsertObservers(), Calibrate(), LowerFakeQuant())
        with torch.no_grad():
            qsnr[on] = output_qsnr(gm(*ctx.diff_inputs), ctx.reference(*ctx.diff_inputs))
    assert qsnr[True] > qsnr[False] + 3.0, qsnr


def test_symmetric_points_are_left_with_a_note(skewed, trace, make_ctx, run, qconfigs):
    tiny, model = skewed
    qconfig = config(qconfigs)
    for group in ("norm1", "norm2"):
        qconfig[group] = {**qconfig[group], "signed": True}
    gm, ctx = split(tiny, model, trace, make_ctx, run, qconfig)
    gm = run(gm, ctx, Reparameterize())
    assert sum("not reparameterized" in n for n in ctx.report.passes[-1].notes) == 2 * tiny.depth


def test_order_and_config_errors():
    with pytest.raises(PipelineOrderError, match="reparameterize"):
        PassManager([Annotate(), SplitQkv(), Smooth(), Reparameterize()])
    with pytest.raises(QConfigError, match="reparameterize: expected true or false"):
        load_qconfig({"extends": "w8a8", "reparameterize": "yes"})
