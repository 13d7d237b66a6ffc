"""Folding what does not depend on the input into constants, after tracing a transformers model.

transformers computes some tensors from shapes alone at run time: Swin builds its
shifted-window attention mask from ``torch.arange(height)`` on every call, where timm keeps it
as a buffer. The HF tracer records every node's value on two example batches of different
sizes and whether it reads the input's values or a parameter; a node that reads neither and
has the same value on both batches is a constant of the graph: a tensor becomes a buffer
(``fxq_const_<node>``), a number a literal. What the batch size changes, and anything computed
from a parameter (Swin's ``relative_position_bias_table`` lookup), stays in the graph.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch.fx.node import map_aggregate

_SCALARS = (int, float, bool)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b))
    return isinstance(a, _SCALARS) and type(a) is type(b) and a == b


def _substitute(user: fx.Node, node: fx.Node, value: Any) -> None:
    def swap(arg):
        return value if arg is node else arg

    user.args = map_aggregate(user.args, swap)
    user.kwargs = map_aggregate(user.kwargs, swap)


_RESHAPES = {"view", "reshape"}


def drop_noop_reshapes(gm: fx.GraphModule, first: str, second: str) -> int:
    """Remove views and reshapes that keep their input's shape on both example batches
    (transformers' SDPA wrapper reshapes its output to the shape it has): the shape reads they
    need (``attn_output.shape[0]``) go with them, so attn@V has one reader, as on timm."""
    removed = 0
    for node in list(gm.graph.nodes):
        is_reshape = (node.op == "call_method" and node.target in _RESHAPES) or (
            node.op == "call_function" and node.target is torch.reshape
        )
        source = node.args[0] if is_reshape and node.args else None
        if not isinstance(source, fx.Node):
            continue
        same = all(
            isinstance(node.meta.get(key), torch.Tensor)
            and isinstance(source.meta.get(key), torch.Tensor)
            and node.meta[key].shape == source.meta[key].shape
            for key in (first, second)
        )
        if same:
            node.replace_all_uses_with(source)
            gm.graph.erase_node(node)
            removed += 1
    gm.graph.eliminate_dead_code()
    return removed


def fold_constants(gm: fx.GraphModule, first: str, second: str, varies: str) -> int:
    """Replace the constant nodes of ``gm`` read by non-constant ones (see the module
    docstring); ``first``/``second``/``varies`` name the node.meta keys the tracer filled.
    Returns how many values were folded."""
    constant: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method") or node.target is torch._assert:
            continue
        value = node.meta.get(first)
        if not node.meta.get(varies, True) and _same(value, node.meta.get(second)):
            constant.add(node)
    folded = 0
    for node in list(gm.graph.nodes):
        if node not in constant or all(user in constant for user in node.users):
            continue
        value = node.meta[first]
        if isinstance(value, torch.Tensor):
            name = f"fxq_const_{node.name}"
            gm.register_buffer(name, value.detach().clone())
            with gm.graph.inserting_before(node):
                buffer = gm.graph.get_attr(name)
            buffer.meta.update({k: v for k, v in node.meta.items() if k not in (first, second)})
            node.replace_all_uses_with(buffer)
        else:
            for user in list(node.users):
                _substitute(user, node, value)
        folded += 1
    gm.graph.eliminate_dead_code()
    return folded
