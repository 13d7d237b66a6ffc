"""fxquant.export_onnx: QDQ ONNX that onnx.checker accepts and ONNX Runtime runs like the fake-quant graph."""

from __future__ import annotations

import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
timm = pytest.importorskip("timm")

from tiny import TINY_VIT, images  # noqa: E402

import fxquant  # noqa: E402
from fxquant.io.onnx_export import OnnxExportError, export_onnx, qdq_summary, to_exportable  # noqa: E402
from fxquant.quant.quantizers import qsnr_db  # noqa: E402

MIN_QSNR_DB = 40.0  # the acceptance bar of issue 7 (ORT output against the fake-quant graph)
INTEGER_KERNELS = {
    "QLinearMatMul",
    "MatMulIntegerToFloat",
    "MatMulInteger",
    "QGemm",
    "QLinearConv",
    "DynamicQuantizeMatMul",
    "QAttention",
}

# w8a8 plus the point kinds w8a8 does not use: log2 softmax, a per-channel activation (last
# dim), a 4-bit uniform grid in a uint8 container and a signed asymmetric (int8 zero point) one
MIXED = {
    "extends": "w8a8",
    "intSoft": {
        "bits": 4,
        "signed": False,
        "calibration_mode": "layer_wise",
        "observer_type": "MinmaxObserver",
        "quantization_method": "log2",
    },
    "residual": {
        "bits": 8,
        "signed": True,
        "symmetric": False,
        "calibration_mode": "layer_wise",
        "observer_type": "MinmaxObserver",
    },
    "mlp_gelu": {"bits": 4, "signed": False, "calibration_mode": "layer_wise", "observer_type": "MinmaxObserver"},
    "final_norm": {"bits": 8, "signed": False, "calibration_mode": "channel_wise", "observer_type": "MinmaxObserver"},
}


def _compile(name: str, kwargs: dict, qconfig, size: int = 32):
    torch.manual_seed(0)
    model = timm.create_model(name, **kwargs).eval()
    return fxquant.compile(model, qconfig, calib_data=images(8, size), progress=False, numeric_diff=False)


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    qm = _compile("vit_tiny_patch16_224", TINY_VIT, "w8a8")
    path = export_onnx(qm, tmp_path_factory.mktemp("onnx") / "vit.onnx", images(2, 32, seed=3))
    return qm, path


def _session(path, optimized=None, level=None):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    if optimized is not None:
        options.optimized_model_filepath = str(optimized)
    if level is not None:
        options.graph_optimization_level = level
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _ort_qsnr(qm, path, x, **kw) -> float:
    with torch.no_grad():
        expected = qm(x)
    got = _session(path, **kw).run(None, {"images": x.numpy()})[0]
    return qsnr_db(expected, torch.from_numpy(got))


def _initializers(path) -> dict:
    """Every constant of the graph by name: initializers and the outputs of Constant nodes."""
    graph = onnx.load(str(path)).graph
    values = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute[0].name == "value":
            values[node.output[0]] = onnx.numpy_helper.to_array(node.attribute[0].t)
    for node in graph.node:  # the exporter shares equal constants through Identity nodes
        if node.op_type == "Identity" and node.input[0] in values:
            values[node.output[0]] = values[node.input[0]]
    return values


def test_w8a8_vit_is_valid_qdq_and_matches_fake_quant(vit, tmp_path):
    qm, path = vit
    onnx.checker.check_model(str(path), full_check=True)
    ops = qdq_summary(path)
    assert ops["QuantizeLinear"] >= 10 and ops["DequantizeLinear"] > ops["QuantizeLinear"]
    x = images(3, 32, seed=11)  # another batch size than the example: the batch axis is dynamic
    optimized = tmp_path / "optimized.onnx"
    assert _ort_qsnr(qm, path, x, optimized=optimized) >= MIN_QSNR_DB
    # without graph optimizations ORT computes what torch computes, up to float rounding
    assert _ort_qsnr(qm, path, x, level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL) >= 100.0
    # ORT's QDQ fusion turns the int8 GEMMs into integer kernels
    assert INTEGER_KERNELS & set(qdq_summary(optimized)), qdq_summary(optimized)


def test_weights_are_int8_initializers_with_per_axis_dequantize(vit):
    _, path = vit
    model = onnx.load(str(path))
    inits = _initializers(path)
    weight_dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    n_weights = sum(1 for name, _ in _compile_modules(vit[0]) if name)
    assert len(weight_dq) == n_weights
    for node in weight_dq:
        codes, scale = inits[node.input[0]], inits[node.input[1]]
        assert codes.dtype.name == "int8"
        axis = {a.name: a.i for a in node.attribute}["axis"]
        assert scale.shape == (codes.shape[axis],)  # one scale per output channel


def _compile_modules(qm):
    from fxquant.runtime.fake_quant import QUANTIZED_WEIGHT_TYPES

    return [(name, m) for name, m in qm.named_modules() if isinstance(m, QUANTIZED_WEIGHT_TYPES)]


def test_head_wise_activations_are_per_axis_on_the_head_dimension(vit):
    _, path = vit
    model = onnx.load(str(path))
    inits = _initializers(path)
    per_axis = [n for n in model.graph.node if n.op_type == "QuantizeLinear" and inits[n.input[1]].ndim == 1]
    assert per_axis, "w8a8 has head-wise Q, K, V and score points"
    for node in per_axis:
        assert {a.name: a.i for a in node.attribute}["axis"] == 1  # (B, H, N, d): one scale per head
        assert inits[node.input[2]].dtype.name == "uint8"  # unsigned points use uint8 zero points
        assert inits[node.input[1]].shape == (TINY_VIT["num_heads"],)


def test_log2_narrow_and_per_channel_points(tmp_path):
    qm = _compile("vit_tiny_patch16_224", TINY_VIT, MIXED)
    path = export_onnx(qm, tmp_path / "mixed.onnx", images(2, 32, seed=3))
    ops = qdq_summary(path)
    assert {"Log", "Round", "Pow", "Clip"} <= set(ops), ops  # log2 softmax as ordinary ops
    inits = _initializers(path)
    model = onnx.load(str(path))
    zero_points = {inits[n.input[2]].dtype.name for n in model.graph.node if n.op_type == "QuantizeLinear"}
    assert zero_points == {"uint8", "int8"}  # the signed asymmetric residual uses int8
    last_axis = [
        n
        for n in model.graph.node
        if n.op_type == "QuantizeLinear"
        and inits[n.input[1]].ndim == 1
        and {a.name: a.i for a in n.attribute}["axis"] == 1
    ]
    assert last_axis, "final_norm is per channel on the last dimension of the class token (B, C) the head reads"
    assert _ort_qsnr(qm, path, images(2, 32, seed=12)) >= MIN_QSNR_DB
    with torch.no_grad():  # the export twin computes the fake-quant values in torch too
        x = images(2, 32, seed=12)
        assert qsnr_db(qm(x), to_exportable(qm)(x)) >= 100.0


def test_deit_and_loaded_models_export(tmp_path):
    deit = dict(img_size=32, patch_size=8, depth=2, embed_dim=96, num_heads=3, num_classes=10)
    qm = _compile("deit_small_patch16_224", deit, "w8a8")
    loaded = fxquant.load(fxquant.save(qm, tmp_path / "deit.fxq"))
    path = export_onnx(loaded, tmp_path / "deit.onnx", images(1, 32))
    onnx.checker.check_model(str(path), full_check=True)
    assert _ort_qsnr(qm, path, images(4, 32, seed=13)) >= MIN_QSNR_DB


def test_refuses_models_that_are_not_compiled(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", **TINY_VIT).eval()
    with pytest.raises(OnnxExportError, match="GraphModule"):
        export_onnx(model, tmp_path / "m.onnx", images(1, 32))
    with pytest.raises(OnnxExportError, match="opset"):
        export_onnx(_compile("vit_tiny_patch16_224", TINY_VIT, "w8a8"), tmp_path / "m.onnx", images(1, 32), opset=11)


def test_refuses_uncalibrated_observers(tmp_path):
    from fxquant.passes import Annotate, DecomposeAttention, InsertObservers, SplitQkv

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", **TINY_VIT).eval()
    gm = fxquant.compile(
        model,
        "w8a8",
        calib_data=images(2, 32),
        progress=False,
        numeric_diff=False,
        passes=[DecomposeAttention(), Annotate(), SplitQkv(), InsertObservers()],
    )
    with pytest.raises(OnnxExportError, match="still an observer"):
        export_onnx(gm, tmp_path / "m.onnx", images(1, 32))


class _LeafTracer(torch.fx.Tracer):
    def is_leaf_module(self, m, qualname):
        return True


@pytest.mark.parametrize(
    "spec_kw, axis",
    [
        (dict(bits=4, signed=False, method="log2"), None),  # softmax-like log2 probabilities
        (dict(bits=5, signed=True, method="log2"), None),  # signed log2: the sign as Where
        (dict(bits=4, signed=False, granularity="channel_wise"), -1),  # narrow grid, per channel: clipped first
        (dict(bits=8, signed=True, symmetric=False, granularity="channel_wise"), -1),
        (dict(bits=12, signed=False), None),  # wider than 8 bits: ordinary ops
    ],
)
def test_single_point_twin_matches_fake_quantize_in_torch_and_ort(spec_kw, axis, tmp_path):
    from fxquant.quant.observers import make_observer
    from fxquant.quant.points import QuantPoint
    from fxquant.quant.spec import QuantSpec
    from fxquant.runtime.fake_quant import FakeQuantize

    spec = QuantSpec(**spec_kw)
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0)) * 3
    if spec.method == "log2" and not spec.signed:
        x = x.softmax(-1)
    observer = make_observer(spec, axis=axis, name="p")
    observer.update(x)
    point = QuantPoint("mlp_gelu", "act", spec, "m", axis=axis)
    root = torch.nn.Module()
    root.fq = FakeQuantize(point, observer.compute_qparams(), post_scale=0.5)
    seq = torch.nn.Sequential()
    seq.add_module("fq", root.fq)
    gm = torch.fx.GraphModule(seq, _LeafTracer().trace(seq))
    y = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(1)) * 3
    if spec.method == "log2" and not spec.signed:
        y = y.softmax(-1)
    with torch.no_grad():
        expected = gm(y)
        assert torch.equal(to_exportable(gm)(y), expected)
    path = export_onnx(gm, tmp_path / "point.onnx", x)
    got = _session(path).run(None, {"images": y.numpy()})[0]
    codes_flipped = (torch.from_numpy(got) != expected).float().mean().item()
    assert codes_flipped < 0.01, codes_flipped  # at most a rare tie rounded the other way
    ops = qdq_summary(path)
    assert ("QuantizeLinear" in ops) == (spec.method == "uniform" and spec.bits <= 8), ops


def test_weight_only_linears_match_with_default_onnxruntime(tmp_path):
    # seed_attn quantizes the Q/K/V weights but not their input; keep_float leaves points in float
    qm = _compile("vit_tiny_patch16_224", TINY_VIT, "seed_attn")
    path = export_onnx(qm, tmp_path / "seed_attn.onnx", images(1, 32))
    optimized = tmp_path / "optimized.onnx"
    # ORT's MatMulNBits would quantize the float input on the fly (accuracy level 4 by default)
    assert _ort_qsnr(qm, path, images(3, 32, seed=14), optimized=optimized) >= 100.0
    assert "MatMulNBits" not in qdq_summary(optimized)
