"""Real images without a data hub.

* ``foolbox_imagenet``: the 20 ImageNet validation photos (512x512 RGB JPEGs)
  shipped in the foolbox wheel as ``foolbox/data/imagenet_NN_LABEL.jpg``
  (``pip install --no-deps foolbox==3.3.4``; foolbox itself is never imported).
* ``fashion_mnist`` / ``fashion_mnist_batches``: Debian's
  ``dataset-fashion-mnist`` idx files
  (``apt-get install dataset-fashion-mnist``), parsed here with numpy.
"""

from __future__ import annotations

import gzip
import importlib.util
import math
import os
import re
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FASHION_MEAN = (0.2860,)  # train-set pixel mean / std in [0, 1]
FASHION_STD = (0.3530,)
FASHION_DIR = "/usr/share/datasets/fashion-mnist"  # Debian; override with $FASHION_MNIST_DIR
FASHION_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


# ------------------------------------------------------------------ ImageNet
def foolbox_data_dir() -> str:
    spec = importlib.util.find_spec("foolbox")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("foolbox is not installed: pip install --no-deps foolbox==3.3.4")
    return os.path.join(list(spec.submodule_search_locations)[0], "data")


def foolbox_imagenet(size: int = 224, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """The 20 foolbox ImageNet photos with timm's standard eval transform.

    Resize the shorter side to floor(size / 0.875) (256 for 224), bicubic, then
    center-crop ``size``, scale to [0, 1], normalise with mean/std (pass
    ``mean=None`` to skip).  Returns (images (20,3,size,size) float32,
    labels (20,) int64 ImageNet class indices, file names), sorted by NN.
    """
    from PIL import Image
    from torchvision import transforms as T

    root = foolbox_data_dir()
    pat = re.compile(r"imagenet_(\d+)_(\d+)\.jpg$")
    found = sorted((int(m[1]), int(m[2]), f) for f in os.listdir(root) if (m := pat.match(f)))
    if not found:
        raise FileNotFoundError(f"no imagenet_NN_LABEL.jpg files in {root}")
    steps = [
        T.Resize(math.floor(size / 0.875), interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(size),
        T.ToTensor(),
    ]
    if mean is not None:
        steps.append(T.Normalize(mean, std))
    tf = T.Compose(steps)
    images = torch.stack([tf(Image.open(os.path.join(root, f)).convert("RGB")) for _, _, f in found])
    labels = torch.tensor([lab for _, lab, _ in found], dtype=torch.int64)
    return images, labels, [f for _, _, f in found]


# ------------------------------------------------------------------ idx files
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def parse_idx(data: bytes) -> np.ndarray:
    """Decode an idx byte string: 0, 0, dtype code, ndim, big-endian uint32 dims, data."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError("not an idx file (bad magic number)")
    ndim = data[3]
    shape = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    offset = 4 + 4 * ndim
    count = int(np.prod(shape, dtype=np.int64))
    if len(data) - offset != count * dtype.itemsize:
        raise ValueError(f"idx payload size mismatch for shape {shape}")
    return np.frombuffer(data, dtype, count=count, offset=offset).reshape(shape).astype(dtype.newbyteorder("="))


def load_idx(path: str) -> np.ndarray:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        return parse_idx(f.read())


def _fashion_raw(split: str, limit: int | None, root: str | None, start: int = 0):
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = root or os.environ.get("FASHION_MNIST_DIR", FASHION_DIR)
    prefix = "train" if split == "train" else "t10k"
    paths = [os.path.join(root, f"{prefix}-{k}-idx{n}-ubyte.gz") for k, n in (("images", 3), ("labels", 1))]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST files missing ({', '.join(missing)}): apt-get install dataset-fashion-mnist"
        )
    stop = None if limit is None else start + limit
    images, labels = (load_idx(p)[start:stop] for p in paths)
    return images, labels


def _prepare(raw: np.ndarray, size: int, channels: int, mean, std) -> torch.Tensor:
    x = torch.from_numpy(raw).float().div_(255).unsqueeze(1)  # (B,1,28,28) in [0,1]
    if size != x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    if mean is not None:
        m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        if m.shape[1] == 1:
            x = (x - m) / s
        else:  # per-channel stats: expand first
            x = (x.expand(-1, m.shape[1], -1, -1) - m) / s
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if channels == 3 and x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    return x.contiguous()


def _norm_stats(normalize, mean, std):
    if not normalize:
        return None, None
    return (mean or FASHION_MEAN), (std or FASHION_STD)


def fashion_mnist_batches(
    split: str = "test",
    batch_size: int = 256,
    size: int = 28,
    channels: int = 1,
    limit: int | None = None,
    normalize: bool = True,
    mean=None,
    std=None,
    root: str | None = None,
    start: int = 0,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (images (b,channels,size,size) float32, labels (b,) int64), resized per batch.

    ``start``/``limit``: the images ``start .. start + limit`` of the split (file order)."""
    images, labels = _fashion_raw(split, limit, root, start)
    mean, std = _norm_stats(normalize, mean, std)
    for i in range(0, len(images), batch_size):
        yield (
            _prepare(images[i : i + batch_size], size, channels, mean, std),
            torch.from_numpy(labels[i : i + batch_size].astype(np.int64)),
        )


def fashion_mnist(
    split: str = "test",
    size: int = 28,
    channels: int = 1,
    normalize: bool = True,
    limit: int | None = None,
    mean=None,
    std=None,
    root: str | None = None,
    max_bytes: int = 4 << 30,
    start: int = 0,
):
    """All of a split at once: (images (N,channels,size,size) float32, labels (N,) int64).

    Pixels are scaled to [0, 1], bilinearly resized when ``size != 28``, then (if
    ``normalize``) standardised with ``mean``/``std`` (default: Fashion-MNIST's
    0.2860/0.3530; pass ImageNet stats when feeding an ImageNet model with
    ``channels=3``).  Refuses results above ``max_bytes``: use
    :func:`fashion_mnist_batches` for large sizes.
    """
    n = min((60000 if split == "train" else 10000) - start, limit if limit is not None else 1 << 62)
    need = n * channels * size * size * 4
    if need > max_bytes:
        raise MemoryError(
            f"fashion_mnist({split!r}, size={size}, channels={channels}) needs "
            f"{need / 2**30:.1f} GiB; use fashion_mnist_batches or limit="
        )
    parts = list(fashion_mnist_batches(split, 4096, size, channels, limit, normalize, mean, std, root, start))
    if not parts:
        return torch.empty(0, channels, size, size), torch.empty(0, dtype=torch.int64)
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
