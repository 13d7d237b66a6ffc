"""Hugging Face transformers vision models (ViT, DeiT, DINOv2, Swin), random init and tiny
configs: traced exactly, compiled under w8a8 / fqvit_w8a8 / int8_all on both backends with
every Linear and both attention matmuls quantized, the same groups as their timm twins,
saved, loaded and exported like them, and a clear error for what cannot be traced."""

from __future__ import annotations

import json
import re

import pytest
import torch
import torch.fx as fx
from torch import nn

transformers = pytest.importorskip("transformers")

import fxquant  # noqa: E402
from fxquant.errors import FxqError, TraceError  # noqa: E402
from fxquant.ir.hf_names import HF_LINEAR_RULES, HF_NORM_RULES, is_separate_qkv  # noqa: E402
from fxquant.ir.hf_trace import SUPPORTED_FAMILIES, is_hf_model  # noqa: E402
from fxquant.ir.patterns import is_matmul, is_scale_transparent, is_softmax  # noqa: E402
from fxquant.runtime.fake_quant import FakeQuantize, QuantConv2d, QuantLinear  # noqa: E402
from fxquant.runtime.int_modules import IntLinear  # noqa: E402
from fxquant.runtime.log_int_softmax import LogIntSoftmax  # noqa: E402
from tests.tiny import images  # noqa: E402

VIT = dict(
    hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=32, patch_size=8
)
SIZES = {"ViT": 32, "DeiT": 32, "DINOv2": 28, "Swin": 32}


def _config(family: str, attn: str = "sdpa", **extra):
    if family == "ViT":
        config = transformers.ViTConfig(**VIT, **extra)
    elif family == "DeiT":
        config = transformers.DeiTConfig(**VIT, **extra)
    elif family == "DINOv2":
        config = transformers.Dinov2Config(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=28, patch_size=14, **extra
        )
    else:
        config = transformers.SwinConfig(
            image_size=32, patch_size=4, embed_dim=32, depths=[2, 2], num_heads=[2, 4], window_size=4, **extra
        )
    config._attn_implementation = attn
    return config


def hf_model(name: str, attn: str = "sdpa", seed: int = 0) -> nn.Module:
    family = next(f for f, names in SUPPORTED_FAMILIES.items() if name in names)
    extra = {"num_labels": 10} if "Classification" in name else {}
    torch.manual_seed(seed)
    return getattr(transformers, name)(_config(family, attn, **extra)).eval()


CLASSES = [(family, name) for family, names in SUPPORTED_FAMILIES.items() for name in names]
FAMILY_MODEL = {"ViT": "ViTForImageClassification", "DeiT": "DeiTForImageClassificationWithTeacher",
                "DINOv2": "Dinov2Model", "Swin": "SwinForImageClassification"}  # fmt: skip


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize(("family", "name"), CLASSES)
def test_trace_is_exact_and_keeps_the_output_structure(family, name, attn):
    model = hf_model(name, attn)
    assert is_hf_model(model)
    gm = fxquant.trace(model)
    x = images(3, SIZES[family], seed=2)  # traced on two images: the batch size stays free
    expected = model(x)
    got = gm(x)
    assert isinstance(got, dict) and list(got) == list(expected.keys())
    for key in got:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-5)
    assert model.config._attn_implementation == attn  # the user's model is untouched


def test_traced_graph_has_timm_vocabulary_and_size_guard():
    gm = fxquant.trace(hf_model("ViTModel", "eager"))
    leaves = {type(gm.get_submodule(str(n.target))) for n in gm.graph.nodes if n.op == "call_module"}
    assert {nn.Linear, nn.Conv2d, nn.LayerNorm} <= leaves
    linears = [str(n.target) for n in gm.graph.nodes if n.op == "call_module" and "proj" in str(n.target)]
    assert sum(is_separate_qkv(p) for p in linears) == 6  # 2 layers x Q, K, V
    with pytest.raises(Exception, match="traced for 32x32 images"):
        gm(images(1, 48))


def _point_before(gm: fx.GraphModule, node):
    while isinstance(node, fx.Node):
        module = gm.get_submodule(str(node.target)) if node.op == "call_module" else None
        if isinstance(module, (FakeQuantize, LogIntSoftmax)):
            return module
        if not is_scale_transparent(gm, node):
            return None
        node = node.args[0]
    return None


def _unquantized(qm: fx.GraphModule, backend: str, probs_float: bool) -> list[str]:
    """Every Linear/Conv must hold a quantized weight and every attention matmul must read
    quantized operands (fake backend; on the int backend the matmuls are integer modules),
    except the softmax probabilities where the preset keeps them float (w8a8, as on timm)."""
    missing = []
    for node in qm.graph.nodes:
        module = qm.get_submodule(str(node.target)) if node.op == "call_module" else None
        if type(module) in (nn.Linear, nn.Conv2d):
            missing.append(f"{node.name}: float {type(module).__name__}")
        if backend == "fake" and is_matmul(node):
            inputs = [a for a in node.args[:2] if not (probs_float and is_softmax(qm, a))]
            missing += [f"{node.name}: input {a.name}" for a in inputs if _point_before(qm, a) is None]
    return missing


def _attention_matmuls(qm: fx.GraphModule) -> int:
    """Fake: matmul nodes; int: the integer attention modules that replace them."""
    count = sum(1 for n in qm.graph.nodes if is_matmul(n))
    names = [str(n.target) for n in qm.graph.nodes if n.op == "call_module"]
    return count + sum(1 for t in names if re.search(r"fxq_(int|shift)_matmul", t))


@pytest.mark.parametrize("backend", ["fake", "int"])
@pytest.mark.parametrize("preset", ["w8a8", "fqvit_w8a8", "int8_all"])
@pytest.mark.parametrize("family", list(SUPPORTED_FAMILIES))
def test_every_family_compiles_fully_quantized(family, preset, backend, tmp_path):
    model = hf_model(FAMILY_MODEL[family])
    calib = images(8, SIZES[family])
    # int: the portable graph, whose IntLinear and integer attention matmuls are counted below
    kernels = {"int_kernels": "portable"} if backend == "int" else {}
    qm = fxquant.compile(model, preset, calib_data=calib, backend=backend, progress=False, **kernels)
    out = qm(images(2, SIZES[family], seed=3))
    assert isinstance(out, dict) and list(out) == list(model(calib[:2]).keys())
    assert all(torch.isfinite(v).all() for v in out.values())
    report = qm.report
    assert report.passes[0].output_qsnr_db > 60  # tracing is exact
    assert len(report.passes) >= 10 and all(r.output_qsnr_db is not None for r in report.passes[1:])
    assert report.passes[-1].output_qsnr_db > 5
    assert _unquantized(qm, backend, probs_float=preset == "w8a8") == []
    attentions = sum(1 for name, _ in model.named_modules() if name.endswith("attention.q_proj"))
    assert attentions and _attention_matmuls(qm) == 2 * attentions  # q@kT and attn@v of every attention
    if backend == "int":
        assert not any("attn_scores): float matmul" in f for f in report.float_points), report.float_points
        assert any(isinstance(m, IntLinear) for m in qm.modules())
    else:
        assert any(isinstance(m, (QuantLinear, QuantConv2d)) for m in qm.modules())
    assert any("nothing to split" in note for note in report.notes)
    if preset == "w8a8" and backend == "fake":  # the graph saves and loads like a timm one
        x = images(2, SIZES[family], seed=6)
        loaded = fxquant.load(fxquant.save(qm, tmp_path / "model.fxq"))
        for key, value in qm(x).items():
            torch.testing.assert_close(loaded(x)[key], value)


def _groups(qm) -> dict[str, int]:
    counts: dict[str, int] = {}
    for entry in qm.report.passes[-1].nodes:
        if entry.get("group"):
            counts[entry["group"]] = counts.get(entry["group"], 0) + 1
    return counts


@pytest.mark.parametrize("preset", ["w8a8", "int8_all"])
def test_hf_vit_gets_the_groups_of_its_timm_twin(preset):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    twin = timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=4, num_classes=10
    ).eval()
    calib = images(4, 32)
    ours = _groups(fxquant.compile(hf_model("ViTForImageClassification"), preset, calib_data=calib, progress=False))
    theirs = _groups(fxquant.compile(twin, preset, calib_data=calib, progress=False))
    assert ours == theirs


@pytest.mark.parametrize(
    ("path", "group"),
    [
        ("vit.encoder.layer.3.attention.attention.query", "attn_qkv"),  # transformers 4 names
        ("vit.encoder.layer.3.attention.output.dense", "attn_proj"),
        ("vit.encoder.layer.3.intermediate.dense", "mlp_fc1"),
        ("vit.encoder.layer.3.output.dense", "mlp_fc2"),
        ("swin.encoder.layers.0.blocks.1.attention.self.value", "attn_qkv"),
        ("swin.encoder.layers.0.blocks.1.output.dense", "mlp_fc2"),
        ("vit.layers.0.attention.k_proj", "attn_qkv"),  # transformers 5 names
        ("vit.layers.0.attention.o_proj", "attn_proj"),
        ("vit.embeddings.patch_embeddings.projection", "patch_embed"),
        ("distillation_classifier", "head"),
        ("vit.pooler.dense", "head"),
    ],
)
def test_linear_names_of_both_transformers_generations(path, group):
    assert next(g for pattern, g in HF_LINEAR_RULES if pattern.search(path)) == group


def test_norm_names():
    found = {p: next((g for pattern, g in HF_NORM_RULES if pattern.search(p)), None) for p in
             ("vit.layers.0.layernorm_before", "vit.layers.0.layernorm_after", "dinov2.layernorm", "layernorm",
              "swin.embeddings.norm")}  # fmt: skip
    assert list(found.values()) == ["norm1", "norm2", "final_norm", "final_norm", None]


def test_head_wise_qkv_weights_get_one_group_per_head():
    config = fxquant.load_qconfig("w8a8").to_dict()
    config["attn_qkv"] = {"weight": {"bits": 8, "signed": True, "calibration_mode": "head_wise"}}
    qm = fxquant.compile(hf_model("ViTModel"), config, calib_data=images(4, 32), progress=False)
    weights = [m for n, m in qm.named_modules() if isinstance(m, QuantLinear) and is_separate_qkv(n)]
    assert len(weights) == 6 and all(m.point.num_groups == 4 for m in weights)
    assert all(m.weight_qparams.scale.unique().numel() == 4 for m in weights)  # one scale per head


def test_save_load_onnx_and_diff(tmp_path):
    onnx = pytest.importorskip("onnxruntime")
    model = hf_model("DeiTForImageClassificationWithTeacher")
    calib, x = images(8, 32), images(2, 32, seed=4)
    qm = fxquant.compile(model, "w8a8", calib_data=calib, progress=False)
    loaded = fxquant.load(fxquant.save(qm, tmp_path / "deit.fxq"))
    for key, value in qm(x).items():
        torch.testing.assert_close(loaded(x)[key], value)
    path = fxquant.export_onnx(qm, tmp_path / "deit.onnx", x)
    session = onnx.InferenceSession(str(path))
    assert [o.name for o in session.get_outputs()] == ["logits", "cls_logits", "distillation_logits"]
    logits = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert (
        torch.nn.functional.cosine_similarity(torch.from_numpy(logits).flatten(), qm(x)["logits"].flatten(), 0) > 0.99
    )
    result = fxquant.diff(model, "w8a8", calib_data=calib)
    assert result.rows and any(row["module"].endswith("attention.q_proj") for row in result.rows)


def test_untraceable_architecture_names_class_module_and_families():
    config = transformers.ViTMAEConfig(**VIT)
    with pytest.raises(TraceError) as info:
        fxquant.compile(transformers.ViTMAEModel(config).eval(), "w8a8", calib_data=images(2, 32), progress=False)
    message = str(info.value)
    assert "ViTMAEModel" in message and "'embeddings' (ViTMAEEmbeddings)" in message
    assert all(f"{family}:" in message for family in SUPPORTED_FAMILIES)


def test_data_dependent_branch_is_refused():
    class Gated(transformers.ViTModel):
        def forward(self, pixel_values, **kwargs):
            if pixel_values.mean() > 0:  # a branch on values, not shapes
                pixel_values = -pixel_values
            return super().forward(pixel_values, **kwargs)

    torch.manual_seed(0)
    with pytest.raises(TraceError, match="Gated.*data-dependent.*ViT: ViTModel"):
        fxquant.trace(Gated(_config("ViT")).eval())


def test_wrong_image_size_is_refused_before_tracing():
    with pytest.raises(FxqError, match="32x32"):
        fxquant.compile(hf_model("ViTModel"), "w8a8", calib_data=images(2, 48), progress=False)


def test_cli_compiles_a_save_pretrained_folder(tmp_path):
    pytest.importorskip("safetensors")
    from fxquant.cli import main

    model = hf_model("Dinov2ForImageClassification", seed=3)
    model.save_pretrained(tmp_path / "dino")
    report, saved = tmp_path / "report.json", tmp_path / "model.fxq"
    code = main(["compile", "--hf-config", str(tmp_path / "dino"), "--calib", "random:4", "--quiet",
                 "--report", str(report), "--save", str(saved)])  # fmt: skip
    assert code == 0
    assert json.loads(report.read_text())["model"] == "Dinov2ForImageClassification"
    x = images(2, 28)
    loaded = fxquant.load(saved)
    assert set(loaded(x)) == {"logits"}
    # the folder's weights were loaded, not a random init
    fp32 = model(x).logits
    assert torch.nn.functional.cosine_similarity(loaded(x)["logits"].flatten(), fp32.flatten(), 0) > 0.9


def test_cli_config_file_with_weights_and_bad_combinations(tmp_path, capsys):
    pytest.importorskip("safetensors")
    from safetensors.torch import save_file

    from fxquant.cli import main

    model = hf_model("ViTModel", seed=4)
    model.config.to_json_file(tmp_path / "config.json")
    save_file(model.state_dict(), tmp_path / "w.safetensors")
    args = ["compile", "--hf-config", str(tmp_path / "config.json"), "--calib", "random:2", "--quiet"]
    assert main([*args, "--hf-weights", str(tmp_path / "w.safetensors"), "--no-diff"]) == 0
    assert "ViTModel" in capsys.readouterr().out
    assert main([*args, "--model", "vit_tiny_patch16_224"]) == 2
    assert "not allowed with argument" in capsys.readouterr().err
    assert main([*args, "--hf-weights", str(tmp_path / "missing.safetensors")]) == 2
    assert "--hf-weights" in capsys.readouterr().err


@pytest.mark.parametrize("family", ["ViT", "DINOv2"])
def test_timm_twin_with_the_same_weights_gives_the_same_answer(family):
    """The same weights in timm and in transformers: the same FP32 features, and w8a8
    compiles them to the same quantized features (bench/hf_twins.py does it on real DINOv2)."""
    timm = pytest.importorskip("timm")
    from bench.hf_twins import _features, hf_dinov2_twin, hf_vit_twin

    torch.manual_seed(0)
    if family == "ViT":
        twin = timm.create_model("vit_base_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=64,
                                 num_heads=4, num_classes=0).eval()  # fmt: skip
        model, size = hf_vit_twin(twin), 32
    else:
        twin = timm.create_model("vit_small_patch14_dinov2", img_size=28, depth=2, embed_dim=64, num_heads=4,
                                 num_classes=0, init_values=0.1).eval()  # fmt: skip
        model, size = hf_dinov2_twin(twin), 28
    calib, x = images(8, size), images(4, size, seed=7)
    torch.testing.assert_close(_features(model(x)), twin(x), rtol=1e-5, atol=1e-5)
    ours = _features(fxquant.compile(model, "w8a8", calib_data=calib, diff_inputs=x[:1], progress=False)(x))
    theirs = fxquant.compile(twin, "w8a8", calib_data=calib, diff_inputs=x[:1], progress=False)(x)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_cli_reads_the_image_processor_settings(tmp_path):
    from fxquant.cli.hf_model import hf_data_config

    model = hf_model("Dinov2Model")
    processor = {"do_center_crop": True, "crop_size": {"height": 224, "width": 224}, "size": {"shortest_edge": 256},
                 "image_mean": [0.5, 0.5, 0.5], "image_std": [0.2, 0.2, 0.2], "resample": 3}  # fmt: skip
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(processor))
    config = hf_data_config(model, str(tmp_path))
    assert config["input_size"] == (3, 224, 224) and config["crop_pct"] == 224 / 256
    assert config["mean"] == (0.5, 0.5, 0.5) and config["interpolation"] == "bicubic"
    assert hf_data_config(model, str(tmp_path / "none"))["input_size"] == (3, 28, 28)  # the config's size
