"""calibrate: run the calibration data through the graph so every observer sees it."""
from __future__ import annotations

from typing import Any, Iterable, Iterator

import torch
import torch.fx as fx
from tqdm.auto import tqdm

from fxquant.errors import FxqError
from fxquant.pass_manager import Pass, PassContext
from fxquant.passes.insert_observers import observer_nodes


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


def as_batches(calib_data) -> Iterable:
    """N images in one tensor are split into batches as ``compile`` does; iterables pass as they are."""
    from fxquant.api import _as_batches

    return _as_batches(calib_data) if isinstance(calib_data, torch.Tensor) else calib_data


def _length(calib_data: Iterable):
    try:
        return len(calib_data)  # type: ignore[arg-type]
    except TypeError:
        return None


class Calibrate(Pass):
    name = "calibrate"
    neutral = True

    def requires(self, gm, ctx):
        if ctx.calib_data is None:
            raise FxqError("calibration needs calib_data: an iterable of image batches")

    @torch.no_grad()
    def run(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        calib_data = as_batches(ctx.calib_data)
        observers = observer_nodes(gm)
        for _, module in observers:
            module.observing = True
        batches = 0
        try:
            bar = tqdm(iter_batches(calib_data), total=_length(calib_data), desc="calibrate",
                       unit="batch", disable=not ctx.progress, leave=False)
            for batch in bar:
                gm(batch)
                batches += 1
        finally:
            for _, module in observers:
                module.observing = False
        if batches == 0:
            raise FxqError("calib_data yielded no batches")
        ctx.state["calibration_batches"] = batches
        return gm
