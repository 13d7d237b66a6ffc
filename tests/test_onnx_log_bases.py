"""ONNX export of the log quantizers of other bases: a log_sqrt2 / adaptive-base FakeQuantize
as ordinary ops, and a model whose attention probabilities are a LogBaseSoftmax."""

from __future__ import annotations

import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
timm = pytest.importorskip("timm")

from tiny import TINY_VIT, images  # noqa: E402

import fxquant  # noqa: E402
from fxquant.io.onnx_export import export_onnx, to_exportable  # noqa: E402
from fxquant.quant.observers import make_observer  # noqa: E402
from fxquant.quant.points import QuantPoint  # noqa: E402
from fxquant.quant.quantizers import qsnr_db  # noqa: E402
from fxquant.quant.spec import QuantSpec  # noqa: E402
from fxquant.runtime.fake_quant import FakeQuantize  # noqa: E402
from fxquant.runtime.log_base_softmax import LogBaseSoftmax  # noqa: E402


class _LeafTracer(torch.fx.Tracer):
    def is_leaf_module(self, m, qualname):
        return True


def _session(path):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("method, signed", [("log_sqrt2", False), ("log2^2/3", False), ("log_sqrt2", True)])
def test_point_exports_as_ordinary_ops(method, signed, tmp_path):
    spec = QuantSpec(bits=4 if not signed else 6, signed=signed, method="log_sqrt2")
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0)) * 3
    x = x if signed else x.softmax(-1)
    observer = make_observer(spec, name="p")
    observer.update(x)
    point = QuantPoint("mlp_gelu", "act", spec, "m")
    seq = torch.nn.Sequential()
    seq.add_module("fq", FakeQuantize(point, observer.compute_qparams(), post_scale=0.5, method=method))
    gm = torch.fx.GraphModule(seq, _LeafTracer().trace(seq))
    y = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(1)) * 3
    y = y if signed else y.softmax(-1)
    with torch.no_grad():
        expected = gm(y)
        torch.testing.assert_close(to_exportable(gm)(y), expected, rtol=1e-6, atol=0)
    path = export_onnx(gm, tmp_path / "point.onnx", x)
    got = torch.from_numpy(_session(path).run(None, {"images": y.numpy()})[0])
    close = torch.isclose(got, expected, rtol=1e-5, atol=1e-7).float().mean().item()
    assert close > 0.99, close  # at most a rare tie rounded the other way


def test_model_with_log_sqrt2_probabilities_exports(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", **TINY_VIT).eval()
    config = {"extends": "fqvit_w8a8", "intSoft": {"quantization_method": "log_sqrt2"}}
    qm = fxquant.compile(model, config, calib_data=images(8, 32), progress=False, numeric_diff=False)
    assert any(isinstance(m, LogBaseSoftmax) for m in qm.modules())
    path = export_onnx(qm, tmp_path / "vit.onnx", images(2, 32, seed=3))
    x = images(2, 32, seed=12)
    with torch.no_grad():
        expected = qm(x)
    got = torch.from_numpy(_session(path).run(None, {"images": x.numpy()})[0])
    assert qsnr_db(expected, got) >= 30.0
