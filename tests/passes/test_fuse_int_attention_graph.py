"""fuse_int_attention, Before -> Expected: the attention core becomes one IntAttention kernel.

Before: the hand-written block ``norm1 -> attention`` lowered to the oneDNN integer graph
under w8a8_minmax, up to ``use_onednn_kernels``:

    IntMatmul(q codes, kT codes) -> score codes -> DequantizeCodes (one multiply-add)
      -> softmax(dim=-1) -> matmul(., DequantizeCodes(v codes))

Expected: ``IntAttention(q codes, kT codes, v codes)`` at ``fxq_matmul_1_attention`` with the
per-head constants of those modules (q/k zero points in the uint8 domain, the score
requantization, the score and V dequantization); everything else as it was. The output
equals that Expected's exactly and the unfused graph's up to float32 rounding (the softmax and
attn@V round differently in the kernel). Skipped where the C++ kernel cannot be built.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fxquant.quant.quantizers import qsnr_db
from fxquant.runtime.int_attention import CONSTANTS, IntAttention, kernel_error, load_kernel
from fxquant.runtime.onednn import onednn_available
from tests.passes.graph_compare import (
    HEADS,
    TOKENS,
    AttentionBlock,
    apply,
    assert_same_structure,
    calib_batches,
    copy_submodules,
    nonfinite_guard,
    notes_of,
    outputs,
    stage,
    tokens,
    trace_expected,
    w8a8_minmax,
)

pytestmark = pytest.mark.skipif(not onednn_available(), reason="the oneDNN integer graph needs an x86 torch build")

HEAD_DIM = 8
KEPT = ("norm1", "fxq_norm1_codes", "attn.qkv_q", "attn.qkv_k", "attn.qkv_v", "fxq_matmul_1_codes", "attn.proj")
UINT8 = 128


def _per_head(t: torch.Tensor) -> torch.Tensor:
    return t.detach().float().reshape(-1).expand(HEADS)


def _head_constants(unfused) -> torch.Tensor:
    scores, dq, vd = unfused.fxq_int_matmul, unfused.fxq_matmul_dequant, unfused.fxq_permute_3_dequant
    assert scores.a_uint8 and scores.b_uint8  # q and k codes arrive as uint8 from oneDNN's Linears
    columns = {
        "q_zero_point": scores.a_zero_point + UINT8,
        "k_zero_point": scores.b_zero_point + UINT8,
        "score_multiplier": scores.float_multiplier,
        "score_zero_point": scores.float_zero_point,
        "score_scale": dq.affine_scale,
        "score_bias": dq.affine_bias,
        "v_scale": vd.scale,
        "v_zero_point": vd.zero_point,
    }
    return torch.stack([_per_head(columns[name]) for name in CONSTANTS], dim=1)


class FusedBlock(nn.Module):
    def __init__(self, unfused):
        super().__init__()
        copy_submodules(self, unfused, *KEPT)
        scores = unfused.fxq_int_matmul
        self.fxq_matmul_1_attention = IntAttention(_head_constants(unfused), scores.qmin, scores.qmax, "attn_scores")

    def forward(self, x):
        a, normed = self.attn, self.norm1(x)
        codes = self.fxq_norm1_codes(normed)
        q = a.qkv_q(codes).reshape(-1, TOKENS, HEADS, HEAD_DIM).permute(0, 2, 1, 3)
        k = a.qkv_k(codes).reshape(-1, TOKENS, HEADS, HEAD_DIM).permute(0, 2, 1, 3)
        v = a.qkv_v(codes).reshape(-1, TOKENS, HEADS, HEAD_DIM).permute(0, 2, 1, 3)
        out = self.fxq_matmul_1_codes(self.fxq_matmul_1_attention(q, k.transpose(-2, -1), v))
        return nonfinite_guard(a.proj(out.transpose(1, 2).reshape(-1, TOKENS, HEADS * HEAD_DIM)), normed)


def test_attention_core_becomes_one_kernel():
    if not load_kernel():
        pytest.skip(f"the fused attention kernel could not be built here: {kernel_error()}")
    model, x = AttentionBlock(norm=True), tokens(dim=16)
    staged = stage(
        model, w8a8_minmax(), (x,), before="fuse_int_attention", calib_data=calib_batches(dim=16), int_kernels="onednn"
    )
    unfused = copy.deepcopy(staged.gm)
    gm = apply(staged, "fuse_int_attention", "onednn")
    expected = FusedBlock(unfused)

    assert_same_structure(gm, trace_expected(expected))
    got = outputs(gm, (x,))
    torch.testing.assert_close(got, outputs(expected, (x,)), rtol=0, atol=0)
    assert qsnr_db(outputs(unfused, (x,)), got) > 40.0
    assert any(n.startswith("fuse_int_attention: 1 attention cores") for n in notes_of(staged, "fuse_int_attention"))
