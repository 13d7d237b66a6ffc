"""annotate: every quantizable op gets its group and QuantSpec in meta; the graph is unchanged.

Before: the traced tiny ViT / Swin. Expected: ``fxq.point`` (activations, linear outputs) and
``fxq.weight`` (Linear/Conv weights) on the nodes ARCHITECTURE.md names, ``fxq.role`` on the
attention tensors, float points listed in the report, skip/override globs honoured.
"""

from __future__ import annotations

import operator
from collections import Counter

import pytest

import fxquant
from fxquant.errors import NodeError, PassError, QConfigError
from fxquant.ir.meta import MODULE, POINT, ROLE, WEIGHT
from fxquant.passes import Annotate
from fxquant.quant.qconfig import ACTIVATION_GROUPS


def node_signature(gm):
    return [(n.name, n.op, str(n.target), str(n.args), str(n.kwargs)) for n in gm.graph.nodes]


def points(gm, key=POINT):
    return {n.name: n.meta[key].label for n in gm.graph.nodes if key in n.meta}


def attention_nodes(gm, module):
    """q@kT, softmax and probs@v of one attention module, found by op and module path."""
    in_module = [n for n in gm.graph.nodes if n.meta.get(MODULE) == module]
    scores, out = [n for n in in_module if n.target is operator.matmul]
    (softmax,) = [n for n in in_module if n.target == "softmax"]
    return scores, softmax, out


def expected_vit_layout(gm, depth):
    """Node name -> label for fxq.point, fxq.point roles, and fxq.weight, as ARCHITECTURE says."""
    # the head reads the class token x[:, 0] of the final norm: its point is that token
    (cls_token,) = [n for n in gm.graph.nodes if n.target is operator.getitem and n.args[0].name == "norm"]
    acts = {"patch_embed_proj": "patch_embed.output", cls_token.name: "final_norm", "head": "head.output"}
    roles = {}
    weights = {"patch_embed_proj": "patch_embed.weight", "head": "head.weight"}
    for b in range(depth):
        scores, softmax, out = attention_nodes(gm, f"blocks.{b}.attn")
        v = out.args[1]
        attention = {
            f"blocks_{b}_attn_q_norm": ("attn_q_out", "attn_q"),
            f"blocks_{b}_attn_k_norm": ("attn_k_out", "attn_k"),
            v.name: ("attn_v_input", "attn_v"),
            scores.name: ("attn_kv_out", "attn_scores"),
            softmax.name: ("intSoft", "attn_softmax"),
            out.name: ("attn_v_out", "attn_out"),
        }
        acts.update({name: group for name, (group, _) in attention.items()})
        roles.update({name: role for name, (_, role) in attention.items()})
        acts.update({f"blocks_{b}_norm1": "norm1", f"blocks_{b}_norm2": "norm2", f"blocks_{b}_mlp_act": "mlp_gelu"})
        for leaf, group in (
            ("attn_qkv", "attn_qkv"),
            ("attn_proj", "attn_proj"),
            ("mlp_fc1", "mlp_fc1"),
            ("mlp_fc2", "mlp_fc2"),
        ):
            acts[f"blocks_{b}_{leaf}"] = f"{group}.output"
            weights[f"blocks_{b}_{leaf}"] = f"{group}.weight"
        residuals = [n.name for n in gm.graph.nodes if n.target is operator.add and n.meta.get(MODULE) == f"blocks.{b}"]
        assert len(residuals) == 2  # all_groups names residual1/residual2: the first add, then the second
        acts.update({residuals[0]: "residual1", residuals[1]: "residual2"})
    return acts, roles, weights


def test_fp32_output_unchanged_bit_identical(tiny, trace, make_ctx, run, qconfigs, fp32):
    gm = trace(tiny.model)
    before = node_signature(gm)
    ctx = make_ctx(gm, qconfigs.all_groups(), tiny.inputs())

    gm = run(gm, ctx, Annotate())

    assert node_signature(gm) == before  # meta only
    assert fp32.forward(gm, ctx.diff_inputs).equal(fp32.forward(ctx.reference, ctx.diff_inputs))
    assert ctx.report.passes[-1].output_qsnr_db == float("inf")


def test_vit_groups_land_where_architecture_says(vit, trace, make_ctx, run, qconfigs):
    gm = trace(vit.model)
    ctx = make_ctx(gm, qconfigs.all_groups(), vit.inputs())

    gm = run(gm, ctx, Annotate())

    acts, roles, weights = expected_vit_layout(gm, vit.depth)
    assert points(gm, POINT) == acts
    assert points(gm, WEIGHT) == weights
    assert {n.name: n.meta[ROLE] for n in gm.graph.nodes if ROLE in n.meta} == roles
    for node in gm.graph.nodes:
        for key in (POINT, WEIGHT):
            if key in node.meta:
                point = node.meta[key]
                # attention tensors belong to their attention module (q_norm's output included)
                owner = node.meta[MODULE].split(".attn")[0] + ".attn" if ROLE in node.meta else node.meta[MODULE]
                if point.group == "final_norm":  # the class token the head reads belongs to the norm
                    owner = "norm"
                assert point.module == owner
                assert point.spec == ctx.qconfig.spec_for(point.group, point.section, point.module)
                assert point.axis == (0 if key == WEIGHT else None)  # layer-wise acts, per-channel weights
    assert ctx.report.float_points == []


def test_swin_groups_include_patch_merging(swin, trace, make_ctx, run, qconfigs):
    gm = trace(swin.model)
    ctx = make_ctx(gm, qconfigs.all_groups(), swin.inputs())

    gm = run(gm, ctx, Annotate())

    per_block = [
        "norm1",
        "attn_qkv.output",
        "attn_q_out",
        "attn_k_out",
        "attn_v_input",
        "attn_kv_out",
        "intSoft",
        "attn_v_out",
        "attn_proj.output",
        "norm2",
        "mlp_fc1.output",
        "mlp_gelu",
        "mlp_fc2.output",
        "residual1",
        "residual2",
    ]
    once = ["patch_embed.output", "patch_merging_norm", "patch_merging.output", "final_norm", "head.output"]
    assert Counter(points(gm, POINT).values()) == Counter(per_block * swin.depth + once)
    weight_groups = ["attn_qkv", "attn_proj", "mlp_fc1", "mlp_fc2"]
    assert Counter(points(gm, WEIGHT).values()) == Counter(
        [f"{g}.weight" for g in weight_groups] * swin.depth
        + ["patch_embed.weight", "patch_merging.weight", "head.weight"]
    )
    by_group = {n.meta[POINT].group: n.meta[MODULE] for n in gm.graph.nodes if POINT in n.meta}
    assert by_group["patch_merging_norm"] == "layers.1.downsample.norm"
    assert by_group["patch_merging"] == "layers.1.downsample.reduction"
    assert by_group["head"] == "head.fc"
    assert by_group["final_norm"] == "norm"


def test_groups_absent_from_the_qconfig_stay_float_and_are_listed(vit, trace, make_ctx, run, qconfigs):
    qconfig = {"norm1": qconfigs.act(), "attn_qkv": {"weight": qconfigs.weight()}}
    gm = trace(vit.model)
    ctx = make_ctx(gm, qconfig, vit.inputs())

    gm = run(gm, ctx, Annotate())

    assert points(gm, POINT) == {f"blocks_{b}_norm1": "norm1" for b in range(vit.depth)}
    assert points(gm, WEIGHT) == {f"blocks_{b}_attn_qkv": "attn_qkv.weight" for b in range(vit.depth)}
    all_acts, _, all_weights = expected_vit_layout(gm, vit.depth)
    # residual1/residual2 only where a qconfig names them: here both adds are plain residual
    all_acts = {name: "residual" if label.startswith("residual") else label for name, label in all_acts.items()}
    expected_float = {
        f"{name} ({label}): float"
        for name, label in all_acts.items()
        if label in ACTIVATION_GROUPS and label != "norm1"
    }
    expected_float |= {f"{name} ({label}): float" for name, label in all_weights.items() if label != "attn_qkv.weight"}
    assert set(ctx.report.float_points) == expected_float
    assert len(ctx.report.float_points) == len(expected_float)


def test_skip_glob_keeps_a_whole_block_float(vit, trace, make_ctx, run, qconfigs):
    gm = trace(vit.model)
    ctx = make_ctx(gm, {**qconfigs.all_groups(), "skip": ["blocks.1.*", "head"]}, vit.inputs())

    gm = run(gm, ctx, Annotate())

    annotated = [n for n in gm.graph.nodes if POINT in n.meta or WEIGHT in n.meta]
    in_block_1 = [n.name for n in annotated if n.meta[MODULE].startswith("blocks.1")]
    assert in_block_1 == []  # its residual adds (module "blocks.1" itself) included
    assert "head" not in {n.name for n in annotated}
    acts, _, weights = expected_vit_layout(gm, vit.depth)
    kept = {name for name in {**acts, **weights} if not _in_block(gm, name, 1) and name != "head"}
    assert points(gm, POINT) == {name: label for name, label in acts.items() if name in kept}
    assert points(gm, WEIGHT) == {name: label for name, label in weights.items() if name in kept}
    assert "blocks_1_norm1 (norm1): float" in ctx.report.float_points
    assert "head (head.weight): float" in ctx.report.float_points


def _in_block(gm, name, block):
    node = next(n for n in gm.graph.nodes if n.name == name)
    return node.meta[MODULE] == f"blocks.{block}" or node.meta[MODULE].startswith(f"blocks.{block}.")


@pytest.mark.parametrize("key, glob", [("skip", "blcoks.*"), ("overrides", "blocks.0.nrom1")])
def test_glob_that_matches_no_module_fails(vit, trace, make_ctx, run, qconfigs, key, glob):
    body = [glob] if key == "skip" else {glob: {"norm1": {"bits": 4}}}
    gm = trace(vit.model)
    ctx = make_ctx(gm, {**qconfigs.all_groups(), key: body}, vit.inputs())
    with pytest.raises(PassError) as info:
        run(gm, ctx, Annotate())
    message = str(info.value)
    assert "pass 'annotate' failed" in message and f"glob '{glob}' matches no module" in message
    assert ("'blocks.*'" if key == "skip" else "'blocks.0.norm1'") in message  # the close match
    # fxquant.compile refuses it before tracing, as a QConfigError
    with pytest.raises(QConfigError, match=f"glob '{glob}' matches no module of VisionTransformer"):
        fxquant.compile(vit.model, {**qconfigs.all_groups(), key: body}, calib_data=vit.calib(), progress=False)


def test_overrides_glob_changes_specs_per_module(vit, trace, make_ctx, run, qconfigs):
    qconfig = {
        "norm1": qconfigs.act(8),
        "mlp_fc2": {"weight": qconfigs.weight(8)},
        "overrides": {
            "blocks.1.*": {"norm1": {"bits": 4}, "mlp_fc2": {"weight": {"bits": 6}}},
            "blocks.0.*": {"norm2": qconfigs.act(5)},
        },
    }
    gm = trace(vit.model)
    ctx = make_ctx(gm, qconfig, vit.inputs())

    gm = run(gm, ctx, Annotate())

    nodes = {n.name: n for n in gm.graph.nodes}
    assert nodes["blocks_0_norm1"].meta[POINT].spec.bits == 8
    assert nodes["blocks_1_norm1"].meta[POINT].spec.bits == 4
    assert nodes["blocks_0_mlp_fc2"].meta[WEIGHT].spec.bits == 8
    assert nodes["blocks_1_mlp_fc2"].meta[WEIGHT].spec.bits == 6
    assert nodes["blocks_1_mlp_fc2"].meta[WEIGHT].spec.granularity == "channel_wise"  # merged, not replaced
    # a group absent at top level exists only where an override adds it
    assert nodes["blocks_0_norm2"].meta[POINT].spec.bits == 5
    assert POINT not in nodes["blocks_1_norm2"].meta


def test_head_wise_attention_points_get_the_head_axis(tiny, trace, make_ctx, run, qconfigs):
    head_wise = qconfigs.act(calibration_mode="head_wise")
    qconfig = {
        "attn_q_out": head_wise,
        "attn_kv_out": head_wise,
        "attn_qkv": {"weight": qconfigs.weight(calibration_mode="head_wise")},
    }
    gm = trace(tiny.model)
    ctx = make_ctx(gm, qconfig, tiny.inputs())

    gm = run(gm, ctx, Annotate())

    acts = [n.meta[POINT] for n in gm.graph.nodes if POINT in n.meta]
    assert len(acts) == 2 * tiny.depth
    for point in acts:
        assert (point.axis, point.num_groups) == (1, _heads(tiny, point.module))  # (B, heads, N, d)
    weights = [n.meta[WEIGHT] for n in gm.graph.nodes if WEIGHT in n.meta]
    assert len(weights) == tiny.depth
    for point in weights:  # fused qkv weight: 3 * heads blocks of head_dim output rows
        assert (point.axis, point.num_groups) == (0, 3 * _heads(tiny, point.module))


def test_channel_wise_on_a_convolution_output_scales_its_channels(vit, trace, make_ctx, run, qconfigs):
    # (B, C, H, W): one scale per channel C (axis 1), not per width position (the last axis)
    qconfig = {"patch_embed": {"output": qconfigs.act(calibration_mode="channel_wise")}}
    gm = trace(vit.model)
    gm = run(gm, make_ctx(gm, qconfig, vit.inputs()), Annotate())

    point = {n.name: n for n in gm.graph.nodes}["patch_embed_proj"].meta[POINT]
    assert (point.label, point.axis) == ("patch_embed.output", 1)


def _heads(tiny, module):
    """Heads of the attention module that ``module`` is (or is inside): Swin's stages differ."""
    (attention,) = [path for path in tiny.heads if module == path or module.startswith(path + ".")]
    return tiny.heads[attention]


def test_channel_wise_on_an_attention_tensor_is_a_clear_error(vit, trace, make_ctx, run, qconfigs):
    gm = trace(vit.model)
    scores, _, _ = attention_nodes(gm, "blocks.0.attn")
    ctx = make_ctx(gm, {"attn_kv_out": qconfigs.act(calibration_mode="channel_wise")}, vit.inputs())

    with pytest.raises(
        PassError,
        match=r"pass 'annotate' failed.*attn_kv_out: channel_wise is not defined "
        r"on per-head attention tensors.*use head_wise or layer_wise",
    ) as info:
        run(gm, ctx, Annotate())
    assert (info.value.pass_name, info.value.node) == ("annotate", scores.name)


@pytest.mark.parametrize(
    "qconfig_of, message",
    [
        (lambda q: {"norm1": q.act(calibration_mode="head_wise")}, "head_wise applies to attention tensors"),
        (lambda q: {"mlp_fc1": {"weight": q.weight(calibration_mode="group_wise")}}, "group_wise needs a fused qkv"),
    ],
)
def test_granularity_that_does_not_fit_the_op_is_refused(vit, trace, make_ctx, qconfigs, qconfig_of, message):
    gm = trace(vit.model)
    with pytest.raises(NodeError, match=message):
        Annotate().run(gm, make_ctx(gm, qconfig_of(qconfigs), vit.inputs()))
