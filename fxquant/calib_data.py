"""Calibration data in every form users give it, turned into batches of image tensors.

Shared by ``compile``, the passes that read the data (smooth, calibrate) and ``fxquant.debug``.
"""
from __future__ import annotations

from typing import Any, Iterable, Iterator

import torch

from .errors import FxqError

CALIB_BATCH = 8  # images per batch when calib_data is one (N, C, H, W) tensor


def as_batches(calib_data) -> Iterable:
    """An (N, C, H, W) tensor is split into batches of CALIB_BATCH; iterables pass as they are."""
    if isinstance(calib_data, torch.Tensor):
        if calib_data.dim() < 2:
            raise FxqError(f"calib_data tensor has shape {tuple(calib_data.shape)}; expected (N, C, H, W)")
        if calib_data.shape[0] == 0:
            raise FxqError(f"calib_data is empty: a tensor of shape {tuple(calib_data.shape)} holds no images")
        return list(torch.split(calib_data, CALIB_BATCH))
    if calib_data is None or not hasattr(calib_data, "__iter__"):
        raise FxqError("calib_data must be a tensor, an iterable of tensors or (tensor, label) pairs, or a DataLoader")
    return calib_data


def iter_batches(calib_data: Iterable) -> Iterator[torch.Tensor]:
    """Tensors, (tensor, label) pairs, dicts with 'image', or a DataLoader of those."""
    for index, item in enumerate(calib_data):
        batch: Any = item
        if isinstance(item, (tuple, list)):
            batch = item[0] if item else None
        elif isinstance(item, dict):
            batch = item.get("image", item.get("pixel_values"))
        if not isinstance(batch, torch.Tensor):
            raise FxqError(f"calib_data item {index} is {type(item).__name__}; expected a tensor, "
                           "a (tensor, label) pair or a dict with an 'image' tensor")
        yield batch


def reusable_batches(calib_data) -> tuple[torch.Tensor, Iterable]:
    """(first batch, data that can be read more than once). A one-shot iterator (a generator)
    is read into a list once: several passes (smooth, calibrate) go over the data."""
    calib_data = as_batches(calib_data)
    if iter(calib_data) is calib_data:
        calib_data = list(calib_data)
    first = next(iter_batches(calib_data), None)
    if first is None:
        raise FxqError("calib_data is empty")
    return first, calib_data
