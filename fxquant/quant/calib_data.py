"""Calibration data in every form users give it, turned into batches of image tensors.

Shared by ``compile``, the passes that read the data (smooth, calibrate) and ``fxquant.debug``.

Every batch is checked as it is read (:func:`iter_batches`): it must be a floating-point
tensor of at least two dimensions holding at least one image, and all batches must hold
images of one shape (the batch sizes may differ). Integer and bool tensors (uint8 images
straight from a decoder, say) are refused, not cast: calibration measures the ranges of
what the model will see in deployment, and a silent ``float()`` of 0..255 pixels would
calibrate every point for inputs the normalized model never gets.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Iterable, Iterator, Optional

import torch

from fxquant.errors import FxqError

CALIB_BATCH = 8  # images per batch when calib_data is one (N, C, H, W) tensor

_CONVERT_HINT = (
    "convert the images the way the model's preprocessing does (e.g. x.float() / 255, then "
    "normalize with the model's mean and std) and pass float tensors"
)


def _refuse_dtype(what: str, tensor: torch.Tensor) -> None:
    if not tensor.is_floating_point():
        raise FxqError(
            f"{what} is a {tensor.dtype} tensor of shape {tuple(tensor.shape)}; fxquant calibrates on "
            f"exactly what the model will be given and does not guess a scaling for "
            f"{'bool' if tensor.dtype == torch.bool else 'integer'} data: {_CONVERT_HINT}"
        )


def as_batches(calib_data) -> Iterable:
    """An (N, C, H, W) tensor is split into batches of CALIB_BATCH; iterables pass as they are."""
    if isinstance(calib_data, torch.Tensor):
        if calib_data.dim() < 2:
            raise FxqError(f"calib_data tensor has shape {tuple(calib_data.shape)}; expected (N, C, H, W)")
        if calib_data.shape[0] == 0:
            raise FxqError(f"calib_data is empty: a tensor of shape {tuple(calib_data.shape)} holds no images")
        _refuse_dtype("calib_data", calib_data)
        return list(torch.split(calib_data, CALIB_BATCH))
    if isinstance(calib_data, (str, bytes)):
        raise FxqError(
            f"calib_data is a {type(calib_data).__name__} ({calib_data[:60]!r}); pass the images: a tensor, "
            "an iterable of tensors or (tensor, label) pairs, or a DataLoader (the CLI's --calib reads "
            "a directory)"
        )
    if isinstance(calib_data, Mapping):
        raise FxqError(
            "calib_data is a dict; pass a list of batches (tensors, (tensor, label) pairs or dicts with "
            "an 'image' tensor) or a DataLoader"
        )
    if calib_data is None or not hasattr(calib_data, "__iter__"):
        raise FxqError("calib_data must be a tensor, an iterable of tensors or (tensor, label) pairs, or a DataLoader")
    return calib_data


def _unwrap(item: Any, index: int) -> torch.Tensor:
    batch: Any = item
    if isinstance(item, (tuple, list)):
        batch = item[0] if item else None
        if not isinstance(batch, torch.Tensor):
            kind = type(batch).__name__
            first = "nothing" if not item else f"{'an' if kind[0] in 'aeiouAEIOU' else 'a'} {kind}"
            raise FxqError(
                f"calib_data item {index} is a {type(item).__name__} whose first element is {first}; "
                "expected a tensor, a (tensor, label) pair or a dict with an 'image' tensor"
            )
    elif isinstance(item, Mapping):
        batch = item.get("image", item.get("pixel_values"))
        if not isinstance(batch, torch.Tensor):
            raise FxqError(
                f"calib_data item {index} is a dict without an 'image' (or 'pixel_values') tensor "
                f"(keys: {', '.join(map(str, item)) or 'none'})"
            )
    if not isinstance(batch, torch.Tensor):
        raise FxqError(
            f"calib_data item {index} is {type(item).__name__}; expected a tensor, "
            "a (tensor, label) pair or a dict with an 'image' tensor"
        )
    return batch


def check_batch(
    batch: torch.Tensor, index: int, image_shape: Optional[tuple] = None, what: str = "calib_data batch"
) -> None:
    """Refuse a batch fxquant cannot calibrate on, naming it (``what`` ``index``) and the fix.

    ``image_shape``: the per-image shape (``batch.shape[1:]``) the batches before it had.
    """
    name = f"{what} {index}"
    if batch.dim() < 2:
        raise FxqError(f"{name} has shape {tuple(batch.shape)}; expected a batch of images (N, C, H, W)")
    if batch.shape[0] == 0:
        raise FxqError(
            f"{name} holds no images (shape {tuple(batch.shape)}); remove empty batches from "
            "calib_data (a DataLoader with drop_last=True, or filter them out)"
        )
    _refuse_dtype(name, batch)
    if image_shape is not None and tuple(batch.shape[1:]) != tuple(image_shape):
        raise FxqError(
            f"{name} holds images of shape {tuple(batch.shape[1:])} but batch 0 holds "
            f"{tuple(image_shape)}; all calibration images must have one shape (resize them to the "
            "model's input size; batch sizes may differ)"
        )


def iter_batches(calib_data: Iterable) -> Iterator[torch.Tensor]:
    """Tensors, (tensor, label) pairs, dicts with 'image', or a DataLoader of those, each
    checked by :func:`check_batch` (all batches hold images of the first batch's shape)."""
    image_shape = None
    for index, item in enumerate(calib_data):
        batch = _unwrap(item, index)
        check_batch(batch, index, image_shape)
        image_shape = tuple(batch.shape[1:])
        yield batch


def reusable_batches(calib_data) -> tuple[torch.Tensor, Iterable]:
    """(first batch, data that can be read more than once). A one-shot iterator (a generator)
    is read into a list once: several passes (smooth, calibrate) go over the data. Data held
    in memory (a tensor, list or tuple) is checked batch by batch here, before any tracing or
    calibration; a DataLoader or other re-iterable source is checked as the passes read it."""
    calib_data = as_batches(calib_data)
    if iter(calib_data) is calib_data:
        calib_data = list(calib_data)
    if isinstance(calib_data, (list, tuple)):
        batches = list(iter_batches(calib_data))
        first = batches[0] if batches else None
    else:
        first = next(iter_batches(calib_data), None)
    if first is None:
        raise FxqError("calib_data is empty")
    return first, calib_data


DIFF_SEED = 123


def default_diff_inputs(example: torch.Tensor, seed: int = DIFF_SEED) -> tuple[torch.Tensor]:
    """One seeded randn image with the calibration data's shape (the seed's fixed input), in its
    dtype (float32 for a non-floating example). Its own generator: the global RNG is not used."""
    generator = torch.Generator().manual_seed(seed)
    dtype = example.dtype if example.is_floating_point() else torch.float32
    return (torch.randn((1, *example.shape[1:]), generator=generator, dtype=dtype),)
