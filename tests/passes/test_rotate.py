"""rotate: residual stream and attention heads rotated by orthogonal matrices folded into
the weights; FP32 output unchanged, activation outliers gone.

Before: a tiny ViT classifier, a tiny DINOv2-style backbone (LayerScale, no head) and a tiny
Swin, traced, annotated, qkv split. Expected: the residual stream found with every writer and
reader; LayerNorm affines and LayerScales folded away (gamma 1, beta 0); the last norm's
inverse rotation folded into the head, or a float ``<norm>_unrotate`` Linear after it when
there is no head (listed in the report); Q/K/V/proj of every head rotated with scores
unchanged; the FP32 output equal up to float rounding; the nodes holding rotated values
re-originated; planted outlier channels spread; and on a model with outliers the quantized
output closer to FP32 than without the pass.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch

import fxquant
from fxquant.errors import QConfigError
from fxquant.infra.contracts import PipelineOrderError
from fxquant.infra.neutrality import output_qsnr
from fxquant.infra.pass_manager import PassManager
from fxquant.ir.meta import ORIGIN, POINT
from fxquant.ir.residual import find_residual_stream
from fxquant.passes import Annotate, Calibrate, InsertObservers, LowerFakeQuant, Rotate, Smooth, SplitQkv
from fxquant.quant.qconfig import load_qconfig
from fxquant.runtime.hadamard import BlockHadamard

# float64 folding, then float32 weights: the output moves by a few float32 roundings per layer
NEUTRAL_DB = 100.0
OUTLIER_CHANNELS = (3, 17, 42)
OUTLIER_FACTOR = 50.0


def _dinov2_like():
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_small_patch14_dinov2", img_size=28, embed_dim=64, depth=2, num_heads=2, num_classes=0, init_values=0.5
    ).eval()
    with torch.no_grad():  # LayerScale and affines away from 1/0, so folding them is visible
        for block in model.blocks:
            block.ls1.gamma.uniform_(0.2, 1.5)
            block.ls2.gamma.uniform_(0.2, 1.5)
        for norm in [model.norm] + [b.norm1 for b in model.blocks] + [b.norm2 for b in model.blocks]:
            norm.weight.uniform_(0.5, 2.0)
            norm.bias.normal_(0.0, 0.3)
    return model


@pytest.fixture(scope="module")
def dinov2_like():
    return _dinov2_like()


def images(size, n=2, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def split_graph(model, size, trace, make_ctx, run, qconfig):
    gm = trace(model)
    calib = [images(size, 2, 1), images(size, 2, 2)]
    ctx = make_ctx(gm, qconfig, (images(size, 1, 0),), calib)
    return run(gm, ctx, Annotate(), SplitQkv()), ctx


def rotate_config(qconfigs, rotate=True, **extra):
    return {**qconfigs.gemm_inputs(), "rotate": rotate, **extra}


def node(gm, name):
    return next(n for n in gm.graph.nodes if n.name == name)


# ------------------------------------------------------------------------ stream analysis
def test_residual_stream_of_a_vit(vit, trace):
    gm = trace(vit.model)
    stream = find_residual_stream(gm)
    assert not isinstance(stream, str), stream
    assert stream.width == 64
    assert [w.linear.target for w in stream.writers] == [
        f"blocks.{i}.{part}" for i in range(vit.depth) for part in ("attn.proj", "mlp.fc2")
    ]
    assert [r.target for r in stream.readers] == [f"blocks.{i}.norm{j}" for i in range(vit.depth) for j in (1, 2)]
    assert stream.final_norm.target == "norm"
    assert sorted(str(p.target) for p in stream.embed_params) == ["cls_token", "pos_embed"]
    assert [n.target for n in stream.embed_linears] == ["patch_embed.proj"]


def test_layer_scales_are_writers_factors(dinov2_like, trace):
    stream = find_residual_stream(trace(dinov2_like))
    assert [[str(a.target) for a in w.layer_scales] for w in stream.writers] == [
        [f"blocks.{i}.ls{j}.gamma"] for i in range(2) for j in (1, 2)
    ]


def test_swin_has_no_single_stream(swin, trace):
    reason = find_residual_stream(trace(swin.model))
    assert isinstance(reason, str) and reason


# ---------------------------------------------------------------------------- the pass
def test_without_the_key_nothing_changes(vit, trace, make_ctx, run, qconfigs):
    gm, ctx = split_graph(vit.model, vit.image_size, trace, make_ctx, run, qconfigs.gemm_inputs())
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    nodes = [n.name for n in gm.graph.nodes]
    gm = run(gm, ctx, Rotate())
    assert [n.name for n in gm.graph.nodes] == nodes
    assert all(torch.equal(before[k], v) for k, v in gm.state_dict().items())


def test_classifier_folds_everything_into_weights(vit, trace, make_ctx, run, qconfigs):
    gm, ctx = split_graph(vit.model, vit.image_size, trace, make_ctx, run, rotate_config(qconfigs))
    nodes = [n.name for n in gm.graph.nodes]
    head_before = gm.get_submodule("head").weight.detach().clone()
    gm = run(gm, ctx, Rotate())
    record = ctx.report.passes[-1]
    assert record.output_qsnr_db >= NEUTRAL_DB
    assert [n.name for n in gm.graph.nodes] == nodes  # the head absorbs the inverse rotation
    for name in ["norm"] + [f"blocks.{i}.norm{j}" for i in range(vit.depth) for j in (1, 2)]:
        norm = gm.get_submodule(name)
        assert torch.equal(norm.weight, torch.ones_like(norm.weight)), name
        assert torch.equal(norm.bias, torch.zeros_like(norm.bias)), name
    assert not torch.allclose(gm.get_submodule("head").weight, head_before)
    assert any("folded into head" in note for note in record.notes)
    assert any("heads rotated (Q/K, V/proj)" in note for note in record.notes)


def test_backbone_gets_a_float_unrotate_linear(dinov2_like, trace, make_ctx, run, qconfigs):
    gm, ctx = split_graph(dinov2_like, 28, trace, make_ctx, run, rotate_config(qconfigs))
    gm = run(gm, ctx, Rotate())
    assert ctx.report.passes[-1].output_qsnr_db >= NEUTRAL_DB
    (unrotate,) = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == "norm_unrotate"]
    # after x[:, 0] and the Identity fc_norm/head: on the cls token only, the model's output
    assert unrotate.args == (node(gm, "head"),) and list(unrotate.users)[0].op == "output"
    assert node(gm, "norm").meta[ORIGIN] == "norm@rotate"
    assert unrotate.meta[ORIGIN] == "head"  # computes the original model's output
    assert any("norm_unrotate (float Linear)" in line for line in ctx.report.float_points)
    for i in range(2):
        for j in (1, 2):
            gamma = gm.get_parameter(f"blocks.{i}.ls{j}.gamma")
            assert torch.equal(gamma, torch.ones_like(gamma))


def test_heads_keep_scores_and_rotate_q_k_v(vit, trace, make_ctx, run, qconfigs):
    gm, ctx = split_graph(vit.model, vit.image_size, trace, make_ctx, run, rotate_config(qconfigs))
    gm = run(gm, ctx, Rotate())
    q = node(gm, "blocks_0_attn_qkv_q")
    v = node(gm, "blocks_0_attn_qkv_v")
    proj = node(gm, "blocks_0_attn_proj")
    assert q.meta[ORIGIN].endswith("@rotate") and v.meta[ORIGIN].endswith("@rotate")
    scores = next(n for n in gm.graph.nodes if n.meta.get("fxq.role") == "attn_scores")
    assert not scores.meta[ORIGIN].endswith("@rotate")
    assert proj.meta[ORIGIN] == "blocks_0_attn_proj@rotate"  # it writes the rotated stream
    # with the heads alone, proj undoes V's rotation and the stream keeps its basis
    gm2, ctx2 = split_graph(
        vit.model, vit.image_size, trace, make_ctx, run, rotate_config(qconfigs, {"residual": False})
    )
    gm2 = run(gm2, ctx2, Rotate())
    assert ctx2.report.passes[-1].output_qsnr_db >= NEUTRAL_DB
    assert node(gm2, "blocks_0_attn_proj").meta[ORIGIN] == "blocks_0_attn_proj"
    assert node(gm2, "blocks_0_norm1").meta[ORIGIN] == "blocks_0_norm1"


def test_swin_skips_the_stream_with_a_note_and_rotates_heads(swin, trace, make_ctx, run, qconfigs):
    gm, ctx = split_graph(swin.model, swin.image_size, trace, make_ctx, run, rotate_config(qconfigs))
    gm = run(gm, ctx, Rotate())
    record = ctx.report.passes[-1]
    assert any(n.startswith("residual stream not rotated: ") for n in record.notes)
    assert record.output_qsnr_db >= NEUTRAL_DB
    assert sum("heads rotated" in n for n in record.notes) == swin.depth


def test_planted_outliers_are_spread(vit, trace, make_ctx, run, qconfigs):
    model = copy.deepcopy(vit.model)
    with torch.no_grad():
        for block in model.blocks:
            block.norm2.weight[list(OUTLIER_CHANNELS)] *= OUTLIER_FACTOR
    ratios = {}
    for rotate in (False, True):
        gm, ctx = split_graph(model, vit.image_size, trace, make_ctx, run, rotate_config(qconfigs, rotate))
        gm = run(gm, ctx, Rotate())
        seen = {}
        handle = gm.get_submodule("blocks.1.norm2").register_forward_hook(lambda m, a, out: seen.update(out=out))
        with torch.no_grad():
            gm(images(vit.image_size, 4, 3))
        handle.remove()
        # what the fc1 input point quantizes: the norm's output with its affine (folded or not)
        fc1 = gm.get_submodule("blocks.1.mlp.fc1")
        channel_max = seen["out"].abs().reshape(-1, 64).amax(0)
        ratios[rotate] = float(channel_max.max() / channel_max.median())
        assert fc1 is not None
    assert ratios[False] > 5 * ratios[True]


def test_rotation_buys_accuracy_on_outliers(vit, trace, make_ctx, run, qconfigs):
    model = copy.deepcopy(vit.model)
    with torch.no_grad():
        for block in model.blocks:
            for norm in (block.norm1, block.norm2):
                norm.weight[list(OUTLIER_CHANNELS)] *= OUTLIER_FACTOR
    qsnr = {}
    for rotate in (False, True):
        config = {**rotate_config(qconfigs, rotate)}
        config = {k: ({**v, "bits": 6} if k in ("norm1", "norm2") else v) for k, v in config.items()}
        gm, ctx = split_graph(model, vit.image_size, trace, make_ctx, run, config)
        gm = run(gm, ctx, Rotate(), InsertObservers(), Calibrate(), LowerFakeQuant())
        with torch.no_grad():
            qsnr[rotate] = output_qsnr(gm(*ctx.diff_inputs), ctx.reference(*ctx.diff_inputs))
    assert qsnr[True] > qsnr[False] + 3.0, qsnr


def test_rotate_must_run_before_smooth():
    with pytest.raises(PipelineOrderError, match="rotate"):
        PassManager([Annotate(), SplitQkv(), Smooth(), Rotate()])


@pytest.mark.parametrize(
    "value, message",
    [
        ({"heads": 1}, "rotate.heads: expected true or false"),
        ({"spin": True}, "rotate.spin: unknown key; allowed keys: residual, heads, fc2, seed"),
        ({"seed": -1}, "rotate.seed: expected a non-negative integer"),
        ({"residual": False, "heads": False}, "write `rotate: false`"),
        ("hadamard", "rotate: expected true, false or a mapping"),
    ],
)
def test_bad_rotate_keys_fail_naming_the_key(value, message):
    with pytest.raises(QConfigError, match=message.replace("(", r"\(")):
        load_qconfig({"extends": "w8a8", "rotate": value})


def test_rotate_key_round_trips_and_turns_off():
    config = load_qconfig({"extends": "w8a8", "rotate": {"heads": False, "seed": 4}})
    assert load_qconfig(config.to_dict()).recovery == config.recovery
    assert load_qconfig({**config.to_dict(), "rotate": False}).recovery.get("rotate") is None


@pytest.mark.parametrize("backend", ["fake", "int"])
def test_compile_with_rotate_on_both_backends(dinov2_like, backend):
    """Through fxquant.compile on both backends (the rotation lives in the weights, so the
    integer graph lowers as usual): the user's model untouched, the output closer to FP32
    than without the pass (random init: 11.4 dB -> 16.9 dB, equal on both backends)."""
    state = {k: v.clone() for k, v in dinov2_like.state_dict().items()}
    calib = [images(28, 2, 1), images(28, 2, 2)]
    x = images(28, 2, 5)
    qm = fxquant.compile(dinov2_like, {"extends": "w8a8", "rotate": True}, calib_data=calib, backend=backend)
    assert all(torch.equal(state[k], v) for k, v in dinov2_like.state_dict().items())
    names = [p.name for p in qm.report.passes]
    assert names.index("rotate") == names.index("split_qkv") + 1
    with torch.no_grad():
        out, ref = qm(x), dinov2_like(x)
    assert torch.isfinite(out).all()
    plain = fxquant.compile(dinov2_like, "w8a8", calib_data=calib, backend=backend)
    with torch.no_grad():
        assert output_qsnr(out, ref) > output_qsnr(plain(x), ref) + 3.0


def test_fc2_online_hadamard_moves_the_point(vit, trace, make_ctx, run, qconfigs):
    config = rotate_config(qconfigs, {"residual": False, "heads": False, "fc2": True})
    gm, ctx = split_graph(vit.model, vit.image_size, trace, make_ctx, run, config)
    gm = run(gm, ctx, Rotate())
    assert ctx.report.passes[-1].output_qsnr_db >= NEUTRAL_DB
    for i in range(vit.depth):
        fc2 = node(gm, f"blocks_{i}_mlp_fc2")
        transform = fc2.args[0]
        assert isinstance(gm.get_submodule(str(transform.target)), BlockHadamard)
        assert transform.meta[POINT].group == "mlp_gelu"
        assert POINT not in node(gm, f"blocks_{i}_mlp_act").meta
    assert gm.get_submodule("blocks_0_mlp_fc2_hadamard").block == 256  # 4 * 64 hidden channels


@pytest.mark.parametrize("int_kernels", ["portable", "onednn"])
def test_fc2_hadamard_in_the_integer_graph_and_saved(dinov2_like, int_kernels, tmp_path):
    calib = [images(28, 2, 1), images(28, 2, 2)]
    x = images(28, 2, 5)
    qconfig = {"extends": "w8a8", "smooth_alpha": None, "rotate": {"fc2": True}}
    fake = fxquant.compile(dinov2_like, qconfig, calib_data=calib, numeric_diff=False)
    qm = fxquant.compile(
        dinov2_like, qconfig, calib_data=calib, backend="int", int_kernels=int_kernels, numeric_diff=False
    )
    with torch.no_grad():
        out = qm(x)
        assert output_qsnr(out, fake(x)) > 30.0
    fxquant.save(qm, tmp_path / "m.fxq")
    loaded = fxquant.load(tmp_path / "m.fxq")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), out)


def test_rotated_model_exports_to_onnx(dinov2_like, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    calib = [images(28, 2, 1)]
    x = images(28, 2, 5)
    qconfig = {"extends": "w8a8", "smooth_alpha": None, "rotate": {"fc2": True}}
    qm = fxquant.compile(dinov2_like, qconfig, calib_data=calib, numeric_diff=False)
    path = tmp_path / "rotated.onnx"
    fxquant.export_onnx(qm, path, x)
    session = ort.InferenceSession(str(path))
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(out), qm(x), rtol=0, atol=1e-4)


def test_average_pooled_fc_norm_model_is_rotated(trace, make_ctx, run, qconfigs):
    """timm's global_pool='avg' + fc_norm: the stream is pooled over tokens before the last
    LayerNorm; pooling keeps the channels, so the stream reaches fc_norm rotated."""
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224",
        img_size=32,
        patch_size=8,
        depth=2,
        embed_dim=64,
        num_heads=2,
        num_classes=10,
        global_pool="avg",
        fc_norm=True,
        class_token=False,
    ).eval()
    stream = find_residual_stream(trace(model))
    assert not isinstance(stream, str), stream
    assert stream.final_norm.target == "fc_norm"
    gm, ctx = split_graph(model, 32, trace, make_ctx, run, rotate_config(qconfigs))
    gm = run(gm, ctx, Rotate())
    assert ctx.report.passes[-1].output_qsnr_db >= NEUTRAL_DB
    assert any("folded into head" in n for n in ctx.report.passes[-1].notes)


def test_transformers_models_are_rotated_like_timm():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.ViTConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=256,
        image_size=32,
        patch_size=8,
        num_labels=10,
    )
    model = transformers.ViTForImageClassification(config).eval()
    qconfig = {"extends": "w8a8", "rotate": True, "smooth_alpha": None}
    qm = fxquant.compile(model, qconfig, calib_data=[images(32, 2, 1)])
    record = qm.report.pass_record("rotate")
    assert record.output_qsnr_db >= NEUTRAL_DB
    assert sum("heads rotated (Q/K, V/proj)" in n for n in record.notes) == 2
    assert any("folded into classifier" in n for n in record.notes)
    assert any("residual stream (64 channels) rotated" in n for n in record.notes)
