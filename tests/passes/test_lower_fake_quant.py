"""lower_fake_quant: observers -> frozen FakeQuantize; weights quantized exactly once.

Before: the tiny ViT / Swin through calibrate and fuse_scales. Expected: every observer a
FakeQuantize with the observer's QParams; every annotated Linear/Conv2d a QuantLinear /
QuantConv2d whose float weight is exactly ``dequantize(weight_codes)``, codes within
[qmin, qmax], each weight within half a step of the FP32 one; lowering twice refused (the
seed's double-quantization bug); the 8-bit output's QSNR what 8 bits should give.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import fxquant
from fxquant.analysis.numeric_diff import capture_values, output_qsnr
from fxquant.errors import NodeError, PassError
from fxquant.ir.meta import POINT, WEIGHT
from fxquant.passes import Annotate, Calibrate, FuseScales, InsertObservers, LowerFakeQuant, SplitQkv
from fxquant.quant.quantizers import dequantize
from fxquant.runtime.fake_quant import FakeQuantize, ObserverModule, QuantConv2d, QuantLinear, observer_nodes

DB_PER_BIT = 20 * torch.log10(torch.tensor(2.0)).item()  # 6.02 dB: one bit halves the error amplitude


def ready_to_lower(tiny, trace, make_ctx, run, qconfig):
    gm = trace(tiny.model)
    ctx = make_ctx(gm, qconfig, tiny.inputs(), tiny.calib(batches=2))
    gm = run(gm, ctx, Annotate(), SplitQkv(), InsertObservers(), Calibrate(), FuseScales())
    return gm, ctx


def test_every_observer_becomes_a_frozen_fake_quantize(tiny, trace, make_ctx, run, qconfigs):
    gm, ctx = ready_to_lower(tiny, trace, make_ctx, run, qconfigs.gemm_inputs())
    expected = {
        node.name: (module.point, module.observer.compute_qparams(), module.post_scale)
        for node, module in observer_nodes(gm)
    }
    assert expected

    gm = run(gm, ctx, LowerFakeQuant())

    assert not [m for m in gm.modules() if isinstance(m, ObserverModule)]
    lowered = {
        n.name: gm.get_submodule(str(n.target))
        for n in gm.graph.nodes
        if n.op == "call_module" and isinstance(gm.get_submodule(str(n.target)), FakeQuantize)
    }
    assert set(lowered) == set(expected)
    for name, fq in lowered.items():
        point, qparams, post_scale = expected[name]
        assert fq.point is point and fq.post_scale == post_scale
        assert fq.qparams.scale.equal(qparams.scale) and fq.qparams.zero_point.equal(qparams.zero_point)
        assert (fq.qparams.qmin, fq.qparams.qmax, fq.qparams.axis) == (qparams.qmin, qparams.qmax, qparams.axis)


def test_every_annotated_weight_is_quantized_once(tiny, trace, make_ctx, run, qconfigs):
    gm, ctx = ready_to_lower(tiny, trace, make_ctx, run, qconfigs.gemm_inputs())
    fp32_modules = {str(n.target): gm.get_submodule(str(n.target)) for n in gm.graph.nodes if WEIGHT in n.meta}
    assert {type(m) for m in fp32_modules.values()} == {nn.Linear, nn.Conv2d}  # patch_embed is a Conv2d

    gm = run(gm, ctx, LowerFakeQuant())

    for path, fp32_module in fp32_modules.items():
        module = gm.get_submodule(path)
        assert isinstance(module, QuantConv2d if isinstance(fp32_module, nn.Conv2d) else QuantLinear)
        qp, codes = module.weight_qparams, module.weight_codes
        assert not codes.is_floating_point() and codes.dtype == torch.int8
        assert codes.min() >= qp.qmin and codes.max() <= qp.qmax
        assert module.weight.equal(dequantize(codes, qp))  # the float weight IS the codes' value
        # per output channel, within half a quantization step of the FP32 weight
        step = qp.broadcast_scale(fp32_module.weight.dim())
        assert ((module.weight - fp32_module.weight).abs() <= step / 2 * (1 + 4 * torch.finfo().eps)).all()
        if fp32_module.bias is None:  # Swin's patch-merging reduction
            assert module.bias is None
        else:
            assert module.bias.equal(fp32_module.bias)
    for node in gm.graph.nodes:
        if node.op == "call_module" and WEIGHT not in node.meta:
            assert not isinstance(gm.get_submodule(str(node.target)), (QuantLinear, QuantConv2d))


def test_lowering_quantized_weights_again_is_refused(vit, trace, make_ctx, run, qconfigs):
    gm, ctx = ready_to_lower(vit, trace, make_ctx, run, qconfigs.gemm_inputs())
    gm = run(gm, ctx, LowerFakeQuant())
    first = next(n for n in gm.graph.nodes if WEIGHT in n.meta)
    codes = gm.get_submodule(str(first.target)).weight_codes.clone()

    with pytest.raises(
        PassError,
        match=r"pass 'lower_fake_quant' failed: node '.*': weight is already "
        r"quantized.*double-quantization",
    ) as info:
        run(gm, ctx, LowerFakeQuant())
    assert info.value.node == first.name
    assert gm.get_submodule(str(first.target)).weight_codes.equal(codes)  # nothing was re-quantized


def test_lowering_before_calibration_is_refused(vit, trace, make_ctx, run, qconfigs):
    gm = trace(vit.model)
    ctx = make_ctx(gm, {"norm1": qconfigs.act()}, vit.inputs())
    gm = run(gm, ctx, Annotate(), InsertObservers())

    with pytest.raises(NodeError, match=r"node 'fxq_blocks_0_norm1': observer of norm1 saw no calibration data"):
        LowerFakeQuant().requires(gm, ctx)


def test_fake_quantized_activations_lie_on_their_grid(vit, trace, make_ctx, run, qconfigs, fp32):
    gm, ctx = ready_to_lower(vit, trace, make_ctx, run, qconfigs.gemm_inputs())
    gm = run(gm, ctx, LowerFakeQuant())

    values = capture_values(gm, ctx.diff_inputs)
    for node in gm.graph.nodes:
        if POINT not in node.meta:
            continue
        fq = gm.get_submodule(str(node.target))
        qp, x = fq.qparams, values[node.name] / fq.post_scale
        codes = x / qp.broadcast_scale(x.dim()) + qp.broadcast_zero_point(x.dim())
        assert codes.min() >= qp.qmin and codes.max() <= qp.qmax
        torch.testing.assert_close(codes, codes.round(), rtol=0.0, atol=4 * qp.qmax * fp32.eps)


def test_quantized_output_qsnr_is_what_8_bits_give(tiny, qconfigs):
    calib = tiny.image(16, seed=1)
    qsnr = {}
    for bits in (8, 4):
        qm = fxquant.compile(
            tiny.model, qconfigs.gemm_inputs(bits), calib_data=calib, diff_inputs=tiny.inputs(), progress=False
        )
        held_out = tiny.image(4, seed=7)
        with torch.no_grad():
            qsnr[bits] = output_qsnr(tiny.model(held_out), qm(held_out))
            # the report's figure: the same comparison on the diff input (reference graph == model)
            on_diff_input = output_qsnr(tiny.model(*tiny.inputs()), qm(*tiny.inputs()))
        # (the eager model may run fused SDPA, the traced reference does not: float32 rounding apart)
        assert qm.report.final.output_qsnr_db == pytest.approx(on_diff_input, abs=1e-3)

    assert math.isfinite(qsnr[8])
    # A full 8-bit chain keeps at least half its bits' worth of SNR end to end...
    assert qsnr[8] >= 8 / 2 * DB_PER_BIT
    # ...and 4 more bits buy at least half the textbook 6 dB per bit.
    assert qsnr[8] - qsnr[4] >= 4 / 2 * DB_PER_BIT
