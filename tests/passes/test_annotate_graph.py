"""annotate, Before -> Expected: the graph is unchanged, the quantizable ops carry their points.

Before: the hand-written MLP (norm2 -> fc1 -> GELU -> fc2) and attention block, traced (the
attention decomposed first). Expected: the same graph (the Before module itself), with the
groups and specs of w8a8_minmax on the ops its module paths and attention roles name.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fxquant.ir.meta import INPUT_POINT, POINT, ROLE, WEIGHT
from tests.passes.graph_compare import (
    DIM,
    AttentionBlock,
    Mlp,
    act,
    apply,
    assert_same_structure,
    calib_batches,
    outputs,
    stage,
    tokens,
    trace_expected,
    w8a8_minmax,
    weight,
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


class ClassTokenHead(nn.Module):
    """The end of a ViT: final ``norm`` -> class token ``x[:, 0]`` -> ``head_drop`` -> ``head``,
    plus a projection under a name no ViT rule knows (``reduce.linear``, as LeViT's LinearNorm)."""

    def __init__(self, pool: str = "token"):
        super().__init__()
        torch.manual_seed(0)
        self.pool = pool
        self.reduce = nn.Module()
        self.reduce.linear = nn.Linear(DIM, DIM)
        self.norm = nn.LayerNorm(DIM)
        self.head_drop = nn.Dropout(0.0)
        self.head = nn.Linear(DIM, 3)
        self.eval()

    def forward(self, x):
        x = self.norm(self.reduce.linear(x))
        x = x[:, 0] if self.pool == "token" else x.mean(dim=1)
        return self.head(self.head_drop(x))


@pytest.mark.parametrize("pool", ["token", "avg"])
def test_the_final_norm_point_is_the_token_the_head_reads(pool):
    """Expected: the Before itself; ``final_norm``'s point on ``x[:, 0]`` (or the token mean)
    rather than on the norm, so it is calibrated on what the head reads (a LayerScale ViT's
    class token is ~1000x smaller than the patch tokens at random init); ``reduce.linear``
    gets the generic ``linear`` weight group."""
    model, x = ClassTokenHead(pool), tokens()
    config = w8a8_minmax(final_norm=act(), head={"weight": weight()}, linear={"weight": weight()})
    staged = stage(model, config, (x,), before="annotate", calib_data=calib_batches())
    gm = apply(staged, "annotate")

    assert_same_structure(gm, trace_expected(ClassTokenHead(pool)))
    read = "getitem" if pool == "token" else "mean"
    assert _annotations(gm) == {
        "reduce_linear": [f"linear.weight {S8_CHANNELS} axis=0"],
        read: [f"final_norm {U8}"],
        "head": [f"head.weight {S8_CHANNELS} axis=0"],
    }
    assert [n for n in gm.graph.nodes if n.name == read][0].meta[POINT].module == "norm"
    torch.testing.assert_close(outputs(gm, (x,)), outputs(model, (x,)), rtol=0, atol=0)
