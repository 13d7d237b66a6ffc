"""Benchmark models: the Fashion-MNIST ViT builder, its committed checkpoint, the linear probe."""

import json
import os

import pytest
import torch

from bench.linear_probe import LinearProbe, train_probe
from bench.real_data import FASHION_DIR
from bench.train_fashion_vit import ARCH, CHECKPOINT, build_fashion_vit, load_fashion_vit

HAS_CHECKPOINT = os.path.isfile(CHECKPOINT)
HAS_FASHION = os.path.isfile(
    os.path.join(os.environ.get("FASHION_MNIST_DIR", FASHION_DIR), "t10k-images-idx3-ubyte.gz")
)


def test_builder_shapes_and_size():
    torch.manual_seed(0)
    model = build_fashion_vit().eval()
    assert model.patch_embed.patch_size == (ARCH["patch_size"],) * 2
    with torch.no_grad():
        out = model(torch.randn(3, 1, 28, 28))
    assert out.shape == (3, 10)
    assert sum(p.numel() for p in model.parameters()) * 4 < 4e6  # a few MB as float32


def test_builder_traces_and_quantizes():
    import fxquant

    torch.manual_seed(0)
    model = build_fashion_vit(depth=1).eval()
    x = torch.randn(8, 1, 28, 28)
    qm = fxquant.compile(model, "w8a8", calib_data=x, progress=False)
    with torch.no_grad():
        assert qm(x).shape == (8, 10)


@pytest.mark.skipif(not HAS_CHECKPOINT, reason="python -m bench.train_fashion_vit")
def test_checkpoint_loads_and_is_small():
    assert os.path.getsize(CHECKPOINT) < 5e6
    model = load_fashion_vit()
    assert not model.training
    meta = json.load(open(os.path.splitext(CHECKPOINT)[0] + ".json"))
    assert meta["test_top1"] >= 0.88 and meta["train_seconds"] <= 15 * 60


@pytest.mark.skipif(not (HAS_CHECKPOINT and HAS_FASHION), reason="checkpoint or Fashion-MNIST absent")
def test_checkpoint_accuracy_on_test_subset():
    from bench.real_data import fashion_mnist

    x, y = fashion_mnist("test", limit=500)
    with torch.no_grad():
        acc = float((load_fashion_vit()(x).argmax(1) == y).float().mean())
    assert acc > 0.84  # 500 images: the 10k figure (>= 88 %) minus a sampling margin


def test_linear_probe_separable_data():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 16, generator=g) * 4
    labels = torch.arange(300) % 3
    feats = centers[labels] + torch.randn(300, 16, generator=g)
    probe, l2, scores = train_probe(feats, labels)
    assert isinstance(probe, LinearProbe) and l2 in scores
    with torch.no_grad():
        assert float((probe(feats).argmax(1) == labels).float().mean()) > 0.97
