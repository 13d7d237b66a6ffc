"""bias_correction: give each quantized layer back the mean its weight rounding took away.

Round-to-nearest (or GPTQ) weights shift every output channel's mean a little, and a
shifted mean passes through LayerNorm-free paths (the residual stream) into every later
block. With ``bias_correction: true`` each QuantLinear/QuantConv2d gets, per output channel,

    bias += E[x] @ (W_float - W_quantized)^T

where E[x] is the mean over all calibration tokens of the input it receives in the
quantized graph (a conv's input as patch columns). On the calibration data the layer's mean
output is then exactly the float weight's on the same inputs. Layers are corrected in graph
order on the quantized graph (fxquant.ir.sequential), so each sees its upstream layers'
corrected outputs. Runs on the fake-quant graph after ``gptq`` (when on) and before integer
lowering, which folds the new bias into the int32 bias like any other.

Notes: per layer, the largest correction relative to the bias's own magnitude. The bias
before correction is kept (``float_bias``, not saved), so a point turned back to float by
fxquant.debug / ``keep_float`` computes exactly the float layer.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

from fxquant.errors import FxqError, NodeError
from fxquant.infra.contracts import Contract, Prop
from fxquant.infra.layerwise import run_layer_by_layer
from fxquant.infra.pass_manager import Pass, PassContext
from fxquant.quant import distributed
from fxquant.runtime.fake_quant import observer_nodes, weight_input_columns


def correction(module: nn.Module, inputs: list) -> torch.Tensor:
    """``E[x] @ (W_float - W_quantized)^T`` over every token of ``inputs`` (float64)."""
    total, tokens = None, 0
    for x in inputs:
        cols = weight_input_columns(module, x).to(torch.float64)
        part = cols.sum(dim=0)
        total = part if total is None else total + part
        tokens += cols.shape[0]
    sums = {"tokens": float(tokens)}
    if distributed.is_distributed():  # each rank saw its shard: the whole set's mean on every rank
        torch.distributed.all_reduce(total)
        tokens = int(distributed.reduce_sums(sums)["tokens"])
    out = module.float_weight.shape[0]
    delta = (module.float_weight.reshape(out, -1) - module.weight.reshape(out, -1)).to(torch.float64)
    return delta @ (total / max(tokens, 1))


class BiasCorrection(Pass):
    name = "bias_correction"
    # on the final fake-quant weights (after gptq, which would re-round them), before the
    # integer lowering folds biases into int32
    contract = Contract(requires={Prop.FAKE_QUANT}, provides={Prop.BIAS_CORRECTED}, excludes={Prop.INTEGER})

    def requires(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        if not ctx.qconfig.recovery.get("bias_correction"):
            return
        if ctx.calib_data is None:
            raise FxqError("bias_correction needs calib_data: an iterable of image batches")
        left = [node.name for node, _ in observer_nodes(gm)]
        if left:
            raise NodeError(left[0], "bias_correction runs on the fake-quant graph: run lower_fake_quant first")

    @torch.no_grad()
    def run(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        if not ctx.qconfig.recovery.get("bias_correction"):
            return gm

        def layer(node: fx.Node, inputs: list) -> None:
            module = gm.get_submodule(str(node.target))
            shift = correction(module, inputs)
            biggest = float(shift.abs().max())
            if getattr(module, "float_bias", None) is None:  # what fxquant.debug's float stand-in restores
                before = module.bias.detach().clone() if module.bias is not None else torch.zeros_like(shift)
                module.register_buffer("float_bias", before.to(module.weight.dtype), persistent=False)
            if module.bias is None:
                module.bias = nn.Parameter(shift.to(module.weight.dtype))
                versus = "the layer had no bias"
            else:
                versus = f"largest |bias| {float(module.bias.detach().abs().max()):.3g}"
                module.bias.add_(shift.to(module.bias.dtype))
            ctx.note(f"bias_correction {node.name}: largest |shift| {biggest:.3g} ({versus})")

        run_layer_by_layer(gm, ctx, "bias_correction", layer)
        return gm
