"""smooth, Before -> Expected: SmoothQuant's per-channel factors folded into the weights.

Before: the hand-written block ``norm1 -> attention`` (qkv split), annotated under
w8a8_minmax with ``smooth_alpha: 0.5``. Expected: the same graph; with ``s_c = sqrt(a_c / w_c)``
(``a_c`` the calibration data's largest |value| in channel c of the Linear input, ``w_c`` the
largest |weight| in column c of the Linears reading it), computed here from the float module:

* norm1 -> Q, K, V: norm1's gamma and beta divided by s, the Q/K/V weight columns times s;
* V -> proj (attn@V is linear in V): V's weight rows and bias divided by s', proj's columns
  times s'.

The output equals the Before's up to float32 rounding.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tests.passes.graph_compare import (
    HEADS,
    TOKENS,
    AttentionBlock,
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

HEAD_DIM, WIDTH = 8, 16
FLOAT32_EPS = torch.finfo(torch.float32).eps


def _absmax_of_input(module: nn.Module, watched: nn.Module, batches: list, output: bool) -> torch.Tensor:
    seen = []
    hook = (
        watched.register_forward_hook(lambda m, args, out: seen.append(out))
        if output
        else watched.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    )
    with torch.no_grad():
        for batch in batches:
            module(batch)
    hook.remove()
    return torch.stack([t.abs().reshape(-1, t.shape[-1]).amax(dim=0) for t in seen]).amax(dim=0)


def _factors(act_absmax: torch.Tensor, *weights: torch.Tensor) -> torch.Tensor:
    w_absmax = torch.stack([w.abs().amax(dim=0) for w in weights]).amax(dim=0)
    return (act_absmax.sqrt() / w_absmax.sqrt()).clamp(1e-5, 1e5)


class SmoothedBlock(nn.Module):
    """Expected: the split block with both smoothings folded into its parameters."""

    def __init__(self, model: AttentionBlock, calib: list):
        super().__init__()
        attn = model.attn
        w = attn.qkv.weight.detach()
        wq, wk, wv = w[:WIDTH], w[WIDTH : 2 * WIDTH], w[2 * WIDTH :]
        s = _factors(_absmax_of_input(model, model.norm1, calib, output=True), wq, wk, wv)
        s_v = _factors(_absmax_of_input(model, attn.proj, calib, output=False), attn.proj.weight.detach())
        self.norm1 = copy.deepcopy(model.norm1)
        self.attn = nn.Module()
        self.attn.proj = copy.deepcopy(attn.proj)
        with torch.no_grad():
            self.norm1.weight.div_(s)
            self.norm1.bias.div_(s)
            for index, letter in enumerate("qkv"):
                linear = nn.Linear(WIDTH, WIDTH)
                linear.weight.copy_(w[index * WIDTH : (index + 1) * WIDTH] * s[None, :])
                linear.bias.copy_(attn.qkv.bias[index * WIDTH : (index + 1) * WIDTH])
                setattr(self.attn, f"qkv_{letter}", linear)
            self.attn.qkv_v.weight.div_(s_v[:, None])
            self.attn.qkv_v.bias.div_(s_v)
            self.attn.proj.weight.mul_(s_v[None, :])

    def forward(self, x):
        a, x = self.attn, self.norm1(x)
        q = a.qkv_q(x).reshape(-1, TOKENS, HEADS, HEAD_DIM).permute(0, 2, 1, 3)
        k = a.qkv_k(x).reshape(-1, TOKENS, HEADS, HEAD_DIM).permute(0, 2, 1, 3)
        v = a.qkv_v(x).reshape(-1, TOKENS, HEADS, HEAD_DIM).permute(0, 2, 1, 3)
        out = ((q * HEAD_DIM**-0.5) @ k.transpose(-2, -1)).softmax(dim=-1) @ v
        return a.proj(out.transpose(1, 2).reshape(-1, TOKENS, HEADS * HEAD_DIM))


def test_norm_and_v_outliers_fold_into_the_next_linears():
    model, x, calib = AttentionBlock(norm=True), tokens(dim=16), calib_batches(dim=16)
    with torch.no_grad():  # two outlier channels in the LayerNorm output, as in real ViTs
        model.norm1.weight[3] = 20.0
        model.norm1.bias[11] = -8.0
    staged = stage(model, w8a8_minmax(smooth_alpha=0.5), (x,), before="smooth", calib_data=calib)
    before = outputs(staged.gm, (x,))
    gm = apply(staged, "smooth")
    expected = SmoothedBlock(model, calib)

    assert_same_structure(gm, trace_expected(expected))
    params = dict(gm.named_parameters())
    for name, value in expected.named_parameters():
        torch.testing.assert_close(params[name], value, rtol=1e-6, atol=1e-7, msg=name)
    assert float(gm.norm1.weight.detach()[3]) < 20.0 / 2  # the outlier channel was flattened
    assert len(notes_of(staged, "smooth")) == 2  # norm1 -> q, k, v and v -> proj
    got = outputs(gm, (x,))
    torch.testing.assert_close(got, outputs(expected, (x,)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, before, rtol=0, atol=256 * FLOAT32_EPS * float(before.abs().max()))


class CrossCovarianceAttention(nn.Module):
    """XCiT's attention: softmax over channels, ``v`` is (B, H, D, N) and attn@V mixes a head's
    channels, so V's output channels are not attn@V's last axis one for one. ``fused``: timm's
    one qkv Linear (which split_qkv leaves whole: its permute is (2, 0, 3, 4, 1)); else separate
    q, k, v Linears of the same width as the proj input, where only the shapes tell."""

    def __init__(self, fused: bool):
        super().__init__()
        torch.manual_seed(0)
        self.fused = fused
        if fused:
            self.qkv = nn.Linear(WIDTH, 3 * WIDTH)
        else:
            self.q, self.k, self.v = (nn.Linear(WIDTH, WIDTH) for _ in range(3))
        self.proj = nn.Linear(WIDTH, WIDTH)

    def forward(self, x):
        if self.fused:
            q, k, v = self.qkv(x).reshape(-1, TOKENS, 3, HEADS, HEAD_DIM).permute(2, 0, 3, 4, 1).unbind(0)
        else:
            q, k, v = (
                lin(x).reshape(-1, TOKENS, HEADS, HEAD_DIM).permute(0, 2, 3, 1) for lin in (self.q, self.k, self.v)
            )
        attn = (q @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attn @ v).permute(0, 3, 1, 2).reshape(-1, TOKENS, WIDTH))


class CrossCovarianceBlock(nn.Module):
    def __init__(self, fused: bool):
        super().__init__()
        self.attn = CrossCovarianceAttention(fused)
        self.eval()

    def forward(self, x):
        return self.attn(x)


@pytest.mark.parametrize("fused", [True, False], ids=["fused_qkv", "separate_v"])
def test_cross_covariance_attention_is_left_unsmoothed(fused):
    """Expected: the Before itself (no pair to fold), with a note saying why; before the fix
    the fused case crashed with ``size of tensor a (48) must match ... (16)``."""
    model, x, calib = CrossCovarianceBlock(fused), tokens(dim=16), calib_batches(dim=16)
    staged = stage(model, w8a8_minmax(smooth_alpha=0.5), (x,), before="smooth", calib_data=calib)
    before = outputs(staged.gm, (x,))
    gm = apply(staged, "smooth")

    assert_same_structure(gm, trace_expected(model))
    params = dict(gm.named_parameters())
    for name, value in model.named_parameters():
        assert params[name].equal(value), name
    notes = notes_of(staged, "smooth")
    assert len(notes) == 1 and "not smoothed" in notes[0], notes
    assert ("outputs" in notes[0]) if fused else ("has shape" in notes[0])
    torch.testing.assert_close(outputs(gm, (x,)), before, rtol=0, atol=0)
