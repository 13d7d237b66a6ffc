"""linear_modules on traced timm models: Swin-V2's and BEiT's ``F.linear(x, qkv.weight,
cat(q_bias, k_bias, v_bias))`` becomes a call of the Linear ``...attn.qkv`` with the bias
folded; the output is bit-identical; models with ordinary Linears are left as they are."""

from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from torch import nn

from fxquant.ir.meta import MODULE
from fxquant.passes import LinearModules

FUNCTIONAL = (F.linear, torch._C._nn.linear)


def _timm(name: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, num_classes=10, **kwargs).eval()


def _functional(gm) -> list:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in FUNCTIONAL]


def _images(size: int) -> tuple:
    return (torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0)),)


def test_swinv2_and_beit_qkv_become_linear_modules(trace, make_ctx, run, qconfigs):
    models = [
        (_timm("swinv2_tiny_window8_256", depths=(1,), num_heads=(2,), embed_dim=32, img_size=32, window_size=4), 32),
        (_timm("beit_base_patch16_224", depth=2, img_size=32, embed_dim=64, num_heads=2), 32),
    ]
    for model, size in models:
        gm = trace(model)
        before = len(_functional(gm))
        ctx = make_ctx(gm, qconfigs.all_groups(), _images(size))
        gm = run(gm, ctx, LinearModules())

        assert before > 0 and _functional(gm) == []
        qkv = [n for n in gm.graph.nodes if n.op == "call_module" and str(n.target).endswith("attn.qkv")]
        assert len(qkv) == before
        for node in qkv:
            linear = gm.get_submodule(str(node.target))
            assert isinstance(linear, nn.Linear) and linear.bias is not None
            assert node.meta[MODULE] == str(node.target)
        with torch.no_grad():
            assert gm(*ctx.diff_inputs).equal(ctx.reference(*ctx.diff_inputs))
        assert ctx.report.pass_record("linear_modules").output_qsnr_db == float("inf")


def test_a_vit_without_functional_linears_is_unchanged(vit, trace, make_ctx, run, qconfigs):
    gm = trace(vit.model)
    code = gm.code
    ctx = make_ctx(gm, qconfigs.all_groups(), vit.inputs())
    gm = run(gm, ctx, LinearModules())
    assert gm.code == code and ctx.report.pass_record("linear_modules").notes == []
