"""Train a small timm ViT on Fashion-MNIST on the CPU (one thread, seeded).

    python -m bench.train_fashion_vit [--epochs 5] [--out bench/checkpoints/fashion_vit.safetensors]

The model is timm's ``vit_tiny_patch16_224`` architecture re-sized for 28x28 grey
images: patch 4 (7x7 = 49 patches + cls token), width 96, 5 blocks, 4 heads, MLP
ratio 2, 10 classes, final LayerNorm then the mean of the patch tokens
(:func:`build_fashion_vit`).  AdamW with a linear warm-up and a cosine decay, batch 64,
no augmentation (a first try with width 128, 4 blocks, cls-token pooling, flips, batch
128 and 5 epochs reached 86.8 % in 727 s: under-trained, so more, cheaper steps).  Writes the state dict as
safetensors plus a JSON file beside it with the measured test top-1 and train time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

CHECKPOINT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoints", "fashion_vit.safetensors")
ARCH = dict(
    img_size=28,
    patch_size=4,
    in_chans=1,
    embed_dim=96,
    depth=5,
    num_heads=4,
    mlp_ratio=2.0,
    num_classes=10,
    global_pool="avg",
    fc_norm=False,
)


def build_fashion_vit(**overrides) -> torch.nn.Module:
    """The Fashion-MNIST ViT (random init); ``overrides`` change :data:`ARCH` entries."""
    import timm

    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **{**ARCH, **overrides})


def load_fashion_vit(path: str = CHECKPOINT) -> torch.nn.Module:
    """The trained model from its safetensors checkpoint, in eval mode."""
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: python -m bench.train_fashion_vit")
    model = build_fashion_vit()
    model.load_state_dict(load_file(path), strict=True)
    return model.eval()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@torch.no_grad()
def evaluate(model, images, labels, batch_size: int = 1000) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(images), batch_size):
        correct += (model(images[i : i + batch_size]).argmax(1) == labels[i : i + batch_size]).sum().item()
    return correct / len(images)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=7)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--limit", type=int, default=None, help="train images (default: all 60k)")
    p.add_argument("--flip", action="store_true", help="random horizontal flips")
    p.add_argument("--out", default=CHECKPOINT)
    args = p.parse_args(argv)

    from safetensors.torch import save_file
    from tqdm import tqdm

    from bench.real_data import fashion_mnist

    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    x_train, y_train = fashion_mnist("train", limit=args.limit)
    x_test, y_test = fashion_mnist("test")
    model = build_fashion_vit()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = math.ceil(len(x_train) / args.batch_size)
    total, warmup = args.epochs * steps_per_epoch, steps_per_epoch // 2
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup)))
        ),
    )
    gen = torch.Generator().manual_seed(args.seed)

    t0 = time.perf_counter()
    history = []
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(x_train), generator=gen)
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{args.epochs}", mininterval=10, file=sys.stdout)
        running = 0.0
        for step in bar:
            idx = order[step * args.batch_size : (step + 1) * args.batch_size]
            x, y = x_train[idx], y_train[idx]
            if args.flip:
                flip = torch.rand(len(x), generator=gen) < 0.5
                x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            running = 0.98 * running + 0.02 * loss.item() if step else loss.item()
            if step % 50 == 0:
                bar.set_postfix(loss=f"{running:.3f}")
        last = epoch + 1 == args.epochs
        acc = evaluate(model, x_test, y_test) if last else evaluate(model, x_test[:2000], y_test[:2000])
        elapsed = time.perf_counter() - t0
        history.append(
            {
                "epoch": epoch + 1,
                "test_images": len(x_test) if last else 2000,
                "test_top1": acc,
                "seconds": round(elapsed, 1),
            }
        )
        print(
            f"epoch {epoch + 1}: loss {running:.4f}  test top-1 {100 * acc:.2f}% "
            f"({history[-1]['test_images']} images)  {elapsed:.0f} s",
            flush=True,
        )
    train_seconds = time.perf_counter() - t0

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, args.out)
    meta = {
        "arch": "vit_tiny_patch16_224",
        "arch_kwargs": ARCH,
        "test_top1": history[-1]["test_top1"],
        "train_seconds": round(train_seconds, 1),
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "seed": args.seed,
        "threads": args.threads,
        "train_images": len(x_train),
        "test_images": len(x_test),
        "history": history,
        "command": "python -m bench.train_fashion_vit " + " ".join(argv or sys.argv[1:]),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
    }
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump(meta, f, indent=1)
    print(
        f"saved {args.out} ({os.path.getsize(args.out) / 1e6:.1f} MB): test top-1 "
        f"{100 * meta['test_top1']:.2f}% after {train_seconds:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
