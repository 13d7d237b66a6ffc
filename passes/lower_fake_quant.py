"""lower_fake_quant: observers become frozen fake-quant nodes; weights are quantized once.

Each annotated Linear/Conv2d is replaced by a QuantLinear/QuantConv2d holding integer
codes and QParams; its float weight is derived from the codes exactly once. A module
that is already quantized is refused: quantizing a quantized weight again is the bug
the seed document spent days on.
"""

from __future__ import annotations

import torch.fx as fx
from torch import nn

from fxquant.errors import NodeError
from fxquant.infra.contracts import Contract, Prop
from fxquant.infra.pass_manager import Pass, PassContext
from fxquant.ir.meta import WEIGHT
from fxquant.quant.observers import make_observer
from fxquant.quant.points import QuantPoint
from fxquant.quant.qparams import QParams
from fxquant.runtime.fake_quant import (
    QUANTIZED_WEIGHT_TYPES,
    FakeQuantize,
    ObserverModule,
    QuantConv2d,
    QuantLinear,
    observer_nodes,
)


def weight_qparams(weight, point: QuantPoint, name: str) -> QParams:
    spec = point.spec
    if spec.observer == "omse":  # a weight is small and known exactly: search on all of it
        spec = spec.with_(
            options={**spec.options, "omse_total_samples": weight.numel(), "omse_group_samples": weight.numel()}
        )
    observer = make_observer(spec, name=name, **point.observer_kwargs())
    observer.update(weight.detach())
    return observer.compute_qparams()


def quantize_weight_module(module: nn.Module, point: QuantPoint, name: str) -> nn.Module:
    if isinstance(module, QUANTIZED_WEIGHT_TYPES):
        raise NodeError(
            name,
            "weight is already quantized; quantizing it again would stack two "
            "roundings on the same weight (the seed's double-quantization bug)",
        )
    qparams = weight_qparams(module.weight, point, f"{name} ({point.label})")
    if isinstance(module, nn.Linear):
        return QuantLinear(module, point, qparams)
    if isinstance(module, nn.Conv2d):
        return QuantConv2d(module, point, qparams)
    raise NodeError(name, f"cannot quantize the weight of a {type(module).__name__}")


class LowerFakeQuant(Pass):
    name = "lower_fake_quant"
    contract = Contract(requires={Prop.CALIBRATED}, provides={Prop.FAKE_QUANT}, removes={Prop.OBSERVED})

    def requires(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        for node, module in observer_nodes(gm):
            if module.observer.num_updates == 0:
                raise NodeError(
                    node.name, f"observer of {module.point.label} saw no calibration data; run the calibrate pass first"
                )

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        for node, module in observer_nodes(gm):
            ctx.current_node = node.name
            method = self._lower_observer(gm, node, module)
            if module.point.spec.method != method:
                ctx.note(f"{node.name} ({module.point.label}): {module.point.spec.method} chose {method}")
        lowered: set[str] = set()  # a module called at several nodes (CoaT's shared conv) is quantized once
        for node in gm.graph.nodes:
            point = node.meta.get(WEIGHT)
            if point is not None and node.op == "call_module" and str(node.target) not in lowered:
                ctx.current_node = node.name
                lowered.add(str(node.target))
                module = gm.get_submodule(str(node.target))
                gm.add_submodule(str(node.target), quantize_weight_module(module, point, node.name))
        return gm

    @staticmethod
    def _lower_observer(gm: fx.GraphModule, node: fx.Node, module: ObserverModule) -> str:
        try:
            qparams = module.observer.compute_qparams()
            method = module.resolved_method(qparams)  # log_adaptive: the base chosen on the calibration data
        except ValueError as exc:
            raise NodeError(node.name, str(exc)) from None
        gm.add_submodule(str(node.target), FakeQuantize(module.point, qparams, module.post_scale, method))
        return method

    def ensures(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        left = [n.name for n, _ in observer_nodes(gm)]
        if left:
            raise RuntimeError(f"observers left after lowering: {left}")
