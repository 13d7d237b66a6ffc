"""fuse_scales, Before -> Expected: one scale across transparent ops; q's 1/sqrt(d) folded.

Before: the hand-written attention, split, observed and calibrated under w8a8_minmax (the
second test also quantizes the qkv Linears' outputs). Expected: ``q * 1/sqrt(8)`` gone, its
factor the q observer's ``post_scale``; where a Linear's output observer reaches the head-wise
Q/K/V observer through reshape/permute only, the upstream observer gone (the downstream one
serves both). The output is bit-identical to the Before's (observers pass values through).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from fxquant.quant.points import QuantPoint
from fxquant.quant.spec import QuantSpec
from fxquant.runtime.fake_quant import ObserverModule
from tests.passes.graph_compare import (
    HEADS,
    TOKENS,
    AttentionBlock,
    act,
    apply,
    assert_same_structure,
    calib_batches,
    notes_of,
    outputs,
    stage,
    tokens,
    trace_expected,
    w8a8_minmax,
    weight,
)

HEAD_DIM = 8
U8 = QuantSpec(bits=8, signed=False, granularity="layer_wise", observer="minmax")
U8_HEADS = U8.with_(granularity="head_wise")


def _observer(group: str, spec: QuantSpec, post_scale: float = 1.0, **where) -> ObserverModule:
    module = ObserverModule(QuantPoint(group, "act", spec, "attn", **where), group)
    module.post_scale = post_scale
    return module


class ObservedAttention(nn.Module):
    """Expected: q, k, v, scores and attn@V observed; q's observer scales by 1/sqrt(d)."""

    def __init__(self, gm):
        super().__init__()
        self.attn = nn.Module()
        for name in ("qkv_q", "qkv_k", "qkv_v", "proj"):
            setattr(self.attn, name, copy.deepcopy(gm.get_submodule(f"attn.{name}")))
        heads = dict(axis=1, num_groups=HEADS)
        self.fxq_permute_1 = _observer("attn_q_out", U8_HEADS, HEAD_DIM**-0.5, **heads)
        self.fxq_permute_2 = _observer("attn_k_out", U8_HEADS, **heads)
        self.fxq_matmul = _observer("attn_kv_out", U8_HEADS, **heads)
        self.fxq_permute_3 = _observer("attn_v_input", U8_HEADS, **heads)
        self.fxq_matmul_1 = _observer("attn_v_out", U8)

    def forward(self, x):
        a = self.attn
        q = self.fxq_permute_1(a.qkv_q(x).reshape(-1, TOKENS, HEADS, HEAD_DIM).permute(0, 2, 1, 3))
        k = self.fxq_permute_2(a.qkv_k(x).reshape(-1, TOKENS, HEADS, HEAD_DIM).permute(0, 2, 1, 3))
        scores = self.fxq_matmul(q @ k.transpose(-2, -1))
        v = self.fxq_permute_3(a.qkv_v(x).reshape(-1, TOKENS, HEADS, HEAD_DIM).permute(0, 2, 1, 3))
        out = self.fxq_matmul_1(scores.softmax(dim=-1) @ v)
        return a.proj(out.transpose(1, 2).reshape(-1, TOKENS, HEADS * HEAD_DIM))


def _staged(config):
    model, x = AttentionBlock(), tokens(dim=16)
    return stage(model, config, (x,), before="fuse_scales", calib_data=calib_batches(dim=16)), x


def test_the_query_scale_folds_into_the_q_observer():
    staged, x = _staged(w8a8_minmax())
    before = outputs(staged.gm, (x,))
    gm = apply(staged, "fuse_scales")

    assert_same_structure(gm, trace_expected(ObservedAttention(gm)))
    assert gm.fxq_permute_1.post_scale == HEAD_DIM**-0.5
    assert notes_of(staged, "fuse_scales") == ["mul (x 0.353553) folded into the scale of fxq_permute_1 (attn_q_out)"]
    torch.testing.assert_close(outputs(gm, (x,)), before, rtol=0, atol=0)


def test_a_linear_output_point_before_a_head_point_is_dropped():
    config = w8a8_minmax(attn_qkv={"weight": weight(), "output": act()})
    staged, x = _staged(config)
    assert len([n for n in staged.gm.graph.nodes if n.op == "call_module" and n.target.startswith("fxq_")]) == 8
    before = outputs(staged.gm, (x,))
    gm = apply(staged, "fuse_scales")

    assert_same_structure(gm, trace_expected(ObservedAttention(gm)))  # the same graph as without those points
    shared = [n for n in notes_of(staged, "fuse_scales") if "shares the scale" in n]
    assert len(shared) == 3 and all("attn_qkv.output" in n for n in shared)
    torch.testing.assert_close(outputs(gm, (x,)), before, rtol=0, atol=0)
