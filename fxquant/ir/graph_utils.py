"""Small graph-editing helpers shared by passes."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch.fx.passes.shape_prop import ShapeProp

from fxquant.ir.meta import MODULE, ORIGIN, ORIGIN_SLICE
from fxquant.ir.patterns import reads_shape_only


def writes_in_place(node: fx.Node) -> bool:
    """``x.add_(y)``, ``torch.relu_(x)``: the op changes its input; its result may go unread."""
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    return (
        node.op in ("call_method", "call_function")
        and isinstance(name, str)
        and name.endswith("_")
        and not name.startswith("__")
    )


def remove_dead_nodes(graph: fx.Graph) -> bool:
    """``graph.eliminate_dead_code()`` that keeps in-place ops whose results nobody reads
    (NaFlexViT adds its position embedding with ``x.add_(...)``); True when a node was removed."""
    return graph.eliminate_dead_code(is_impure_node=lambda n: n.is_impure() or writes_in_place(n))


def propagate_shapes(gm: fx.GraphModule, inputs: tuple) -> None:
    """Fill ``node.meta['tensor_meta']`` by running the graph once on ``inputs``."""
    with torch.no_grad():
        ShapeProp(gm).propagate(*inputs)


def shape_of(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def new_node(
    graph: fx.Graph,
    op: str,
    target: Any,
    args: tuple,
    kwargs: dict | None = None,
    *,
    module: str = "",
    origin: str | None = None,
) -> fx.Node:
    """Create a node at the graph's current insertion point with fxquant provenance.

    Without ``origin`` the node computes a value the reference graph does not have: it
    is its own origin and is not paired in the diff.
    """
    node = graph.create_node(op, target, args, kwargs or {})
    node.meta[MODULE] = module
    node.meta[ORIGIN] = origin if origin is not None else node.name
    return node


def unique_attr(gm: fx.GraphModule, base: str) -> str:
    """A free dotted attribute path on ``gm`` starting with ``base``."""
    name, i = base, 1
    while _has_attr_path(gm, name):
        name = f"{base}_{i}"
        i += 1
    return name


def _has_attr_path(root: torch.nn.Module, path: str) -> bool:
    obj: Any = root
    for part in path.split("."):
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True


def install_submodule(gm: fx.GraphModule, path: str, module: torch.nn.Module) -> None:
    if not gm.add_submodule(path, module):
        raise RuntimeError(f"could not add submodule '{path}'")


def safe_name(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text)


def mark_changed_values(producers, stops, tag: str) -> None:
    """A neutral pass rescaled or rotated values: the nodes from each of ``producers`` up to
    (not including) ``stops``, where the original values return, get the origin
    ``<name>@<tag>`` so the diff pairs them with themselves instead of the FP32 reference.
    Shape reads and the graph output are not followed."""
    stops = set(stops)
    todo, seen = list(producers), set()
    while todo:
        node = todo.pop()
        if node in seen or node in stops:
            continue
        seen.add(node)
        node.meta[ORIGIN] = f"{node.name}@{tag}"
        node.meta.pop(ORIGIN_SLICE, None)
        todo.extend(u for u in node.users if u.op != "output" and not reads_shape_only(u))
