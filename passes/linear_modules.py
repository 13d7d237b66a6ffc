"""linear_modules: ``F.linear`` on a module's own weight becomes a call of an ``nn.Linear``.

BEiT, EVA and Swin-V2 compute their qkv as ``F.linear(x, self.qkv.weight, cat(q_bias,
k_bias, v_bias))``: the bias is built at run time (there is no k bias, a zero buffer or
``zeros_like`` stands in for it) and the fused Linear's own ``forward`` is never called.
A graph node of that form carries no module, so annotate cannot give its weight a group and
split_qkv cannot split it: a quarter of such a model's weights stayed float and nothing said
so. In eval mode that bias depends on parameters and buffers only, so it is evaluated once
and the call becomes ``call_module`` of an ``nn.Linear`` at the weight's owner path
(``blocks.0.attn.qkv``) holding the weight and the folded bias; from there on the graph
is the ordinary timm qkv that annotate and split_qkv know. Numerically neutral.

An ``F.linear`` whose weight or bias depends on the model's input stays as it is (noted).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import skip_init

from fxquant.infra.contracts import Contract, Prop
from fxquant.infra.pass_manager import Pass, PassContext
from fxquant.ir.graph_utils import install_submodule, new_node, unique_attr
from fxquant.ir.meta import ORIGIN

_LINEAR = {F.linear, torch._C._nn.linear}


def _fetch(gm: fx.GraphModule, target: str) -> Any:
    value: Any = gm
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _constant(gm: fx.GraphModule, node: Any, memo: dict) -> Optional[Any]:
    """The value of ``node`` when it depends on parameters, buffers and literals only
    (``get_attr`` and pure calls on them); None when it reads the model's input."""
    if isinstance(node, (list, tuple)):
        values = [_constant(gm, a, memo) for a in node]
        return None if any(v is None and a is not None for v, a in zip(values, node)) else type(node)(values)
    if not isinstance(node, fx.Node):
        return node
    if node in memo:
        return memo[node]
    value = None
    if node.op == "get_attr":
        value = _fetch(gm, str(node.target))
    elif node.op in ("call_function", "call_method"):
        args = _constant(gm, list(node.args), memo)
        kwargs = {k: _constant(gm, v, memo) for k, v in node.kwargs.items()}
        known = args is not None and all(v is not None or node.kwargs[k] is None for k, v in kwargs.items())
        if known:
            with torch.no_grad():
                if node.op == "call_function":
                    value = node.target(*args, **kwargs)
                else:
                    value = getattr(args[0], str(node.target))(*args[1:], **kwargs)
    memo[node] = value
    return value


def _operands(node: fx.Node) -> tuple[Any, Any, Any]:
    names = ("input", "weight", "bias")
    bound = dict(zip(names, node.args))
    bound.update({k: v for k, v in node.kwargs.items() if k in names})
    return bound.get("input"), bound.get("weight"), bound.get("bias")


def _owner_path(weight: fx.Node) -> str:
    """``blocks.0.attn.qkv`` for the weight ``blocks.0.attn.qkv.weight``."""
    parent, _, leaf = str(weight.target).rpartition(".")
    if leaf == "weight" and parent:
        return parent
    return f"{parent}.{leaf}_linear" if parent else f"{leaf}_linear"


def _erase_with_unused_inputs(graph: fx.Graph, node: fx.Node) -> None:
    """Erase ``node``, then whatever computed only its operands (the bias ``cat``, the weight's
    ``get_attr``). Not ``eliminate_dead_code``: it would also drop a model's in-place ops
    (NaFlexViT's ``x.add_(pos_embed)``), whose results nobody reads."""
    todo = [node]
    while todo:
        dead = todo.pop()
        if dead.users or dead.op not in ("call_function", "call_method", "get_attr"):
            continue
        inputs = dead.all_input_nodes
        graph.erase_node(dead)
        todo.extend(inputs)


class LinearModules(Pass):
    name = "linear_modules"
    neutral = True
    # annotate finds Linears by module; a call_module created after it would carry no group
    contract = Contract(provides={Prop.LINEARS_AS_MODULES}, excludes={Prop.ANNOTATED})

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        memo: dict = {}
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target not in _LINEAR:
                continue
            ctx.current_node = node.name
            x, weight_node, bias_node = _operands(node)
            weight = _constant(gm, weight_node, memo) if isinstance(weight_node, fx.Node) else None
            bias = _constant(gm, bias_node, memo)
            if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or (bias_node is not None and bias is None):
                ctx.note(f"{node.name}: F.linear with a weight or bias computed from the input stays functional")
                continue
            path = self._install(gm, weight_node, weight, bias)
            with gm.graph.inserting_before(node):
                call = new_node(gm.graph, "call_module", path, (x,), module=path, origin=node.meta.get(ORIGIN))
            node.replace_all_uses_with(call)
            _erase_with_unused_inputs(gm.graph, node)
            ctx.note(
                f"{node.name}: F.linear on {weight_node.target}"
                + (" with a bias built at run time (folded)" if isinstance(bias_node, fx.Node) else "")
                + f" is now the Linear '{path}'"
            )
        gm.delete_all_unused_submodules()
        gm.recompile()
        return gm

    @staticmethod
    def _install(gm: fx.GraphModule, weight_node: fx.Node, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> str:
        out_features, in_features = weight.shape
        # skip_init: no random initialisation (it would advance the user's global RNG)
        linear = skip_init(
            nn.Linear, in_features, out_features, bias=bias is not None, device=weight.device, dtype=weight.dtype
        )
        with torch.no_grad():
            linear.weight.copy_(weight)
            if bias is not None:
                linear.bias.copy_(bias)
        path = _owner_path(weight_node)
        try:
            current = gm.get_submodule(path)
        except AttributeError:
            current = None
        called = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
        # the owner is an empty shell fx made to hold the weight, or the Linear itself when nothing calls it
        if current is not None and (path in called or any(True for _ in current.children())):
            path = unique_attr(gm, f"{path}_linear")
        install_submodule(gm, path, linear)
        return path
