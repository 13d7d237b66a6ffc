"""linear_modules, Before -> Expected: ``F.linear`` on a Linear's own weight with a bias built
at run time becomes a call of an ``nn.Linear`` holding that weight and the folded bias.

Before: BEiT/EVA/Swin-V2's qkv, ``F.linear(x, qkv.weight, cat(q_bias, k_bias, v_bias))`` with
``k_bias`` a zero buffer (no k bias) and ``qkv`` itself bias-free. Expected: the ordinary timm
qkv, ``self.qkv(x)`` with ``qkv = nn.Linear(16, 48)`` whose bias is the concatenation; the
``cat`` and the bias parameters gone from the graph; the output bit-identical. Then annotate
and split_qkv treat it as any fused qkv: three Linears, each with its weight point.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fxquant.ir.meta import WEIGHT
from tests.passes.graph_compare import (
    TOKENS,
    apply,
    assert_same_structure,
    calib_batches,
    notes_of,
    outputs,
    stage,
    tokens,
    trace_expected,
    w8a8_minmax,
)

WIDTH, HEADS, HEAD_DIM = 16, 2, 8


def _attention(x, q, k, v, proj):
    out = ((q * HEAD_DIM**-0.5) @ k.transpose(-2, -1)).softmax(dim=-1) @ v
    return proj(out.transpose(1, 2).reshape(-1, TOKENS, WIDTH))


def _heads(qkv):
    return qkv.reshape(-1, TOKENS, 3, HEADS, HEAD_DIM).permute(2, 0, 3, 1, 4).unbind(0)


class QvBiasAttention(nn.Module):
    """timm's BEiT attention: q and v biases, no k bias (a zero buffer stands in for it)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.qkv = nn.Linear(WIDTH, 3 * WIDTH, bias=False)
        self.q_bias = nn.Parameter(torch.randn(WIDTH))
        self.register_buffer("k_bias", torch.zeros(WIDTH), persistent=False)
        self.v_bias = nn.Parameter(torch.randn(WIDTH))
        self.proj = nn.Linear(WIDTH, WIDTH)

    def forward(self, x):
        bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
        q, k, v = _heads(F.linear(x, weight=self.qkv.weight, bias=bias))
        return _attention(x, q, k, v, self.proj)


class Before(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = QvBiasAttention()
        self.eval()

    def forward(self, x):
        return self.attn(x)


class ExpectedAttention(nn.Module):
    def __init__(self, attn: QvBiasAttention):
        super().__init__()
        self.qkv = nn.Linear(WIDTH, 3 * WIDTH)
        self.proj = attn.proj
        with torch.no_grad():
            self.qkv.weight.copy_(attn.qkv.weight)
            self.qkv.bias.copy_(torch.cat((attn.q_bias, attn.k_bias, attn.v_bias)))

    def forward(self, x):
        q, k, v = _heads(self.qkv(x))
        return _attention(x, q, k, v, self.proj)


class Expected(nn.Module):
    def __init__(self, before: Before):
        super().__init__()
        self.attn = ExpectedAttention(before.attn)

    def forward(self, x):
        return self.attn(x)


class InputDependentWeight(nn.Module):
    """A hypernetwork-style F.linear: its weight is computed from the input, nothing to fold."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(WIDTH, WIDTH))

    def forward(self, x):
        return F.linear(x, self.weight * x.mean())


def test_qkv_with_a_run_time_bias_becomes_a_linear():
    model, x = Before(), tokens(dim=WIDTH)
    config = w8a8_minmax(attn_proj={"weight": {"bits": 8}}, attn_qkv={"weight": {"bits": 8}})
    staged = stage(model, config, (x,), before="linear_modules", calib_data=calib_batches(dim=WIDTH))
    before = outputs(staged.gm, (x,))
    gm = apply(staged, "linear_modules")
    expected = Expected(model)

    assert_same_structure(gm, trace_expected(expected))
    assert gm.get_submodule("attn.qkv").bias.equal(expected.attn.qkv.bias)
    assert gm.get_submodule("attn.qkv").bias[WIDTH : 2 * WIDTH].eq(0).all()  # no k bias
    assert any("folded" in note and "attn.qkv" in note for note in notes_of(staged, "linear_modules"))
    torch.testing.assert_close(outputs(gm, (x,)), before, rtol=0, atol=0)

    gm = apply(staged, "annotate")
    gm = apply(staged, "split_qkv")  # now an ordinary fused qkv: three Linears with weight points
    split = {str(n.target): n.meta.get(WEIGHT) for n in gm.graph.nodes if n.op == "call_module"}
    assert all(split[f"attn.qkv_{letter}"].group == "attn_qkv" for letter in "qkv")


def test_a_weight_computed_from_the_input_stays_functional():
    model, x = InputDependentWeight().eval(), tokens(dim=WIDTH)
    staged = stage(model, w8a8_minmax(), (x,), before="linear_modules", calib_data=calib_batches(dim=WIDTH))
    gm = apply(staged, "linear_modules")

    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == []
    assert any(n.op == "call_function" and n.target in (F.linear, torch._C._nn.linear) for n in gm.graph.nodes)
    assert any("stays functional" in note for note in notes_of(staged, "linear_modules"))
