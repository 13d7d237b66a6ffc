"""Run a GraphModule node by node over many batches at once, with hooks before chosen nodes.

A pass that needs the statistics of each layer's inputs *as the graph computes them after
the layers before it were changed* (GPTQ: each Linear's H from inputs that already went
through the quantized layers upstream) would otherwise run the whole calibration set
through the graph once per layer. :func:`run_sequential` executes the graph node by node,
each node over every batch before the next node (node-synchronous across batches), so a
hook called before a node sees that node's arguments for all batches and may change the
node's module; the node then runs with the change. A value is freed as soon as its last
user has run. The cost is about one forward of the batches, with the values of the live
edges of all batches in memory at once.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
import torch.fx as fx

from fxquant.errors import NodeError

#: a hook gets the node and, per batch, the node's (args, kwargs) with values filled in
Hook = Callable[[fx.Node, list[tuple[tuple, dict]]], None]


def _last_uses(graph: fx.Graph) -> dict[fx.Node, list[fx.Node]]:
    """Node -> the values whose last user it is (freed after it runs)."""
    last_user: dict[fx.Node, fx.Node] = {}
    for node in graph.nodes:
        for value in node.all_input_nodes:
            last_user[value] = node
    frees: dict[fx.Node, list[fx.Node]] = {}
    for value, user in last_user.items():
        frees.setdefault(user, []).append(value)
    return frees


def _fetch_attr(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


@torch.no_grad()
def run_sequential(
    gm: fx.GraphModule,
    batches: Sequence[tuple],
    hooks: Mapping[str, Hook] | None = None,
) -> list[Any]:
    """``gm``'s output for each batch (a tuple of positional inputs), computed node by node;
    ``hooks[node.name]`` is called before that node runs, with its arguments for all batches."""
    hooks = hooks or {}
    unknown = set(hooks) - {n.name for n in gm.graph.nodes}
    if unknown:
        raise NodeError(sorted(unknown)[0], "run_sequential: hook for a node the graph does not have")
    frees = _last_uses(gm.graph)
    env: dict[fx.Node, list[Any]] = {}
    placeholder_index = 0
    outputs: list[Any] = []
    n = len(batches)
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            values = []
            for batch in batches:
                if placeholder_index < len(batch):
                    values.append(batch[placeholder_index])
                elif node.args:  # a default value
                    values.append(node.args[0])
                else:
                    raise NodeError(node.name, f"run_sequential: a batch has {len(batch)} inputs; the graph needs more")
            placeholder_index += 1
            env[node] = values
            continue
        per_batch = [
            (
                fx.node.map_arg(node.args, lambda a, i=i: env[a][i]),
                fx.node.map_arg(node.kwargs, lambda a, i=i: env[a][i]),
            )
            for i in range(n)
        ]
        if node.op == "output":
            outputs = [args[0] for args, _ in per_batch]
            break
        hook = hooks.get(node.name)
        if hook is not None:
            hook(node, per_batch)
        if node.op == "get_attr":
            value = _fetch_attr(gm, str(node.target))
            env[node] = [value] * n
        elif node.op == "call_module":
            module = gm.get_submodule(str(node.target))
            env[node] = [module(*a, **k) for a, k in per_batch]
        elif node.op == "call_function":
            env[node] = [node.target(*a, **k) for a, k in per_batch]
        elif node.op == "call_method":
            env[node] = [getattr(a[0], str(node.target))(*a[1:], **k) for a, k in per_batch]
        else:
            raise NodeError(node.name, f"run_sequential: unknown node op {node.op!r}")
        del per_batch
        for value in frees.get(node, ()):
            env.pop(value, None)
    return outputs
