"""Running the calibration data through a quantized graph one quantized layer at a time.

The passes that rework a layer from the inputs it receives in the quantized graph (``gptq``,
``bias_correction``) share this: every QuantLinear/QuantConv2d node, in graph order, is handed
its inputs for all calibration batches just before it runs (fxquant.ir.sequential), so a
change made to it reaches every later layer's inputs. One progress bar, one layer per step.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.fx as fx
from tqdm.auto import tqdm

from fxquant.errors import FxqError
from fxquant.infra.pass_manager import PassContext
from fxquant.ir.sequential import run_sequential
from fxquant.quant.calib_data import as_batches, iter_batches
from fxquant.runtime.fake_quant import QUANTIZED_WEIGHT_TYPES

LayerFn = Callable[[fx.Node, list], None]  # (layer node, its input for every calibration batch)


def quantized_layer_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [
        node
        for node in gm.graph.nodes
        if node.op == "call_module" and isinstance(gm.get_submodule(str(node.target)), QUANTIZED_WEIGHT_TYPES)
    ]


@torch.no_grad()
def run_layer_by_layer(gm: fx.GraphModule, ctx: PassContext, desc: str, on_layer: LayerFn) -> int:
    """Call ``on_layer`` before each quantized layer runs; returns how many layers there were."""
    targets = quantized_layer_nodes(gm)
    if not targets:
        return 0
    batches = [(batch,) for batch in iter_batches(as_batches(ctx.calib_data))]
    if not batches:
        raise FxqError("calib_data yielded no batches")
    bar = tqdm(total=len(targets), desc=desc, unit="layer", disable=not ctx.progress, leave=False)

    def hook(node: fx.Node, per_batch: list) -> None:
        ctx.current_node = node.name
        bar.set_postfix_str(node.name)
        on_layer(node, [args[0] for args, _ in per_batch])
        bar.update(1)

    try:
        run_sequential(gm, batches, {node.name: hook for node in targets})
    finally:
        bar.close()
    return len(targets)
