"""insert_observers: after every annotated activation point, an ObserverModule node.

Observers pass values through unchanged, so the FP32 output is untouched; the point's
QuantPoint moves from the op to its observer node, which from here on is "the
quantized value" of that op (same origin, so the diff pairs it with the op's FP32 value).
"""

from __future__ import annotations

import torch.fx as fx

from fxquant.infra.contracts import Contract, Prop
from fxquant.infra.pass_manager import Pass, PassContext
from fxquant.ir.graph_utils import install_submodule, safe_name, unique_attr
from fxquant.ir.meta import INPUT_POINT, POINT, ROLE, copy_provenance
from fxquant.quant.observers import make_observer
from fxquant.runtime.fake_quant import OBSERVER_PREFIX, ObserverModule, observer_nodes


class InsertObservers(Pass):
    name = "insert_observers"
    neutral = True
    contract = Contract(requires={Prop.ANNOTATED}, provides={Prop.OBSERVED}, excludes={Prop.FAKE_QUANT})
    keeps_statistics = True  # observers pass values through: statistics gathered before still hold

    def requires(self, gm, ctx):
        if observer_nodes(gm):
            raise RuntimeError("the graph already has observers; insert_observers runs once")

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        graph = gm.graph
        early = ctx.statistics
        self._early = early.observers if early is not None and early.off is None and not early.adopted else {}
        for node in list(graph.nodes):
            ctx.current_node = node.name
            if INPUT_POINT in node.meta:
                self._observe_input(gm, node, ctx)
            point = node.meta.get(POINT)
            if point is None:
                continue
            observed = self._observer_after(gm, node, node, point)
            node.meta.pop(POINT)
            if ROLE in node.meta:
                observed.meta[ROLE] = node.meta[ROLE]
            node.replace_all_uses_with(observed, delete_user_cb=lambda user: user is not observed)
        if self._early:
            self._check_adopted(gm, ctx)
        return gm

    @staticmethod
    def _check_adopted(gm: fx.GraphModule, ctx: PassContext) -> None:
        """Observers an earlier pass calibrated (``ctx.statistics``, smooth's) were taken for the
        points of the same name; they count only when they are exactly the observers needed here
        (``calibrate`` then skips the data), else every point gets a fresh observer."""
        early = ctx.statistics
        modules = [module for _, module in observer_nodes(gm)]
        if {m.point_name for m in modules} == set(early.observers) and len(modules) == len(early.observers):
            early.adopted = True
            return
        for module in modules:
            point = module.point
            module.observer = make_observer(point.spec, name=module.point_name, **point.observer_kwargs())
        ctx.statistics = None
        ctx.note(f"the observers {early.made_by} calibrated are not the ones inserted here: calibrate reads the data")

    def _observer_after(self, gm: fx.GraphModule, value: fx.Node, name_from: fx.Node, point) -> fx.Node:
        path = unique_attr(
            gm, OBSERVER_PREFIX + safe_name(name_from.name) + ("_in" if point.section == "input" else "")
        )
        name = f"{name_from.name} ({point.label})"
        install_submodule(gm, path, ObserverModule(point, name=name, observer=self._early.get(name)))
        with gm.graph.inserting_after(value):
            observed = gm.graph.call_module(path, (value,))
        copy_provenance(value, observed)  # it computes the value it observes
        observed.meta[POINT] = point
        return observed

    def _observe_input(self, gm: fx.GraphModule, node: fx.Node, ctx: PassContext) -> None:
        """A point on the edge into ``node`` (a LayerNorm's input): only ``node`` reads it."""
        point = node.meta.pop(INPUT_POINT)
        source = node.args[0]
        if not isinstance(source, fx.Node):
            return
        if POINT in source.meta:
            ctx.note(
                f"{node.name} ({point.label}): its input {source.name} is already the quantization point "
                f"{source.meta[POINT].label}; that point's grid is used"
            )
            return
        observed = self._observer_after(gm, source, node, point)
        node.args = (observed, *node.args[1:])
