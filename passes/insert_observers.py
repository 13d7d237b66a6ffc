"""insert_observers: after every annotated activation point, an ObserverModule node.

Observers pass values through unchanged, so the FP32 output is untouched; the point's
QuantPoint moves from the op to its observer node, which from here on is "the
quantized value" of that op (same origin, so the diff pairs it with the op's FP32 value).
"""
from __future__ import annotations

import torch.fx as fx

from fxquant.graph_utils import install_submodule, safe_name, unique_attr
from fxquant.meta import POINT, ROLE, copy_provenance
from fxquant.modules import ObserverModule
from fxquant.pass_manager import Pass, PassContext

OBSERVER_PREFIX = "fxq_"


def observer_nodes(gm: fx.GraphModule) -> list[tuple[fx.Node, ObserverModule]]:
    out = []
    for node in gm.graph.nodes:
        if node.op == "call_module" and str(node.target).startswith(OBSERVER_PREFIX):
            module = gm.get_submodule(str(node.target))
            if isinstance(module, ObserverModule):
                out.append((node, module))
    return out


class InsertObservers(Pass):
    name = "insert_observers"
    neutral = True

    def requires(self, gm, ctx):
        if observer_nodes(gm):
            raise RuntimeError("the graph already has observers; insert_observers runs once")

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        graph = gm.graph
        for node in list(graph.nodes):
            point = node.meta.get(POINT)
            if point is None:
                continue
            ctx.current_node = node.name
            path = unique_attr(gm, OBSERVER_PREFIX + safe_name(node.name))
            install_submodule(gm, path, ObserverModule(point, name=f"{node.name} ({point.label})"))
            with graph.inserting_after(node):
                observed = graph.call_module(path, (node,))
            copy_provenance(node, observed)
            observed.meta[POINT] = node.meta.pop(POINT)
            if ROLE in node.meta:
                observed.meta[ROLE] = node.meta[ROLE]
            node.replace_all_uses_with(observed, delete_user_cb=lambda user: user is not observed)
        return gm
