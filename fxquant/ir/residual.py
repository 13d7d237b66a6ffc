"""The residual stream of a pre-LayerNorm transformer, found in the graph.

A pre-LN block reads the stream through a LayerNorm and writes back with an add:
``x = x + branch(norm(x))``. :func:`find_residual_stream` walks back from the last
LayerNorm to the embedding and returns who writes the stream (the embedding's parameters
and patch projection, each branch's last Linear with its LayerScale) and who reads it (the
LayerNorms), or the reason the graph has no such stream. Passes that change the stream's
basis (``rotate``) act on exactly these nodes.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
import torch.fx as fx
from torch import nn

from fxquant.ir.patterns import is_pass_through_module, reads_shape_only, submodule

_ADDS = (operator.add, torch.add)
_LAYOUT_METHODS = {"flatten", "transpose", "permute", "reshape", "view", "contiguous", "expand"}


@dataclass
class Writer:
    """A branch's last Linear, optionally scaled per channel (LayerScale) before the add."""

    linear: fx.Node
    layer_scales: list  # get_attr nodes of the per-channel factors between the Linear and the add
    add: fx.Node


@dataclass
class ResidualStream:
    width: int  # channels of the stream (its last dimension)
    source: fx.Node  # the stream's first value (the embedding's output)
    adds: list  # residual adds, in graph order
    writers: list  # Writer per residual add
    embed_params: list  # get_attr nodes added into the stream by the embedding (cls token, pos embed)
    embed_linears: list  # Conv2d/Linear nodes whose output channels are the stream's (patch projection)
    readers: list  # LayerNorm nodes whose output feeds Linears (norm1, norm2, ...)
    final_norm: fx.Node  # the last LayerNorm: the model's output side
    stream_nodes: set = field(default_factory=set)  # every node holding the stream's value


def _layer_norm(gm: fx.GraphModule, node: fx.Node) -> Optional[nn.LayerNorm]:
    module = submodule(gm, node)
    return module if isinstance(module, nn.LayerNorm) else None


def _is_add(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in _ADDS and len(node.args) == 2


def _ancestors(node: fx.Node, limit: int = 100_000) -> set:
    seen, todo = set(), [node]
    while todo and len(seen) < limit:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        todo.extend(n.all_input_nodes)
    return seen


def selects_tokens(node: fx.Node) -> bool:
    """Token pooling that keeps the channel (last) dimension as it is: ``x[:, 0]``,
    ``x[:, 1:]``, ``x.mean(dim=1)``."""
    if node.op == "call_function" and node.target is operator.getitem:
        index = node.args[1]
        if not isinstance(index, tuple):
            return isinstance(index, (int, slice))
        if len(index) == 3 and index[2] == slice(None):  # x[:, 0, :]
            index = index[:2]
        return len(index) < 3 and not any(i is Ellipsis or i is None for i in index)
    if node.op == "call_method" and node.target == "mean":
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
        return dim == 1 or dim == (1,)
    return False


def _through_pass_through(gm: fx.GraphModule, node: fx.Node, chain: set) -> fx.Node:
    while is_pass_through_module(gm, node) and isinstance(node.args[0], fx.Node):
        chain.add(node)
        node = node.args[0]
    return node


def _writer(gm: fx.GraphModule, branch: fx.Node, add: fx.Node, width: int) -> Union[Writer, str]:
    node, scales = branch, []
    while True:
        if is_pass_through_module(gm, node):
            node = node.args[0]
            continue
        if node.op == "call_function" and node.target in (operator.mul, torch.mul):
            a, b = node.args[:2]
            attr = b if isinstance(b, fx.Node) and b.op == "get_attr" else a if isinstance(a, fx.Node) else None
            other = a if attr is b else b
            if attr is not None and attr.op == "get_attr" and isinstance(other, fx.Node):
                value = attr_tensor(gm, attr)
                if value is not None and value.dim() == 1 and value.numel() == width:
                    scales.append(attr)
                    node = other
                    continue
            return f"{node.name}: a product on the branch into {add.name} that is not a per-channel LayerScale"
        break
    if not isinstance(submodule(gm, node), nn.Linear) or len(node.users) != 1:
        return f"{add.name}: the branch it adds does not end in a Linear read only by it (found {node.name})"
    return Writer(node, scales, add)


def attr_tensor(gm: fx.GraphModule, node: fx.Node) -> Optional[torch.Tensor]:
    """The parameter or buffer a ``get_attr`` node reads (None when it is neither)."""
    try:
        value = gm.get_parameter(str(node.target))
    except AttributeError:
        try:
            value = gm.get_buffer(str(node.target))
        except AttributeError:
            return None
    return value


def _embedding(gm: fx.GraphModule, source: fx.Node, width: int, params: list, linears: list) -> Optional[str]:
    """Collect what writes the embedding's value: parameters whose last dimension is the
    stream's channels, and the patch projection; anything else is a reason to refuse."""
    todo, seen = [source], set()
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        module = submodule(gm, node)
        if node.op == "get_attr":
            value = attr_tensor(gm, node)
            if value is None or value.shape[-1] != width:
                return f"{node.name}: an embedding tensor whose last dimension is not the stream's {width} channels"
            params.append(node)
        elif isinstance(module, (nn.Conv2d, nn.Linear)):
            out = module.out_channels if isinstance(module, nn.Conv2d) else module.out_features
            if out != width:
                return f"{node.name}: a projection into the stream with {out} outputs, not {width}"
            linears.append(node)
        elif is_pass_through_module(gm, node) or _is_add(node):
            todo.extend(a for a in node.args if isinstance(a, fx.Node))
        elif node.op == "call_function" and node.target is torch.cat:
            dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
            if dim in (-1,):
                return f"{node.name}: concatenates along the channel dimension"
            todo.extend(a for a in node.args[0] if isinstance(a, fx.Node))
        elif node.op == "call_method" and node.target in _LAYOUT_METHODS:
            todo.append(node.args[0])
        else:
            return f"{node.name}: the embedding computes {node.target} before the first block (not a linear layout op)"
    return None


def find_residual_stream(gm: fx.GraphModule) -> Union[ResidualStream, str]:
    """The stream, or a sentence saying why this graph has none fxquant can rotate."""
    norms = [n for n in gm.graph.nodes if _layer_norm(gm, n) is not None]
    if not norms:
        return "the model has no LayerNorm"
    final = norms[-1]
    chain: set = set()
    node = final.args[0]
    while is_pass_through_module(gm, node) or selects_tokens(node):  # the head's pooling before a fc_norm
        chain.add(node)
        node = node.args[0]
    adds: list = []
    while _is_add(node):
        a, b = node.args
        if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
            break
        stream, branch = (a, b) if a in _ancestors(b) else (b, a) if b in _ancestors(a) else (None, None)
        if stream is None:
            break
        adds.append((node, branch))
        chain.add(node)
        node = _through_pass_through(gm, stream, chain)
    if not adds:
        return f"no residual add feeds the last LayerNorm {final.name}"
    adds.reverse()
    width = _layer_norm(gm, final).normalized_shape
    if len(width) != 1:
        return f"{final.name}: normalizes over {tuple(width)}, not one channel dimension"
    width = int(width[0])
    source = node
    chain.add(source)
    writers = []
    for add, branch in adds:
        writer = _writer(gm, branch, add, width)
        if isinstance(writer, str):
            return writer
        writers.append(writer)
    params: list = []
    linears: list = []
    reason = _embedding(gm, source, width, params, linears)
    if reason is not None:
        return reason
    if not linears:
        return f"{source.name}: no patch projection found in the embedding"
    readers = []
    for stream_node in sorted(chain, key=_order(gm)):
        for user in stream_node.users:
            if user in chain or reads_shape_only(user) or user is final:
                continue
            norm = _layer_norm(gm, user)
            if norm is None:
                return f"{user.name} reads the residual stream ({stream_node.name}) without a LayerNorm"
            if tuple(norm.normalized_shape) != (width,):
                return f"{user.name}: a LayerNorm over {tuple(norm.normalized_shape)} on the stream"
            consumers = [u for u in user.users if not reads_shape_only(u)]
            if not consumers or any(
                not isinstance(submodule(gm, c), nn.Linear) or c.args[0] is not user for c in consumers
            ):
                return f"{user.name}: a LayerNorm on the stream whose output feeds something other than Linears"
            readers.append(user)
    if tuple(_layer_norm(gm, final).normalized_shape) != (width,):
        return f"{final.name}: the final LayerNorm does not normalize the stream's {width} channels"
    return ResidualStream(
        width=width,
        source=source,
        adds=[a for a, _ in adds],
        writers=writers,
        embed_params=params,
        embed_linears=linears,
        readers=readers,
        final_norm=final,
        stream_nodes=chain,
    )


def _order(gm: fx.GraphModule):
    index = {n: i for i, n in enumerate(gm.graph.nodes)}
    return lambda n: index[n]
