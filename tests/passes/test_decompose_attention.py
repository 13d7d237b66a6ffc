"""decompose_attention: F.scaled_dot_product_attention -> q*s @ kT, (+mask), softmax, @v.

Before: a graph traced with ``keep_fused_attention=True`` (timm's SDPA path) or a hand-made
module calling SDPA. Expected: no SDPA node; the scale multiply, q@kT, the mask, softmax and
probs@v as separate nodes; the same output up to float32 rounding (SDPA sums in another
order, so bit-identity is not expected; see REORDER_ULPS in conftest).
"""

from __future__ import annotations

import copy
import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fxquant.errors import NodeError, PassError
from fxquant.ir.meta import MODULE, ORIGIN
from fxquant.ir.patterns import find_attention
from fxquant.passes import DecomposeAttention

SDPA_TARGETS = {F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention}


def sdpa_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in SDPA_TARGETS]


def fused_model(tiny):
    """The user's model with timm's fused attention on (Swin's is off by default in timm)."""
    model = copy.deepcopy(tiny.model)
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = True
    return model


class SdpaAttention(nn.Module):
    """A hand-made attention block that calls SDPA with an optional mask, scale, causality."""

    def __init__(self, dim=16, heads=2, tokens=5, mask=None, scale=None, is_causal=False):
        super().__init__()
        self.heads, self.scale, self.is_causal = heads, scale, is_causal
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        if mask is None:
            self.mask = None
        else:
            self.register_buffer("mask", mask)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, is_causal=self.is_causal, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


def hand_made(**kwargs):
    torch.manual_seed(0)
    model = SdpaAttention(**kwargs).eval()
    tokens = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))
    return model, (tokens,)


def test_fp32_output_unchanged_up_to_rounding(tiny, trace, make_ctx, run, fp32):
    model = fused_model(tiny)
    gm = trace(model, keep_fused_attention=True)
    assert len(sdpa_nodes(gm)) == tiny.depth
    ctx = make_ctx(gm, {}, tiny.inputs())
    expected = fp32.forward(model, ctx.diff_inputs)  # the user's model, fused attention

    gm = run(gm, ctx, DecomposeAttention())

    assert sdpa_nodes(gm) == []
    fp32.assert_close(fp32.forward(gm, ctx.diff_inputs), expected)
    assert ctx.report.passes[-1].output_qsnr_db > 100.0  # float32 rounding, no quantization


def test_attention_becomes_explicit_nodes(vit, trace, make_ctx, run):
    gm = trace(vit.model, keep_fused_attention=True)
    sdpa_names = [n.name for n in sdpa_nodes(gm)]
    ctx = make_ctx(gm, {}, vit.inputs())

    gm = run(gm, ctx, DecomposeAttention())

    matches = find_attention(gm)
    assert [m.module for m in matches] == list(vit.heads)
    for match, sdpa_name in zip(matches, sdpa_names):
        # q * s: the scale multiplies q, as in timm's own unfused code
        assert match.scale_mul is not None and match.scale_mul.target is operator.mul
        assert match.scale == vit.head_dim**-0.5
        # q @ kT with kT = k.transpose(-2, -1)
        assert match.scores.target is operator.matmul
        k_t = match.scores.args[1]
        assert (k_t.op, k_t.target, k_t.args[1:]) == ("call_method", "transpose", (-2, -1))
        assert match.softmax.target == "softmax" and match.softmax.kwargs == {"dim": -1}
        assert match.softmax.args[0] is match.scores  # no mask in ViT
        assert match.out.target is operator.matmul and match.out.args[0] is match.softmax
        # probs @ v computes what SDPA did: the diff pairs it with the SDPA node
        assert match.out.meta[ORIGIN] == sdpa_name
        for node in (match.scale_mul, k_t, match.scores, match.softmax, match.out):
            assert node.meta[MODULE] == match.module


def test_graph_without_sdpa_is_left_alone(vit, trace, make_ctx, run):
    gm = trace(vit.model)  # tracing already switches timm's fused attention off
    code = gm.code
    ctx = make_ctx(gm, {}, vit.inputs())

    gm = run(gm, ctx, DecomposeAttention())

    assert gm.code == code
    assert ctx.report.passes[-1].output_qsnr_db == float("inf")


def test_float_mask_is_added_to_the_scores(trace, make_ctx, run, fp32):
    mask = torch.randn(5, 5, generator=torch.Generator().manual_seed(2))
    model, inputs = hand_made(mask=mask)
    gm = trace(model)
    assert len(sdpa_nodes(gm)) == 1
    ctx = make_ctx(gm, {}, inputs)

    gm = run(gm, ctx, DecomposeAttention())

    assert sdpa_nodes(gm) == []
    (match,) = find_attention(gm)
    assert match.scale == 8**-0.5  # 16 channels / 2 heads
    add = match.softmax.args[0]
    assert add.target is operator.add and add.args[0] is match.scores
    assert add.args[1].op == "get_attr" and add.args[1].target == "mask"
    fp32.assert_close(fp32.forward(gm, inputs), fp32.forward(model, inputs))


def test_bool_mask_and_explicit_scale(trace, make_ctx, run, fp32):
    keep = torch.rand(5, 5, generator=torch.Generator().manual_seed(3)) > 0.4
    keep[:, 0] = True  # every query attends to something: no all -inf softmax row
    assert not keep.all()
    model, inputs = hand_made(mask=keep, scale=0.3)
    gm = trace(model)
    ctx = make_ctx(gm, {}, inputs)

    gm = run(gm, ctx, DecomposeAttention())

    (match,) = find_attention(gm)
    assert match.scale == 0.3  # the explicit scale=, not 1/sqrt(d)
    fill = match.softmax.args[0]
    assert (fill.op, fill.target) == ("call_method", "masked_fill")
    assert fill.args[0] is match.scores and fill.args[2] == float("-inf")
    inverted = fill.args[1]  # SDPA's True means "attend": fill where the mask is False
    assert (inverted.target, inverted.args[0].target) == ("logical_not", "mask")
    fp32.assert_close(fp32.forward(gm, inputs), fp32.forward(model, inputs))


def test_causal_attention_is_refused_by_name(trace, make_ctx, run):
    model, inputs = hand_made(is_causal=True)
    gm = trace(model)
    (sdpa,) = sdpa_nodes(gm)

    with pytest.raises(PassError, match=r"pass 'decompose_attention' failed.*is_causal=True") as info:
        run(gm, make_ctx(gm, {}, inputs), DecomposeAttention())
    assert info.value.pass_name == "decompose_attention"
    assert info.value.node == sdpa.name

    gm = trace(model)  # the pass itself raises a NodeError; the manager adds the pass
    with pytest.raises(NodeError, match="causal") as info:
        DecomposeAttention().run(gm, make_ctx(gm, {}, inputs))
    assert info.value.node == sdpa.name
