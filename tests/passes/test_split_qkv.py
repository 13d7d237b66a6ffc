"""split_qkv: the fused qkv Linear (C -> 3C) becomes three Linears Q, K, V (C -> C each).

Before: the traced tiny ViT / Swin (timm's ``qkv(x).reshape(B, N, 3, H, D).permute(2, 0, 3, 1,
4).unbind(0)``; Swin reshapes with -1), annotated. Expected: per block ``qkv_q``, ``qkv_k``,
``qkv_v`` Linears holding the slices of the fused weight, each followed by reshape(B, N, H, D)
and permute(0, 2, 1, 3); the fused module and its reshape/permute/unbind gone; provenance
(``fxq.origin`` + ``fxq.origin_slice``) pairing each with its slice of the fused output.
"""

from __future__ import annotations

import torch
from torch import nn

from fxquant.ir.meta import MODULE, ORIGIN, ORIGIN_SLICE, POINT, ROLE, WEIGHT
from fxquant.passes import Annotate, SplitQkv


def fused_qkv_paths(tiny):
    return [f"{attention}.qkv" for attention in tiny.heads]


def split(tiny, trace, make_ctx, run, qconfig):
    gm = trace(tiny.model)
    ctx = make_ctx(gm, qconfig, tiny.inputs())
    gm = run(gm, ctx, Annotate())
    annotated = {n.name: dict(n.meta) for n in gm.graph.nodes}
    return run(gm, ctx, SplitQkv()), ctx, annotated


def test_fp32_output_unchanged_up_to_rounding(tiny, trace, make_ctx, run, qconfigs, fp32):
    gm, ctx, _ = split(tiny, trace, make_ctx, run, qconfigs.all_groups())

    # A GEMM on a third of the output columns may block its sums differently: float rounding.
    fp32.assert_close(fp32.forward(gm, ctx.diff_inputs), fp32.forward(ctx.reference, ctx.diff_inputs))
    record = ctx.report.pass_record("split_qkv")
    assert record.output_qsnr_db > 100.0
    # the diff pairs every split Linear with its slice of the fused FP32 output
    paired = {entry["node"]: entry for entry in record.nodes}
    for path in fused_qkv_paths(tiny):
        for letter in "qkv":
            entry = paired[f"{path}_{letter}".replace(".", "_")]
            assert entry["origin"] == path.replace(".", "_") and entry["qsnr_db"] > 100.0


def test_three_linears_hold_the_slices_of_the_fused_weight(tiny, trace, make_ctx, run, qconfigs):
    fused = {path: tiny.model.get_submodule(path) for path in fused_qkv_paths(tiny)}
    gm, _, _ = split(tiny, trace, make_ctx, run, qconfigs.all_groups())

    modules = dict(gm.named_modules())
    for path, qkv in fused.items():
        assert path not in modules  # the fused module is deleted, not just unused
        width = qkv.out_features // 3
        for index, letter in enumerate("qkv"):
            part = modules[f"{path}_{letter}"]
            assert isinstance(part, nn.Linear) and (part.in_features, part.out_features) == (qkv.in_features, width)
            rows = slice(index * width, (index + 1) * width)
            assert part.weight.equal(qkv.weight[rows]) and part.bias.equal(qkv.bias[rows])

            (node,) = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == f"{path}_{letter}"]
            assert node.meta[ORIGIN] == path.replace(".", "_")  # the fused FP32 node
            assert node.meta[ORIGIN_SLICE] == (-1, index * width, width)
            assert node.meta[MODULE] == f"{path}_{letter}"
            # (B, N, C) -> (B, N, H, D) -> (B, H, N, D)
            (shaped,) = node.users
            assert shaped.target == "reshape" and len(shaped.args) == 5
            (heads_first,) = shaped.users
            assert heads_first.target == "permute" and heads_first.args[1:] == (0, 2, 1, 3)
    assert not [n for n in gm.graph.nodes if n.target == "unbind"]
    assert not [n for n in gm.graph.nodes if n.target == "permute" and n.args[1:] == (2, 0, 3, 1, 4)]
    assert not [n for n in gm.graph.nodes if n.target == "reshape" and n.args[3:4] == (3,)]  # (B, N, 3, H, D)


def test_swin_reshape_with_minus_one_is_kept(swin, trace, make_ctx, run):
    gm, ctx, _ = split(swin, trace, make_ctx, run, {})

    linears = [
        n for n in gm.graph.nodes if n.op == "call_module" and str(n.target).endswith(("qkv_q", "qkv_k", "qkv_v"))
    ]
    assert len(linears) == 3 * swin.depth
    for node in linears:
        (shaped,) = node.users
        assert shaped.args[-1] == -1  # Swin's head dim stays inferred
    assert ctx.report.pass_record("split_qkv").output_qsnr_db > 100.0


def test_quant_points_follow_the_matrices(vit, trace, make_ctx, run, qconfigs):
    qconfig = {
        "attn_qkv": {"weight": qconfigs.weight(calibration_mode="group_wise"), "output": qconfigs.act()},
        "attn_q_out": qconfigs.act(),
        "attn_v_input": qconfigs.act(),
    }
    gm, _, annotated = split(vit, trace, make_ctx, run, qconfig)

    nodes = {n.name: n for n in gm.graph.nodes}
    for b in range(vit.depth):
        fused_weight = annotated[f"blocks_{b}_attn_qkv"][WEIGHT]
        assert (fused_weight.spec.granularity, fused_weight.num_groups) == ("group_wise", 3)
        for letter in "qkv":
            node = nodes[f"blocks_{b}_attn_qkv_{letter}"]
            weight = node.meta[WEIGHT]
            # one scale per matrix: group_wise over [Wq; Wk; Wv] is layer_wise on each
            assert (weight.spec.granularity, weight.num_groups) == ("layer_wise", None)
            assert weight.spec.bits == fused_weight.spec.bits and weight.group == "attn_qkv"
            assert weight.module == f"blocks.{b}.attn.qkv_{letter}"
            assert node.meta[POINT].label == "attn_qkv.output"
        # v's point (on the getitem that unbind produced) moved to v's new permute
        (v_node,) = [n for n in gm.graph.nodes if n.meta.get(ROLE) == "attn_v" and n.meta[MODULE] == f"blocks.{b}.attn"]
        assert v_node.target == "permute" and v_node.meta[POINT].label == "attn_v_input"
        v_linear = v_node.args[0].args[0]
        assert v_linear.target == f"blocks.{b}.attn.qkv_v"


def test_head_wise_weight_keeps_one_scale_per_head(vit, trace, make_ctx, run, qconfigs):
    qconfig = {"attn_qkv": {"weight": qconfigs.weight(calibration_mode="head_wise")}}
    gm, _, _ = split(vit, trace, make_ctx, run, qconfig)

    weights = [n.meta[WEIGHT] for n in gm.graph.nodes if WEIGHT in n.meta]
    assert len(weights) == 3 * vit.depth
    assert {(w.spec.granularity, w.axis, w.num_groups) for w in weights} == {("head_wise", 0, 2)}


def test_unfused_attention_is_left_alone(trace, make_ctx, run):
    class SeparateProjections(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            attn = (self.q(x) @ self.k(x).transpose(-2, -1)).softmax(dim=-1)
            return attn @ self.v(x)

    torch.manual_seed(0)
    gm = trace(SeparateProjections().eval())
    code = gm.code
    ctx = make_ctx(gm, {}, (torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(0)),))

    gm = run(gm, ctx, SplitQkv())

    assert gm.code == code
    assert sorted(name for name, _ in gm.named_children()) == ["k", "q", "v"]


def test_split_does_not_advance_the_global_rng(tiny, trace, make_ctx, run, qconfigs):
    """The three Linears are built without random init (it would move the user's RNG)."""
    gm = trace(tiny.model)
    ctx = make_ctx(gm, qconfigs.all_groups(), tiny.inputs())
    gm = run(gm, ctx, Annotate())
    torch.manual_seed(7)
    before = torch.get_rng_state()
    gm = run(gm, ctx, SplitQkv())
    assert torch.equal(torch.get_rng_state(), before)
    part = gm.get_submodule(f"{fused_qkv_paths(tiny)[0]}_q")
    assert part.weight.requires_grad and part.weight.dtype == torch.float32
