"""Swin's window padding on integer codes: the integer graph's codes equal the fake-quant
graph's at every point (isolated comparison), up to the documented 1-LSB ties
(docs/integer-backend.md, "Equivalence with the fake-quant graph").

At img_size 64 with patch 4 and window 7 the 16x16 and 8x8 token grids are padded to 21x21
and 14x14 before the window partition, so every block pads its norm1 codes. The fake-quant
graph pads the float value with 0.0, which quantizes to the zero point; the integer graph
pads codes, so its fill must be the zero point's code. The presets' activations are
unsigned and asymmetric (stored shifted by -128, so a zero point of 128 is the only one
whose code is 0); a signed asymmetric override covers the unshifted case.

A pad between an integer op and the point it requantizes to (``PaddedHeadAttention``:
q and k padded along the head dim, scores unchanged) must stop the fused requantization
(``moves_elements(..., allow_pad=False)``): the requantized codes would be padded with
code 0, not the zero point's code.
"""

from __future__ import annotations

import pytest
import timm
import torch
import torch.fx as fx
import torch.nn.functional as F
from timm.models.swin_transformer import WindowAttention

import fxquant
from fxquant.analysis.code_agreement import code_agreement
from fxquant.ir.meta import CODES_OF
from fxquant.ir.patterns import is_scale_transparent, is_zero_pad, rearranges_elements
from fxquant.lowering.code_chains import moves_elements
from fxquant.runtime.onednn import onednn_available
from tests.tiny import images

TIE_SHARE = 2e-4  # 1-LSB ties: at most this share of a graph's codes (measured: 3-5 in about 1.1 million)
ACT = {"bits": 8, "signed": False, "calibration_mode": "layer_wise", "observer_type": "MinmaxObserver"}
SIGNED_ASYM = {**ACT, "signed": True, "symmetric": False}


class PaddedHeadAttention(WindowAttention):
    """Swin's window attention with q and k zero-padded by 4 along the head dim: the
    scores are unchanged, and the q/k points sit after the pads."""

    def forward(self, x: torch.Tensor, mask=None) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = F.pad(q, (0, 4)), F.pad(k, (0, 4))
        attn = (q * self.scale) @ k.transpose(-2, -1)
        attn = attn + self._get_rel_pos_bias()
        if mask is not None:
            windows = mask.shape[0]
            attn = attn.view(-1, windows, self.num_heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, n, n)
        x = self.softmax(attn) @ v
        return self.proj(x.transpose(1, 2).reshape(b, n, -1))


def padded_swin(img_size: int = 64, padded_heads: bool = False, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    config = dict(embed_dim=32, depths=(2, 2), num_heads=(2, 4), num_classes=10) | kwargs
    model = timm.create_model("swin_tiny_patch4_window7_224", img_size=img_size, window_size=7, **config).eval()
    if padded_heads:
        for module in model.modules():
            if isinstance(module, WindowAttention):
                module.__class__ = PaddedHeadAttention
    return model


def compile_both(model, qconfig, size: int, calib: int = 8, int_kernels: str = "portable"):
    calib_data, diff = images(calib, size, seed=1), images(1, size, seed=2)
    common = dict(calib_data=calib_data, diff_inputs=(diff,), progress=False, numeric_diff=False)
    fake = fxquant.compile(model, qconfig, **common)
    return fake, fxquant.compile(model, qconfig, backend="int", int_kernels=int_kernels, **common)


def code_pads(gm: fx.GraphModule) -> list[fx.Node]:
    """Zero pads (as traced) that now pad codes: their fill is an int, the zero point's code."""
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is F.pad and _fill(n) is not None]


def _fill(node: fx.Node):
    value = node.kwargs.get("value", node.args[3] if len(node.args) > 3 else None)
    return value if isinstance(value, int) else None


def assert_codes_agree(fake, integer, inputs) -> list:
    rows = code_agreement(fake, integer, inputs, isolated=True)
    assert rows, "no lowered point to compare"
    worst = [r for r in rows if r.worst > 1]
    assert not worst, f"codes differ by more than 1 LSB: {worst}"
    codes, ties = sum(r.codes for r in rows), sum(r.off_by_one for r in rows)
    assert ties <= TIE_SHARE * codes, f"{ties} of {codes} codes off by 1 LSB: more than ties"
    return rows


def test_zero_pad_is_scale_transparent_but_moves_codes_only_when_allowed():
    graph = fx.Graph()
    x = graph.placeholder("x")
    pad = graph.call_function(F.pad, (x, (0, 1)))
    roll = graph.call_function(torch.roll, (x, 1), {"dims": 0})
    valued = graph.call_function(F.pad, (x, (0, 1)), {"value": 1.0})
    gm = fx.GraphModule(torch.nn.Module(), graph)
    assert is_zero_pad(pad) and is_scale_transparent(gm, pad) and not rearranges_elements(gm, pad)
    assert moves_elements(gm, pad, allow_pad=True) and not moves_elements(gm, pad, allow_pad=False)
    assert rearranges_elements(gm, roll) and moves_elements(gm, roll, allow_pad=False)
    assert not is_zero_pad(valued) and not moves_elements(gm, valued, allow_pad=True)


@pytest.mark.parametrize(
    "qconfig",
    ["w8a8", "fqvit_w8a8", "int8_all", {"extends": "w8a8", "name": "w8a8_signed_asym", "norm1": SIGNED_ASYM}],
    ids=["w8a8", "fqvit_w8a8", "int8_all", "signed_asym_norm1"],
)
def test_padded_windows_codes_equal_fake_quant(qconfig):
    fake, integer = compile_both(padded_swin(), qconfig, 64)
    check_padded_windows(fake, integer)


@pytest.mark.skipif(not onednn_available(), reason="oneDNN's int8 Linear kernels are not available here")
@pytest.mark.parametrize("preset", ["w8a8", "fqvit_w8a8"])
def test_padded_windows_on_onednn_uint8_codes(preset):
    """``use_onednn_kernels`` moves the codes to uint8 (+128), the pads' fill with them."""
    fake, integer = compile_both(padded_swin(), preset, 64, int_kernels="onednn")
    check_padded_windows(fake, integer)


def check_padded_windows(fake, integer) -> None:
    pads = code_pads(integer)
    assert len(pads) == 4, "every block pads its norm1 codes"  # 2 stages x 2 blocks
    nonzero = [n for n in pads if _fill(n) != 0]
    assert nonzero, "no pad fills with a zero point other than code 0: the test would prove nothing"
    for pad in pads:  # the fill is the code of the point the padded codes come from
        source = pad.args[0]
        while CODES_OF not in source.meta:
            source = source.args[0]
        fq = fake.get_submodule(next(n.target for n in fake.graph.nodes if n.name == source.meta[CODES_OF][0]))
        assert _fill(pad) == int(fq.qparams.zero_point) - source.meta[CODES_OF][1]
    dequantized = [line for line in integer.report.notes if "dequantized for float" in line]
    assert not [line for line in dequantized if "norm1" in line], "a float window partition is left (shape reads)"
    assert_codes_agree(fake, integer, (images(2, 64, seed=3),))


def test_pad_after_an_integer_op_stops_its_fused_requantization():
    head_point = {"attn_q_out": ACT, "attn_k_out": ACT}  # per tensor: params_before accepts the chain
    fake, integer = compile_both(padded_swin(padded_heads=True), {"extends": "w8a8", "name": "pt_qk", **head_point}, 64)
    requantized = [line for line in integer.report.notes if line.startswith("requantized:")]
    assert any("attn_v_input" in line for line in requantized), "the V linear still requantizes"
    assert not any("attn_q_out" in line or "attn_k_out" in line for line in requantized), requantized
    assert_codes_agree(fake, integer, (images(2, 64, seed=3),))


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["w8a8", "fqvit_w8a8", "int8_all"])
def test_full_size_padded_swin_codes_equal_fake_quant(preset):
    """Swin-T as published (depths 2-2-6-2, 96 channels) at 256 px: 64x64 tokens padded to 70x70."""
    model = padded_swin(256, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))
    fake, integer = compile_both(model, preset, 256, calib=4)
    assert code_pads(integer)
    assert_codes_agree(fake, integer, (images(1, 256, seed=3),))
