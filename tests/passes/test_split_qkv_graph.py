"""split_qkv, Before -> Expected: the fused qkv Linear becomes three Linears Q, K and V.

Before: the hand-written timm-style attention, decomposed and annotated. Expected: ``qkv_q``,
``qkv_k``, ``qkv_v`` (16 -> 16 each, the fused weight's row blocks) under ``attn``, each
followed by ``reshape(B, N, heads, head_dim).permute(0, 2, 1, 3)``; the unbind gone; each
matrix its own weight point (a group_wise spec on the fused weight becomes one scale per
matrix); the output equal to the fused one up to float32 rounding.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from fxquant.ir.meta import POINT, ROLE, WEIGHT
from tests.passes.graph_compare import (
    HEADS,
    TOKENS,
    AttentionBlock,
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

HEAD_DIM, WIDTH = 8, 16
FLOAT32_EPS = torch.finfo(torch.float32).eps


def _rows(linear: nn.Linear, index: int) -> nn.Linear:
    part = nn.Linear(linear.in_features, WIDTH)
    with torch.no_grad():
        part.weight.copy_(linear.weight[index * WIDTH : (index + 1) * WIDTH])
        part.bias.copy_(linear.bias[index * WIDTH : (index + 1) * WIDTH])
    return part


class SplitAttention(nn.Module):
    def __init__(self, attn: nn.Module):
        super().__init__()
        self.qkv_q, self.qkv_k, self.qkv_v = (_rows(attn.qkv, i) for i in range(3))
        self.proj = copy.deepcopy(attn.proj)

    def forward(self, x):
        q = self.qkv_q(x).reshape(-1, TOKENS, HEADS, HEAD_DIM).permute(0, 2, 1, 3)
        k = self.qkv_k(x).reshape(-1, TOKENS, HEADS, HEAD_DIM).permute(0, 2, 1, 3)
        v = self.qkv_v(x).reshape(-1, TOKENS, HEADS, HEAD_DIM).permute(0, 2, 1, 3)
        attn = (q * HEAD_DIM**-0.5) @ k.transpose(-2, -1)
        x = attn.softmax(dim=-1) @ v
        return self.proj(x.transpose(1, 2).reshape(-1, TOKENS, HEADS * HEAD_DIM))


class ExpectedBlock(nn.Module):
    def __init__(self, block: AttentionBlock):
        super().__init__()
        self.attn = SplitAttention(block.attn)

    def forward(self, x):
        return self.attn(x)


def test_fused_qkv_becomes_three_linears():
    model, x = AttentionBlock(), tokens(dim=16)
    config = w8a8_minmax(attn_qkv={"weight": {**weight(), "calibration_mode": "group_wise"}})
    staged = stage(model, config, (x,), before="split_qkv", calib_data=calib_batches(dim=16))
    gm = apply(staged, "split_qkv")
    expected = ExpectedBlock(model)

    assert_same_structure(gm, trace_expected(expected))
    assert not hasattr(gm.attn, "qkv")  # the fused Linear is gone
    nodes = {n.name: n for n in gm.graph.nodes}
    for letter, role in zip("qkv", ("attn_q", "attn_k", "attn_v")):
        linear = nodes[f"attn_qkv_{letter}"]
        point = linear.meta[WEIGHT]  # group_wise over Q/K/V -> one scale for this matrix
        assert (point.group, point.spec.granularity, point.num_groups, point.module) == (
            "attn_qkv",
            "layer_wise",
            None,
            f"attn.qkv_{letter}",
        )
        heads_first = next(iter(next(iter(linear.users)).users))  # linear -> reshape -> permute
        assert heads_first.meta[ROLE] == role and POINT in heads_first.meta
    torch.testing.assert_close(outputs(gm, (x,)), outputs(expected, (x,)), rtol=0, atol=0)
    reference = outputs(model, (x,))
    atol = 64 * FLOAT32_EPS * float(reference.abs().max())  # a GEMM on a row block: rounding only
    torch.testing.assert_close(outputs(gm, (x,)), reference, rtol=0, atol=atol)
