"""Linear probe on DINOv2 ViT-S/14 features for Fashion-MNIST (a real-backbone task).

    python -m bench.linear_probe [--train 2000] [--test 2000]   # FP32 features + probe accuracy

Images: Fashion-MNIST 28x28 grey, bilinearly resized to 224, repeated to 3 channels,
normalised with ImageNet mean/std (:func:`probe_images`).  Features: the final-norm cls
token of :func:`bench.real_models.load_dinov2_vits14` (B, 384).  Head: multinomial
logistic regression in torch (standardised features, full-batch LBFGS, L2 strength chosen
on a 20 % hold-out of the training features, then refit on all of them).

The head is trained on FP32 features of training images ``0 .. n_train``; quantized
backbones are judged by the head's top-1 on their features of test images ``0 .. n_test``.
FP32 features are cached under ``bench/cache/`` (gitignored): 224 px DINOv2 on one CPU
thread runs at about 8 images/s.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

CACHE_DIR = Path(__file__).resolve().parent / "cache"
SIZE = 224
FEATURE_BATCH = 25
L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1)


def probe_images(split: str, n: int, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (n, 3, 224, 224), labels (n,)) of Fashion-MNIST ``split`` from index ``start``."""
    from bench.real_data import IMAGENET_MEAN, IMAGENET_STD, fashion_mnist

    return fashion_mnist(split, size=SIZE, channels=3, mean=IMAGENET_MEAN, std=IMAGENET_STD, limit=n, start=start)


def batched(run, x: torch.Tensor, batch: int = FEATURE_BATCH, desc: str | None = None) -> torch.Tensor:
    """``run`` over ``x`` in batches, with a progress bar; outputs concatenated (float32)."""
    from tqdm import tqdm

    outs = []
    with torch.no_grad():
        for b in tqdm(
            torch.split(x, batch), desc=desc, leave=False, mininterval=5, file=sys.stdout, disable=desc is None
        ):
            outs.append(run(b).float())
    return torch.cat(outs)


def fp32_features(model, split: str, n: int, cache: bool = True, start: int = 0):
    """(FP32 features (n, 384), labels (n,)); read from / written to ``bench/cache``."""
    path = CACHE_DIR / f"dinov2_vits14_fmnist_{split}_{start}_{n}_{SIZE}.pt"
    if cache and path.is_file():
        blob = torch.load(path, weights_only=True)
        if blob.get("torch") == str(torch.__version__):
            return blob["features"], blob["labels"]
    images, labels = probe_images(split, n, start)
    t0 = time.perf_counter()
    feats = batched(model, images, desc=f"DINOv2 FP32 features, {split} {n}")
    print(f"  FP32 features {split} {n}: {n / (time.perf_counter() - t0):.1f} images/s", flush=True)
    if cache:
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        torch.save({"features": feats, "labels": labels, "torch": str(torch.__version__)}, path)
    return feats, labels


class LinearProbe(nn.Module):
    """Standardise with the training features' mean/std, then one Linear layer."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, num_classes: int):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.linear = nn.Linear(mean.numel(), num_classes)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.linear((feats - self.mean) / self.std)


def _fit(probe: LinearProbe, x: torch.Tensor, y: torch.Tensor, l2: float, steps: int = 200) -> LinearProbe:
    nn.init.zeros_(probe.linear.weight)
    nn.init.zeros_(probe.linear.bias)
    opt = torch.optim.LBFGS(
        probe.linear.parameters(),
        lr=1,
        max_iter=steps,
        history_size=20,
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-6,
        tolerance_change=1e-9,
    )

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(probe(x), y) + l2 * probe.linear.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return probe.eval()


def train_probe(feats: torch.Tensor, labels: torch.Tensor, l2_grid=L2_GRID, seed: int = 0):
    """Logistic regression on FP32 features; returns (probe, chosen L2, hold-out accuracy per L2)."""
    feats = feats.double()
    num_classes = int(labels.max()) + 1
    mean, std = feats.mean(0), feats.std(0).clamp_min(1e-6)
    perm = torch.randperm(len(feats), generator=torch.Generator().manual_seed(seed))
    n_hold = len(feats) // 5
    hold, fit = perm[:n_hold], perm[n_hold:]
    scores = {}
    for l2 in l2_grid:
        p = _fit(LinearProbe(mean, std, num_classes).double(), feats[fit], labels[fit], l2)
        with torch.no_grad():
            scores[l2] = float((p(feats[hold]).argmax(1) == labels[hold]).float().mean())
    best = max(l2_grid, key=lambda k: (scores[k], k))
    probe = _fit(LinearProbe(mean, std, num_classes).double(), feats, labels, best)
    return probe.float(), best, scores


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", type=int, default=2000)
    ap.add_argument("--test", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-cache", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from bench.real_models import load_dinov2_vits14

    model = load_dinov2_vits14()
    xtr, ytr = fp32_features(model, "train", args.train, cache=not args.no_cache)
    xte, yte = fp32_features(model, "test", args.test, cache=not args.no_cache)
    probe, l2, scores = train_probe(xtr, ytr)
    with torch.no_grad():
        acc_tr = float((probe(xtr).argmax(1) == ytr).float().mean())
        acc = float((probe(xte).argmax(1) == yte).float().mean())
    print(f"L2 hold-out accuracy: {', '.join(f'{k:g}: {100 * v:.1f}%' for k, v in scores.items())}; chosen {l2:g}")
    print(
        f"linear probe FP32: train {100 * acc_tr:.2f}%, test {100 * acc:.2f}% "
        f"({args.train} train / {args.test} test images)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
