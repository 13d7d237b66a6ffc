"""decompose_attention, Before -> Expected: SDPA becomes q*s @ kT, softmax, @v.

Before: the hand-written timm-style attention calling ``F.scaled_dot_product_attention``.
Expected: timm's own unfused code (the scale 1/sqrt(head_dim) applied to q, ``softmax(dim=-1)``
as a method), with a float mask added to the scores and a boolean one filled with -inf; the
output equal to SDPA's up to float32 rounding of the reordered sums.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fxquant.errors import PassError
from tests.passes.graph_compare import (
    HEADS,
    TOKENS,
    AttentionBlock,
    apply,
    assert_same_structure,
    outputs,
    stage,
    tokens,
    trace_expected,
    w8a8_minmax,
)

HEAD_DIM = 8
FLOAT32_EPS = torch.finfo(torch.float32).eps


class ExplicitAttention(nn.Module):
    """Expected: the attention of ``AttentionBlock`` written out (timm's ``fused_attn=False``)."""

    def __init__(self, attn: nn.Module):
        super().__init__()
        self.qkv, self.proj = copy.deepcopy(attn.qkv), copy.deepcopy(attn.proj)

    def forward(self, x):
        qkv = self.qkv(x).reshape(-1, TOKENS, 3, HEADS, HEAD_DIM).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q * HEAD_DIM**-0.5) @ k.transpose(-2, -1)
        x = attn.softmax(dim=-1) @ v
        return self.proj(x.transpose(1, 2).reshape(-1, TOKENS, HEADS * HEAD_DIM))


class ExpectedBlock(nn.Module):
    def __init__(self, block: AttentionBlock):
        super().__init__()
        self.attn = ExplicitAttention(block.attn)

    def forward(self, x):
        return self.attn(x)


def _close(actual, expected):
    """Equal up to float32 rounding of reordered sums (64 ulps of the output's magnitude)."""
    torch.testing.assert_close(actual, expected, rtol=0, atol=64 * FLOAT32_EPS * float(expected.abs().max()))


def test_sdpa_becomes_explicit_attention():
    model, x = AttentionBlock(), tokens(dim=16)
    staged = stage(model, w8a8_minmax(), (x,), before="decompose_attention")
    gm = apply(staged, "decompose_attention")
    expected = ExpectedBlock(model)

    assert_same_structure(gm, trace_expected(expected))
    assert not [n for n in gm.graph.nodes if n.target is F.scaled_dot_product_attention]
    torch.testing.assert_close(outputs(gm, (x,)), outputs(expected, (x,)), rtol=0, atol=0)
    _close(outputs(gm, (x,)), outputs(model, (x,)))


class MaskedAttention(nn.Module):
    """SDPA with an explicit scale and a mask buffer (float: added; bool: True = keep)."""

    def __init__(self, mask: torch.Tensor, scale: float):
        super().__init__()
        self.register_buffer("mask", mask)
        self.scale = scale

    def forward(self, q):
        return F.scaled_dot_product_attention(q, q * 2.0, q, attn_mask=self.mask, scale=self.scale)


class ExpectedMasked(nn.Module):
    def __init__(self, mask: torch.Tensor, scale: float):
        super().__init__()
        self.register_buffer("mask", mask)
        self.scale, self.boolean = scale, mask.dtype == torch.bool

    def forward(self, q):
        k = q * 2.0
        scores = (q * self.scale) @ k.transpose(-2, -1)
        if self.boolean:
            scores = scores.masked_fill(self.mask.logical_not(), float("-inf"))
        else:
            scores = scores + self.mask
        return scores.softmax(dim=-1) @ q


@pytest.mark.parametrize("kind", ["float", "bool"])
def test_a_mask_and_an_explicit_scale_are_kept(kind):
    generator = torch.Generator().manual_seed(3)
    if kind == "float":
        mask = torch.randn(TOKENS, TOKENS, generator=generator)
    else:
        mask = torch.rand(TOKENS, TOKENS, generator=generator) > 0.3
        mask.fill_diagonal_(True)  # every row keeps one score: no all -inf row
    q = torch.randn(2, HEADS, TOKENS, HEAD_DIM, generator=generator)
    model = MaskedAttention(mask, 0.25)
    staged = stage(model, w8a8_minmax(), (q,), before="decompose_attention")
    gm = apply(staged, "decompose_attention")
    expected = ExpectedMasked(mask, 0.25)

    assert_same_structure(gm, trace_expected(expected))
    torch.testing.assert_close(outputs(gm, (q,)), outputs(expected, (q,)), rtol=0, atol=0)
    _close(outputs(gm, (q,)), outputs(model, (q,)))


class CausalAttention(nn.Module):
    def forward(self, q):
        return F.scaled_dot_product_attention(q, q, q, is_causal=True)


def test_causal_attention_is_refused_naming_the_node():
    q = torch.randn(1, HEADS, TOKENS, HEAD_DIM)
    staged = stage(CausalAttention(), w8a8_minmax(), (q,), before="decompose_attention")
    with pytest.raises(PassError, match=r"decompose_attention.*scaled_dot_product_attention.*is_causal"):
        apply(staged, "decompose_attention")
