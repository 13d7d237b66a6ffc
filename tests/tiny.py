"""Tiny models and helpers shared by the test files (not a test module)."""

from __future__ import annotations

import hashlib

import timm
import torch
from torch import nn

import fxquant

TINY_VIT = dict(img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=2, num_classes=10)


def images(n: int, size: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def state_hash(model: nn.Module) -> str:
    """SHA-256 of a model's state dict: proves a model was not modified."""
    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def compiled_tiny_vit(qconfig: str = "w8a8"):
    """(model, calib, qm): the seeded tiny ViT compiled on 16 seeded images."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", **TINY_VIT).eval()
    calib = images(16, 32)
    return model, calib, fxquant.compile(model, qconfig, calib_data=calib, progress=False)
