"""insert_observers: after every annotated activation point, an ObserverModule node.

Before: the traced tiny ViT / Swin, annotated and split. Expected: one ``fxq_*`` observer
per ``fxq.point``, right after its op, holding the point (moved off the op) with the op's
provenance and role; every other user of the op reads the observer; weights get no observer.
"""

from __future__ import annotations

import pytest

from fxquant.errors import PassError
from fxquant.ir.meta import MODULE, ORIGIN, ORIGIN_SLICE, POINT, ROLE, WEIGHT
from fxquant.passes import Annotate, InsertObservers, SplitQkv
from fxquant.runtime.fake_quant import OBSERVER_PREFIX, ObserverModule, observer_nodes


def prepared(tiny, trace, make_ctx, run, qconfig):
    """The graph just before insert_observers, and a snapshot of its annotated points."""
    gm = trace(tiny.model)
    ctx = make_ctx(gm, qconfig, tiny.inputs())
    gm = run(gm, ctx, Annotate(), SplitQkv())
    snapshot = {n.name: (n.meta[POINT], {u.name for u in n.users}) for n in gm.graph.nodes if POINT in n.meta}
    return gm, ctx, snapshot


def test_fp32_output_unchanged_bit_identical(tiny, trace, make_ctx, run, qconfigs, fp32):
    gm, ctx, _ = prepared(tiny, trace, make_ctx, run, qconfigs.all_groups())
    expected = fp32.forward(gm, ctx.diff_inputs)

    gm = run(gm, ctx, InsertObservers())

    assert fp32.forward(gm, ctx.diff_inputs).equal(expected)  # observers pass values through
    assert (
        ctx.report.pass_record("insert_observers").output_qsnr_db == ctx.report.pass_record("split_qkv").output_qsnr_db
    )


def test_one_observer_per_annotated_point(tiny, trace, make_ctx, run, qconfigs):
    gm, ctx, before = prepared(tiny, trace, make_ctx, run, qconfigs.all_groups())
    weights_before = {n.name for n in gm.graph.nodes if WEIGHT in n.meta}

    gm = run(gm, ctx, InsertObservers())

    observers = observer_nodes(gm)
    assert len(observers) == len(before) > 0
    nodes = {n.name: n for n in gm.graph.nodes}
    observed_ops = set()
    for observer, module in observers:
        assert isinstance(module, ObserverModule) and str(observer.target).startswith(OBSERVER_PREFIX)
        assert not module.observing and module.post_scale == 1.0
        (op,) = observer.args
        observed_ops.add(op.name)
        point, users_before = before[op.name]
        # the point moved from the op to its observer, which now stands for the op's value
        assert POINT not in op.meta and observer.meta[POINT] is point and module.point is point
        assert observer.meta[ORIGIN] == op.meta[ORIGIN]
        assert observer.meta.get(ORIGIN_SLICE) == op.meta.get(ORIGIN_SLICE)
        assert observer.meta[MODULE] == op.meta[MODULE]
        assert observer.meta.get(ROLE) == op.meta.get(ROLE)
        assert {u.name for u in op.users} == {observer.name}
        assert {u.name for u in observer.users} == users_before
        assert observer.next is not None and op.next is observer  # right after the op
    assert observed_ops == set(before)
    # weights are quantized at lowering, not observed
    assert {n.name for n in gm.graph.nodes if WEIGHT in n.meta} == weights_before
    assert all(WEIGHT not in nodes[o.name].meta for o, _ in observers)


def test_nothing_annotated_means_no_observers(vit, trace, make_ctx, run):
    gm, ctx, before = prepared(vit, trace, make_ctx, run, {})
    code = gm.code

    gm = run(gm, ctx, InsertObservers())

    assert before == {} and observer_nodes(gm) == [] and gm.code == code


def test_running_twice_raises(vit, trace, make_ctx, run, qconfigs):
    gm, ctx, _ = prepared(vit, trace, make_ctx, run, {"norm1": qconfigs.act()})
    gm = run(gm, ctx, InsertObservers())
    count = len(observer_nodes(gm))

    with pytest.raises(PassError, match=r"pass 'insert_observers' failed.*already has observers.*runs once"):
        run(gm, ctx, InsertObservers())
    assert len(observer_nodes(gm)) == count == vit.depth
