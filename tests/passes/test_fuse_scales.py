"""fuse_scales: one scale across reshape/permute chains; attention's 1/sqrt(d) folded into q's.

Before: the tiny ViT / Swin with observers, calibrated. Expected: the ``q * scale`` multiply
gone, its factor in the q observer's ``post_scale`` (== head_dim ** -0.5), scores computed
from the observer directly; an ``attn_qkv.output`` observer that reaches ``attn_q_out`` /
``attn_k_out`` / ``attn_v_input`` only through reshape/permute/Identity removed; a branching
observer kept; the output bit-identical (observers still pass values through).
"""

from __future__ import annotations

import torch

from fxquant.analysis.numeric_diff import capture_values
from fxquant.ir.meta import ORIGIN, POINT, ROLE
from fxquant.ir.patterns import find_attention
from fxquant.passes import Annotate, Calibrate, FuseScales, InsertObservers, LowerFakeQuant, SplitQkv
from fxquant.runtime.fake_quant import FakeQuantize, observer_nodes


def attention_qconfig(qconfigs, qkv_output=True):
    config = {
        group: qconfigs.act(calibration_mode="head_wise") for group in ("attn_q_out", "attn_k_out", "attn_v_input")
    }
    config["norm1"] = qconfigs.act()
    if qkv_output:
        config["attn_qkv"] = {"output": qconfigs.act()}
    return config


def calibrated(tiny, trace, make_ctx, run, qconfig):
    gm = trace(tiny.model)
    ctx = make_ctx(gm, qconfig, tiny.inputs(), tiny.calib(batches=1))
    return run(gm, ctx, Annotate(), SplitQkv(), InsertObservers(), Calibrate()), ctx


def labels(gm):
    return sorted(module.point.label for _, module in observer_nodes(gm))


def test_fp32_output_unchanged_bit_identical(tiny, trace, make_ctx, run, qconfigs, graph, fp32):
    gm, ctx = calibrated(tiny, trace, make_ctx, run, qconfigs.all_groups())
    expected = fp32.forward(gm, ctx.diff_inputs)
    muls, observers = len(graph.scalar_muls(gm)), len(observer_nodes(gm))

    gm = run(gm, ctx, FuseScales())

    assert fp32.forward(gm, ctx.diff_inputs).equal(expected)  # x * post_scale is the multiply it replaced
    assert ctx.report.pass_record("fuse_scales").output_qsnr_db == ctx.report.pass_record("calibrate").output_qsnr_db
    assert len(graph.scalar_muls(gm)) == muls - tiny.depth
    assert len(observer_nodes(gm)) == observers - 3 * tiny.depth  # one qkv.output observer per Q, K, V


def test_attention_scale_is_folded_into_q(tiny, trace, make_ctx, run, qconfigs, graph):
    gm, ctx = calibrated(tiny, trace, make_ctx, run, attention_qconfig(qconfigs, qkv_output=False))
    assert len(graph.scalar_muls(gm)) == tiny.depth
    mul_origins = {n.meta[ORIGIN] for n in graph.scalar_muls(gm)}

    gm = run(gm, ctx, FuseScales())

    assert graph.scalar_muls(gm) == []
    matches = find_attention(gm)
    assert len(matches) == tiny.depth
    for match in matches:
        assert match.scale_mul is None  # q@kT reads the q observer directly
        module = gm.get_submodule(str(match.q.target))
        assert module.point.group == "attn_q_out" and match.q.meta[ROLE] == "attn_q"
        assert module.post_scale == tiny.head_dim**-0.5
        assert match.q.meta[ORIGIN] in mul_origins  # the observer now computes what the multiply did
    assert sum("folded into the scale" in note for note in ctx.report.pass_record("fuse_scales").notes) == tiny.depth


def test_upstream_observer_through_views_is_removed(tiny, trace, make_ctx, run, qconfigs):
    gm, ctx = calibrated(tiny, trace, make_ctx, run, attention_qconfig(qconfigs))
    before = labels(gm)
    assert before.count("attn_qkv.output") == 3 * tiny.depth

    gm = run(gm, ctx, FuseScales())

    after = labels(gm)
    assert "attn_qkv.output" not in after
    assert sorted(after + ["attn_qkv.output"] * 3 * tiny.depth) == before
    for letter in "qkv":  # each split Linear feeds its view chain directly now
        for node in gm.graph.nodes:
            if node.op == "call_module" and str(node.target).endswith(f"qkv_{letter}"):
                (user,) = node.users
                assert user.target == "reshape"
    shared = [note for note in ctx.report.pass_record("fuse_scales").notes if "shares the scale" in note]
    assert len(shared) == 3 * tiny.depth
    # norm1's observer feeds Q, K and V: it branches, so it keeps its own scale
    assert labels(gm).count("norm1") == tiny.depth


def test_folded_scale_survives_lowering(vit, trace, make_ctx, run, qconfigs, fp32):
    gm, ctx = calibrated(vit, trace, make_ctx, run, attention_qconfig(qconfigs))
    gm = run(gm, ctx, FuseScales(), LowerFakeQuant())

    values = capture_values(gm, ctx.diff_inputs)
    for match in find_attention(gm):
        fq = gm.get_submodule(str(match.q.target))
        assert isinstance(fq, FakeQuantize) and fq.post_scale == vit.head_dim**-0.5
        assert match.q.meta[POINT].group == "attn_q_out"
        # q is rounded on its own (per-head) grid first, then scaled: q / post_scale sits on the grid
        qp = fq.qparams
        q = values[match.q.name] / fq.post_scale
        codes = q / qp.broadcast_scale(q.dim()) + qp.broadcast_zero_point(q.dim())
        assert codes.min() >= qp.qmin and codes.max() <= qp.qmax
        torch.testing.assert_close(codes, codes.round(), rtol=0.0, atol=4 * qp.qmax * fp32.eps)
