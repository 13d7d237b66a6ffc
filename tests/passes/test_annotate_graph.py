"""annotate, Before -> Expected: the graph is unchanged, the quantizable ops carry their points.

Before: the hand-written MLP (norm2 -> fc1 -> GELU -> fc2) and attention block, traced (the
attention decomposed first). Expected: the same graph (the Before module itself), with the
groups and specs of w8a8_minmax on the ops its module paths and attention roles name.
"""

from __future__ import annotations

import torch

from fxquant.ir.meta import INPUT_POINT, POINT, ROLE, WEIGHT
from tests.passes.graph_compare import (
    AttentionBlock,
    Mlp,
    apply,
    assert_same_structure,
    calib_batches,
    outputs,
    stage,
    tokens,
    trace_expected,
    w8a8_minmax,
)

U8 = "uniform8u/asym/layer_wise/minmax"
U8_HEADS = "uniform8u/asym/head_wise/minmax"
S8_CHANNELS = "uniform8s/sym/channel_wise/minmax"


def _annotations(gm) -> dict:
    """node name -> the points and role annotate put on it, as readable strings."""
    table = {}
    for node in gm.graph.nodes:
        marks = []
        for key in (WEIGHT, POINT, INPUT_POINT):
            point = node.meta.get(key)
            if point is not None:
                where = "" if point.axis is None else f" axis={point.axis}"
                groups = "" if point.num_groups is None else f" groups={point.num_groups}"
                marks.append(f"{point.label} {point.spec.describe()}{where}{groups}")
        if ROLE in node.meta:
            marks.append(f"role {node.meta[ROLE]}")
        if marks:
            table[node.name] = marks
    return table


def test_mlp_ops_get_their_groups_and_the_graph_stays_the_same():
    model, x = Mlp(), tokens()
    staged = stage(model, w8a8_minmax(), (x,), before="annotate", calib_data=calib_batches())
    gm = apply(staged, "annotate")

    assert_same_structure(gm, trace_expected(Mlp()))
    assert _annotations(gm) == {
        "norm2": [f"norm2 {U8}"],
        "fc1": [f"mlp_fc1.weight {S8_CHANNELS} axis=0"],
        "act": [f"mlp_gelu {U8}"],
        "fc2": [f"mlp_fc2.weight {S8_CHANNELS} axis=0"],
    }
    assert staged.ctx.report.float_points == []  # every point of this graph has a spec
    torch.testing.assert_close(outputs(gm, (x,)), outputs(model, (x,)), rtol=0, atol=0)


def test_attention_roles_are_found_on_the_decomposed_attention():
    model, x = AttentionBlock(), tokens(dim=16)
    staged = stage(model, w8a8_minmax(), (x,), before="annotate", calib_data=calib_batches(dim=16))
    before = staged.gm.graph.python_code("self").src
    gm = apply(staged, "annotate")

    assert gm.graph.python_code("self").src == before  # meta only
    assert _annotations(gm) == {
        "attn_qkv": [f"attn_qkv.weight {S8_CHANNELS} axis=0"],
        "getitem": [f"attn_q_out {U8_HEADS} axis=1 groups=2", "role attn_q"],
        "getitem_1": [f"attn_k_out {U8_HEADS} axis=1 groups=2", "role attn_k"],
        "getitem_2": [f"attn_v_input {U8_HEADS} axis=1 groups=2", "role attn_v"],
        "matmul": [f"attn_kv_out {U8_HEADS} axis=1 groups=2", "role attn_scores"],
        "softmax": ["role attn_softmax"],  # intSoft has no spec in w8a8: float
        "matmul_1": [f"attn_v_out {U8}", "role attn_out"],
        "attn_proj": [f"attn_proj.weight {S8_CHANNELS} axis=0"],
    }
    assert any("intSoft" in line for line in staged.ctx.report.float_points)
    torch.testing.assert_close(outputs(gm, (x,)), outputs(model, (x,)), rtol=1e-6, atol=1e-6)
