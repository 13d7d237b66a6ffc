"""Keys of ``node.meta`` that fxquant passes read and write, and small accessors.

Keeping the key names in one module means a pass never spells them by hand.
"""

from __future__ import annotations

from typing import Optional

import torch.fx as fx

ORIGIN = "fxq.origin"  # name of the FP32 reference node this node computes
ORIGIN_SLICE = "fxq.origin_slice"  # (dim, start, length): this node is a slice of its origin
MODULE = "fxq.module"  # dotted path of the user's module this node belongs to
POINT = "fxq.point"  # QuantPoint: this node's output is a quantization point
INPUT_POINT = "fxq.input_point"  # QuantPoint: this op's first input is quantized on the edge into it
WEIGHT = "fxq.weight"  # QuantPoint: this call_module node's weight is quantized
ROLE = "fxq.role"  # attention role, e.g. "attn_q", "attn_scores", "attn_probs"
CODES_OF = "fxq.codes_of"  # integer graph: (FakeQuantize node name in the fake graph, code shift) of these codes


def origin(node: fx.Node) -> Optional[str]:
    return node.meta.get(ORIGIN)


def module_path(node: fx.Node) -> str:
    return node.meta.get(MODULE, "")


def copy_provenance(src: fx.Node, dst: fx.Node) -> None:
    """Give ``dst`` the origin and module of ``src`` (it computes the same value)."""
    for key in (ORIGIN, ORIGIN_SLICE, MODULE):
        if key in src.meta:
            dst.meta[key] = src.meta[key]
        else:
            dst.meta.pop(key, None)


def stamp_origins(graph: fx.Graph) -> None:
    """Every node without provenance computes itself: origin = its own name."""
    for node in graph.nodes:
        node.meta.setdefault(ORIGIN, node.name)
        if MODULE not in node.meta:
            node.meta[MODULE] = _module_from_stack(node)


def _module_from_stack(node: fx.Node) -> str:
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1]
        return str(path[0] if isinstance(path, tuple) else path)
    return ""
