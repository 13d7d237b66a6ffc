"""decompose_attention: F.scaled_dot_product_attention -> q*s @ kT, (+mask), softmax, @v.

tracing already switches timm's fused attention off; this pass catches every other
module that calls SDPA, so that the scores and probabilities become quantizable nodes.
The layout matches timm's own unfused code (scale applied to q), so later passes see
one attention shape whatever the model.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from fxquant.errors import NodeError
from fxquant.infra.contracts import Contract, Prop
from fxquant.infra.pass_manager import Pass, PassContext
from fxquant.ir.graph_utils import new_node, propagate_shapes, remove_dead_nodes, shape_of
from fxquant.ir.meta import MODULE, copy_provenance

_SDPA = {F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention}
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def _sdpa_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in _SDPA]


def _bound_args(node: fx.Node) -> dict:
    bound = dict(zip(_SDPA_ARGS, node.args))
    bound.update(node.kwargs)
    return bound


class DecomposeAttention(Pass):
    name = "decompose_attention"
    neutral = True
    contract = Contract(provides={Prop.ATTENTION_EXPLICIT}, excludes={Prop.ANNOTATED})  # new nodes need points

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        nodes = _sdpa_nodes(gm)
        if not nodes:
            return gm
        propagate_shapes(gm, ctx.diff_inputs)
        for node in nodes:
            ctx.current_node = node.name
            self._decompose(gm.graph, node)
        remove_dead_nodes(gm.graph)
        return gm

    def _decompose(self, graph: fx.Graph, node: fx.Node) -> None:
        args = _bound_args(node)
        q, k, v = args["query"], args["key"], args["value"]
        if args.get("is_causal") not in (None, False):
            raise NodeError(node.name, "causal attention (is_causal=True) is not supported for ViTs")
        if args.get("dropout_p", 0.0) not in (0, 0.0):
            raise NodeError(node.name, "attention dropout must be 0 at inference; call model.eval() first")
        if args.get("enable_gqa"):
            raise NodeError(node.name, "grouped-query attention (enable_gqa=True) is not supported")
        scale = args.get("scale")
        if scale is None:
            q_shape = shape_of(q)
            if q_shape is None:
                raise NodeError(node.name, "cannot tell the head dimension of the query to compute 1/sqrt(d)")
            scale = q_shape[-1] ** -0.5
        if isinstance(scale, fx.Node):
            raise NodeError(node.name, "a tensor-valued SDPA scale is not supported; pass a Python float")
        module = node.meta.get(MODULE, "")
        with graph.inserting_before(node):
            q_scaled = new_node(graph, "call_function", operator.mul, (q, float(scale)), module=module)
            k_t = new_node(graph, "call_method", "transpose", (k, -2, -1), module=module)
            scores = new_node(graph, "call_function", operator.matmul, (q_scaled, k_t), module=module)
            mask = args.get("attn_mask")
            if isinstance(mask, fx.Node):
                scores = self._apply_mask(graph, scores, mask, module)
            probs = new_node(graph, "call_method", "softmax", (scores,), {"dim": -1}, module=module)
            out = new_node(graph, "call_function", operator.matmul, (probs, v), module=module)
        copy_provenance(node, out)
        node.replace_all_uses_with(out)
        graph.erase_node(node)

    @staticmethod
    def _apply_mask(graph: fx.Graph, scores: fx.Node, mask: fx.Node, module: str) -> fx.Node:
        meta = mask.meta.get("tensor_meta")
        if meta is not None and meta.dtype == torch.bool:
            keep_not = new_node(graph, "call_method", "logical_not", (mask,), module=module)
            return new_node(graph, "call_method", "masked_fill", (scores, keep_not, float("-inf")), module=module)
        return new_node(graph, "call_function", operator.add, (scores, mask), module=module)
