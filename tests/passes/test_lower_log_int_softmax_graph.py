"""lower_log_int_softmax, Before -> Expected: softmax + its log2 point become one LIS node.

Before: the hand-written attention lowered to fake quant with w8a8_minmax plus an 8-bit log2
``intSoft`` point (FQ-ViT's). Expected: the scores' FakeQuantize feeds a ``LogIntSoftmax``
(the scores' per-head scale, 8 bits, dim -1) at the log2 point's path; the float softmax and
the log2 FakeQuantize are gone. Without a quantized scores point the softmax and its log2
quantizer stay, and the report's notes say why.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from fxquant.quant.quantizers import qsnr_db
from fxquant.runtime.log_int_softmax import LogIntSoftmax
from tests.passes.graph_compare import (
    HEADS,
    TOKENS,
    AttentionBlock,
    apply,
    assert_same_structure,
    calib_batches,
    copy_submodules,
    notes_of,
    outputs,
    stage,
    tokens,
    trace_expected,
    w8a8_minmax,
)

HEAD_DIM = 8
LOG2_8BIT = {"bits": 8, "signed": False, "quantization_method": "log2", "observer_type": "MinmaxObserver"}
KEPT = ("attn.qkv_q", "attn.qkv_k", "attn.qkv_v", "attn.proj", "fxq_permute_1", "fxq_permute_2", "fxq_permute_3")


class LisAttention(nn.Module):
    """Expected: the fake-quant attention with ``fxq_softmax`` a LogIntSoftmax on the scores."""

    def __init__(self, fake):
        super().__init__()
        copy_submodules(self, fake, *KEPT, "fxq_matmul", "fxq_matmul_1")
        scores = fake.fxq_matmul
        scale = scores.qparams.broadcast_scale(4) * scores.post_scale  # (1, heads, 1, 1)
        self.fxq_softmax = LogIntSoftmax(scale, 8, -1, point=fake.fxq_softmax.point)

    def forward(self, x):
        m = self
        q = m.fxq_permute_1(m.attn.qkv_q(x).reshape(-1, TOKENS, HEADS, HEAD_DIM).permute(0, 2, 1, 3))
        k = m.fxq_permute_2(m.attn.qkv_k(x).reshape(-1, TOKENS, HEADS, HEAD_DIM).permute(0, 2, 1, 3))
        probs = m.fxq_softmax(m.fxq_matmul(q @ k.transpose(-2, -1)))
        v = m.fxq_permute_3(m.attn.qkv_v(x).reshape(-1, TOKENS, HEADS, HEAD_DIM).permute(0, 2, 1, 3))
        out = m.fxq_matmul_1(probs @ v)
        return m.attn.proj(out.transpose(1, 2).reshape(-1, TOKENS, HEADS * HEAD_DIM))


def _staged(config):
    x = tokens(dim=16)
    return stage(AttentionBlock(), config, (x,), before="lower_log_int_softmax", calib_data=calib_batches(dim=16)), x


def test_softmax_and_its_log2_point_become_log_int_softmax():
    staged, x = _staged(w8a8_minmax(intSoft=LOG2_8BIT))
    fake = copy.deepcopy(staged.gm)
    gm = apply(staged, "lower_log_int_softmax")
    expected = LisAttention(fake)

    assert_same_structure(gm, trace_expected(expected))
    got = outputs(gm, (x,))
    torch.testing.assert_close(got, outputs(expected, (x,)), rtol=0, atol=0)
    # integer exp, log2 codes from the integer scores (on the 2**-m grid, renormalized per row)
    # instead of the float softmax's log2 rounding: different rounding, as accurate against float
    reference = outputs(AttentionBlock(), (x,))
    assert qsnr_db(reference, got) > qsnr_db(reference, outputs(fake, (x,))) - 2.0


def test_unquantized_scores_keep_the_float_softmax_and_say_why():
    config = w8a8_minmax(intSoft=LOG2_8BIT)
    del config["attn_kv_out"]
    staged, x = _staged(config)
    before = copy.deepcopy(staged.gm)
    gm = apply(staged, "lower_log_int_softmax")

    assert_same_structure(gm, before)
    assert not any(isinstance(m, LogIntSoftmax) for m in gm.modules())
    assert any("fxq_softmax (intSoft)" in n and "quantize attn_kv_out" in n for n in notes_of(staged))
    torch.testing.assert_close(outputs(gm, (x,)), outputs(before, (x,)), rtol=0, atol=0)
