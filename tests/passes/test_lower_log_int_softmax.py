"""lower_log_int_softmax: softmax + log2 intSoft point -> one LogIntSoftmax on the integer scores.

Before: the tiny ViT / Swin (Swin adds a relative position bias and a mask between the
scores and softmax) lowered to fake-quant with quantized scores and a log2 intSoft point.
Expected: no softmax and no intSoft FakeQuantize left, one LogIntSoftmax per attention,
scaled by the scores point's scale; its output equals ``lis_values(lis_codes(...))`` of
the softmax input exactly, each row divided by its sum (``lis_renormalize``, default), or
not divided with ``lis_renormalize: false``; without quantized scores the float softmax + log2 point stays
and the report says why.
"""

from __future__ import annotations

import torch

from fxquant.analysis.numeric_diff import capture_values
from fxquant.ir.patterns import is_softmax
from fxquant.passes import (
    Annotate,
    Calibrate,
    FuseScales,
    InsertObservers,
    LowerFakeQuant,
    LowerLogIntSoftmax,
    SplitQkv,
)
from fxquant.runtime.fake_quant import FakeQuantize
from fxquant.runtime.log_int_softmax import LogIntSoftmax, lis_codes, lis_values

LOG2 = {"bits": 8, "signed": False, "quantization_method": "log2", "observer_type": "MinmaxObserver"}


def lowered(tiny, trace, make_ctx, run, qconfig):
    gm = trace(tiny.model)
    ctx = make_ctx(gm, qconfig, tiny.inputs(), tiny.calib(batches=2))
    gm = run(gm, ctx, Annotate(), SplitQkv(), InsertObservers(), Calibrate(), FuseScales(), LowerFakeQuant())
    return gm, ctx


def modules_of(gm, kind):
    return [
        (n, gm.get_submodule(str(n.target)))
        for n in gm.graph.nodes
        if n.op == "call_module" and isinstance(gm.get_submodule(str(n.target)), kind)
    ]


def test_softmax_and_log2_point_become_lis(tiny, trace, make_ctx, run, qconfigs):
    gm, ctx = lowered(tiny, trace, make_ctx, run, {**qconfigs.gemm_inputs(), "intSoft": LOG2})
    scores = {n.name: m for n, m in modules_of(gm, FakeQuantize) if m.point.group == "attn_kv_out"}
    gm = run(gm, ctx, LowerLogIntSoftmax())

    lis = modules_of(gm, LogIntSoftmax)
    assert len(lis) == len(tiny.heads)
    assert not [n for n in gm.graph.nodes if is_softmax(gm, n)]
    assert not [m for _, m in modules_of(gm, FakeQuantize) if m.point.group == "intSoft"]
    for _node, module in lis:
        assert module.bits == 8 and module.point.group == "intSoft"
        assert any(torch.equal(module.scale.flatten(), s.qparams.scale.flatten()) for s in scores.values())
    values = capture_values(gm, tiny.inputs())
    for node, module in lis:
        x = values[node.args[0].name]
        expected = lis_values(lis_codes(x, module.scale, 8), 8)
        assert module.renormalize
        assert torch.equal(values[node.name], (expected / expected.sum(-1, keepdim=True)).float())
        torch.testing.assert_close(values[node.name].sum(-1), torch.ones_like(values[node.name].sum(-1)))
    record = ctx.report.passes[-1]
    assert record.output_qsnr_db > 15  # the pass changes rounding, not the model


def test_fqvit_exact_lis_without_renormalization(vit, trace, make_ctx, run, qconfigs):
    gm, ctx = lowered(
        vit, trace, make_ctx, run, {**qconfigs.gemm_inputs(), "intSoft": {**LOG2, "lis_renormalize": False}}
    )
    gm = run(gm, ctx, LowerLogIntSoftmax())
    values = capture_values(gm, vit.inputs())
    for node, module in modules_of(gm, LogIntSoftmax):
        assert not module.renormalize
        expected = lis_values(lis_codes(values[node.args[0].name], module.scale, 8), 8)
        assert torch.equal(values[node.name], expected.float())  # pure powers of two


def test_without_quantized_scores_the_float_softmax_stays(vit, trace, make_ctx, run, qconfigs):
    config = {**qconfigs.gemm_inputs(), "intSoft": LOG2}
    del config["attn_kv_out"]
    gm, ctx = lowered(vit, trace, make_ctx, run, config)
    before = [n.name for n, _ in modules_of(gm, FakeQuantize)]
    gm = run(gm, ctx, LowerLogIntSoftmax())
    assert [n.name for n, _ in modules_of(gm, FakeQuantize)] == before
    assert not modules_of(gm, LogIntSoftmax)
    notes = ctx.report.pass_record("lower_log_int_softmax").notes
    assert len([n for n in notes if "intSoft" in n and "attn_kv_out" in n]) == 2


def test_uniform_intsoft_is_left_alone(vit, trace, make_ctx, run, qconfigs):
    config = {**qconfigs.gemm_inputs(), "intSoft": {**LOG2, "quantization_method": "uniform"}}
    gm, ctx = lowered(vit, trace, make_ctx, run, config)
    before = gm.code
    gm = run(gm, ctx, LowerLogIntSoftmax())
    assert gm.code == before
