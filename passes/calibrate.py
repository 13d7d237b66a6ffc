"""calibrate: run the calibration data through the graph so every observer sees it."""

from __future__ import annotations

from typing import Iterable

import torch
import torch.fx as fx
from tqdm.auto import tqdm

from fxquant.errors import FxqError
from fxquant.infra.contracts import Contract, Prop
from fxquant.infra.pass_manager import Pass, PassContext
from fxquant.quant import distributed
from fxquant.quant.calib_data import as_batches, iter_batches
from fxquant.runtime.fake_quant import observer_nodes


def _length(calib_data: Iterable):
    try:
        return len(calib_data)  # type: ignore[arg-type]
    except TypeError:
        return None


class Calibrate(Pass):
    name = "calibrate"
    neutral = True
    contract = Contract(requires={Prop.OBSERVED}, provides={Prop.CALIBRATED})

    def requires(self, gm, ctx):
        if ctx.calib_data is None:
            raise FxqError("calibration needs calib_data: an iterable of image batches")

    @torch.no_grad()
    def run(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        observers = observer_nodes(gm)
        early = ctx.statistics
        ctx.statistics = None
        if (
            early is not None
            and early.adopted
            and all(early.observers.get(m.point_name) is m.observer for _, m in observers)
        ):
            ctx.note(
                f"calibration statistics gathered in {early.made_by}'s pass over the data ({early.batches} "
                "batches): the data is read once"
            )
            if distributed.is_distributed():  # each rank saw its shard: merge to the whole set's statistics
                distributed.merge_calibration([m.observer for _, m in observers], early.batches)
            return gm
        if early is not None and early.off is not None:
            ctx.note(f"the data is read again here: {early.made_by} could not calibrate the observers ({early.off})")
        calib_data = as_batches(ctx.calib_data)
        for _, module in observers:
            module.observing = True
        batches = 0
        try:
            bar = tqdm(
                iter_batches(calib_data),
                total=_length(calib_data),
                desc="calibrate",
                unit="batch",
                disable=not ctx.progress,
                leave=False,
            )
            for batch in bar:
                gm(batch)
                batches += 1
        except Exception:
            distributed.report_failure()  # under torchrun: the other ranks stop instead of waiting
            raise
        finally:
            for _, module in observers:
                module.observing = False
        if distributed.is_distributed():  # each rank saw its shard: merge to the whole set's statistics
            batches = distributed.merge_calibration([m.observer for _, m in observers], batches)
            for _, module in observers:  # log_adaptive's base search: every rank chooses from all the data
                if module.log_search is not None:
                    module.log_search.merge(distributed.reduce_sums)
        if batches == 0:
            raise FxqError("calib_data yielded no batches")
        return gm
