"""gptq: re-round each quantized weight with GPTQ, on inputs from the graph quantized so far.

Runs after ``lower_fake_quant`` when the qconfig says ``gptq:`` (see
fxquant.quant.recovery_config). The calibration batches go through the fake-quant graph
once, node by node (fxquant.ir.sequential): before each QuantLinear/QuantConv2d its input
Gram matrix ``H = X^T X`` is accumulated in float64 over all calibration tokens (a conv's
input is unfolded to patch columns), and the layer's weight is quantized again from its
float original by GPTQ (fxquant.quant.gptq), with scales from an H-weighted error search;
the layer then runs with the new weight, so every later layer's H sees the upstream
layers' GPTQ weights and the activations' fake quantization. The module keeps its type:
new codes and QParams, so the integer backend lowers it like any other. With
``group_size`` the scales are per group of input columns, which only the fake backend can
run (the pass refuses ``backend="int"``).

Notes: per layer, the H-weighted output error (per calibration token) of the weight
before (round-to-nearest, as lower_fake_quant left it) and after GPTQ, and the time.
"""

from __future__ import annotations

import time

import torch
import torch.fx as fx

from fxquant.errors import FxqError, NodeError
from fxquant.infra.contracts import Contract, Prop
from fxquant.infra.layerwise import run_layer_by_layer
from fxquant.infra.pass_manager import Pass, PassContext
from fxquant.quant import distributed
from fxquant.quant.gptq import GptqResult, gptq_quantize, weighted_error
from fxquant.quant.recovery_config import GptqConfig
from fxquant.runtime.fake_quant import QuantConv2d, observer_nodes, weight_input_columns

#: granularities whose scale GPTQ chooses itself; others keep lower_fake_quant's QParams
SEARCHED = {"channel_wise": True, "layer_wise": False}


def _install(module, result: GptqResult) -> None:
    """The GPTQ codes into the quantized module in place (buffers keep their dtype)."""
    with torch.no_grad():
        module.weight_codes.copy_(result.codes.reshape(module.weight_codes.shape))
        module.weight.copy_(result.weight.reshape(module.weight.shape))
    if result.qparams is not None:
        module.weight_qparams = result.qparams
    else:  # group-wise: fake backend only (the integer backend and ONNX export read weight_qparams)
        module.weight_group_qparams = result.group_qparams
        module.weight_group_size = result.group_size


class Gptq(Pass):
    name = "gptq"
    # after the fake-quant graph is final (every upstream error is in the inputs it sees), before
    # integer lowering (which reads the weights' codes and QParams)
    contract = Contract(
        requires={Prop.FAKE_QUANT}, provides={Prop.GPTQ_ROUNDED}, excludes={Prop.INTEGER, Prop.BIAS_CORRECTED}
    )

    def requires(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        config = ctx.qconfig.recovery.get("gptq")
        if config is None:
            return
        if ctx.calib_data is None:
            raise FxqError("gptq needs calib_data: an iterable of image batches")
        left = [node.name for node, _ in observer_nodes(gm)]
        if left:
            raise NodeError(left[0], "gptq runs on the fake-quant graph: run lower_fake_quant first")
        if config.group_size is not None and ctx.report is not None and ctx.report.backend == "int":
            raise FxqError(
                f"gptq.group_size {config.group_size}: group-wise weight scales run on backend='fake' only; "
                "the integer backend lowers one weight scale per output channel: set gptq.group_size to null"
            )

    @torch.no_grad()
    def run(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        config: GptqConfig | None = ctx.qconfig.recovery.get("gptq")
        if config is None:
            return gm

        def layer(node: fx.Node, inputs: list) -> None:
            record = self._layer(gm, node, inputs, config)
            ctx.note(
                f"gptq {node.name}: H-weighted weight error {record['error_before']:.4g} -> "
                f"{record['error_after']:.4g} ({record['tokens']} tokens, {record['seconds']:.2f} s)"
            )

        run_layer_by_layer(gm, ctx, "gptq", layer)
        return gm

    @staticmethod
    def _layer(gm: fx.GraphModule, node: fx.Node, inputs: list, config: GptqConfig) -> dict:
        start = time.perf_counter()
        module = gm.get_submodule(str(node.target))
        if isinstance(module, QuantConv2d) and module.groups != 1:
            raise NodeError(node.name, f"gptq handles convolutions with groups=1 only, this one has {module.groups}")
        spec = module.point.spec
        if spec.method != "uniform":
            raise NodeError(node.name, f"gptq rounds to a uniform grid; this weight is quantized {spec.method}")
        float_weight = module.float_weight.reshape(module.float_weight.shape[0], -1)
        h = torch.zeros(float_weight.shape[1], float_weight.shape[1], dtype=torch.float64)
        tokens = 0
        for x in inputs:
            cols = weight_input_columns(module, x).to(torch.float64)
            h.addmm_(cols.T, cols)
            tokens += cols.shape[0]
        if distributed.is_distributed():  # each rank saw its shard: the whole set's H on every rank
            torch.distributed.all_reduce(h)
            tokens = int(distributed.reduce_sums({"tokens": float(tokens)})["tokens"])
        before = module.weight.reshape(float_weight.shape)
        searched = SEARCHED.get(spec.granularity)
        try:
            result = gptq_quantize(
                float_weight,
                h,
                spec,
                config,
                qparams=None if searched is not None else module.weight_qparams,
                per_channel=bool(searched),
            )
        except FxqError as exc:
            raise NodeError(node.name, str(exc)) from None
        record = {
            "node": node.name,
            "tokens": tokens,
            "error_before": weighted_error(float_weight, before, h) / tokens,
            "error_after": weighted_error(float_weight, result.weight, h) / tokens,
            "damp": result.damp_used,
        }
        _install(module, result)
        record["seconds"] = time.perf_counter() - start
        return record
