"""Recognising graph shapes shared by several passes: attention, scale-transparent ops."""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from fxquant.ir.meta import module_path

# Ops that move or select elements without changing values or adding any: a per-tensor
# scale passes through, and so do integer codes.
_TRANSPARENT_METHODS = {
    "reshape",
    "view",
    "permute",
    "transpose",
    "flatten",
    "contiguous",
    "unsqueeze",
    "squeeze",
    "unbind",
    "expand",
}
_TRANSPARENT_FUNCTIONS = {
    operator.getitem,
    torch.reshape,
    torch.permute,
    torch.transpose,
    torch.flatten,
    torch.squeeze,
    torch.unsqueeze,
    torch.unbind,
    torch.roll,
}
_PASS_THROUGH_MODULES = (nn.Identity, nn.Dropout)
_MATMULS = {operator.matmul, torch.matmul, torch.bmm}
_SOFTMAX_FUNCTIONS = {F.softmax, torch.softmax}


def reads_shape_only(node: fx.Node) -> bool:
    """``x.shape`` / ``x.size()`` / ``x.dim()``: uses a tensor without reading its values."""
    return (node.op == "call_function" and node.target is getattr and node.args[1] == "shape") or (
        node.op == "call_method" and node.target in ("size", "dim")
    )


def submodule(gm: fx.GraphModule, node: fx.Node) -> Optional[nn.Module]:
    if node.op != "call_module":
        return None
    return gm.get_submodule(str(node.target))


def is_pass_through_module(gm: fx.GraphModule, node: fx.Node) -> bool:
    return isinstance(submodule(gm, node), _PASS_THROUGH_MODULES)


def behind_pass_through(gm: fx.GraphModule, node) -> tuple[Optional[fx.Node], list[fx.Node]]:
    """The node ``node`` reads through pass-through modules (Identity, Dropout) only, each read
    by the next alone, and those modules, nearest first; None for the node when one of them
    takes other arguments (or ``node`` is no node)."""
    chain = []
    while isinstance(node, fx.Node) and len(node.users) == 1 and is_pass_through_module(gm, node):
        chain.append(node)
        node = node.args[0] if len(node.args) == 1 and not node.kwargs else None
    return (node if isinstance(node, fx.Node) else None), chain


def is_add_of_two_values(node: fx.Node) -> bool:
    """``a + b`` (``operator.add`` or ``torch.add``, no keywords) of two graph values."""
    return (
        node.op == "call_function"
        and node.target in (operator.add, torch.add)
        and len(node.args) == 2
        and not node.kwargs
        and all(isinstance(a, fx.Node) for a in node.args)
    )


def rearranges_elements(gm: fx.GraphModule, node: fx.Node) -> bool:
    """True when ``node`` only moves or selects elements of its first input (reshape,
    permute, getitem, roll, Dropout, ...): every output element is an input element, so
    integer codes flow through it unchanged."""
    if node.op == "call_method":
        return node.target in _TRANSPARENT_METHODS
    if node.op == "call_function":
        return node.target in _TRANSPARENT_FUNCTIONS
    return is_pass_through_module(gm, node)


def is_scale_transparent(gm: fx.GraphModule, node: fx.Node) -> bool:
    """True when ``node``'s output lies on its first input's grid: it rearranges elements
    (``rearranges_elements``) or pads with zeros (``is_zero_pad``: 0 is on every grid, the
    observers widen each range to include it). Fake-quant passes may treat such a chain as
    one value; the integer lowering may not, since a padded 0 is the zero point's code,
    not code 0 (``fxquant.lowering.code_chains.moves_elements``)."""
    return rearranges_elements(gm, node) or is_zero_pad(node)


def is_zero_pad(node: fx.Node) -> bool:
    """``F.pad`` with zeros in constant mode (Swin's window padding)."""
    if node.op != "call_function" or node.target is not F.pad:
        return False
    mode = node.kwargs.get("mode", node.args[2] if len(node.args) > 2 else "constant")
    value = node.kwargs.get("value", node.args[3] if len(node.args) > 3 else None)
    return mode == "constant" and value in (None, 0, 0.0)


def is_matmul(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _MATMULS) or (
        node.op == "call_method" and node.target == "matmul"
    )


def single_user(node: fx.Node) -> Optional[fx.Node]:
    """The one node reading ``node``; None when it has no reader or several."""
    return next(iter(node.users)) if len(node.users) == 1 else None


def softmax_dim(gm: fx.GraphModule, node: fx.Node) -> Optional[int]:
    """The dimension a softmax node (``is_softmax``) reduces over; None when not a literal int."""
    module = submodule(gm, node)
    if module is not None:  # nn.Softmax (Swin)
        return getattr(module, "dim", None)
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    return dim if isinstance(dim, int) else None


def is_softmax(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target == "softmax"
    if node.op == "call_function":
        return node.target in _SOFTMAX_FUNCTIONS
    return isinstance(submodule(gm, node), nn.Softmax)


def is_transpose_last_two(node: fx.Node) -> bool:
    is_transpose = (node.op == "call_method" and node.target == "transpose") or (
        node.op == "call_function" and node.target is torch.transpose
    )
    if not is_transpose or len(node.args) < 3:
        return False
    return set(node.args[1:3]) in ({-2, -1}, {2, 3})


def scalar_mul(node: fx.Node) -> Optional[tuple[fx.Node, float]]:
    """``x * c`` or ``c * x`` with a Python number c -> (x, c)."""
    if node.op == "call_function" and node.target in (operator.mul, torch.mul):
        a, b = node.args[:2]
        if isinstance(a, fx.Node) and isinstance(b, (int, float)) and not isinstance(b, bool):
            return a, float(b)
        if isinstance(b, fx.Node) and isinstance(a, (int, float)) and not isinstance(a, bool):
            return b, float(a)
    return None


def _permute_dims(node) -> Optional[tuple]:
    if not isinstance(node, fx.Node) or not (
        (node.op == "call_method" and node.target == "permute") or node.target is torch.permute
    ):
        return None
    dims = node.args[1:] if len(node.args) > 2 else node.args[1] if len(node.args) == 2 else ()
    return tuple(dims) if all(isinstance(d, int) for d in dims) else None


def _permuted_key(q, k: fx.Node) -> bool:
    """q and k are permutes of same-layout tensors whose last two axes come out swapped:
    ``q = t.permute(0, 2, 1, 3)``, ``k = u.permute(0, 2, 3, 1)``, so q @ k is q @ kT."""
    q_dims, k_dims = _permute_dims(q), _permute_dims(k)
    return (
        q_dims is not None
        and k_dims is not None
        and len(q_dims) == len(k_dims) >= 3
        and q_dims[:-2] == k_dims[:-2]
        and q_dims[-2:] == k_dims[-2:][::-1]
    )


@dataclass
class AttentionMatch:
    """The explicit attention of one module: softmax(q*s @ kT (+bias)) @ v (or, LeViT-conv,
    ``v @ softmax(...).transpose(-2, -1)``; ``k`` is then the already transposed key)."""

    module: str
    q: fx.Node  # the query tensor before the scale multiply (B, H, N, D)
    k: fx.Node
    v: fx.Node
    scale_mul: Optional[fx.Node]  # q * scale, when the scale is applied to q
    scale: float
    scores: fx.Node  # q @ kT
    softmax: fx.Node
    out: fx.Node  # probs @ v


def find_attention(gm: fx.GraphModule) -> list[AttentionMatch]:
    matches = []
    for node in gm.graph.nodes:
        if is_softmax(gm, node):
            match = _match_from_softmax(gm, node)
            if match is not None:
                matches.append(match)
    return matches


def _match_from_softmax(gm: fx.GraphModule, softmax: fx.Node) -> Optional[AttentionMatch]:
    scores = softmax.args[0]
    # scores may pass through bias adds, masks and views on their way to softmax
    while isinstance(scores, fx.Node) and not is_matmul(scores):
        if scores.op in ("call_function", "call_method") and scores.args and isinstance(scores.args[0], fx.Node):
            scores = scores.args[0]
        else:
            return None
    if not isinstance(scores, fx.Node):
        return None
    left, right = scores.args[:2]
    scale_mul, scale, q = None, 1.0, left
    found = scalar_mul(left) if isinstance(left, fx.Node) else None
    if found is not None:
        scale_mul = left
        q, scale = found
    if isinstance(right, fx.Node) and is_transpose_last_two(right):
        k = right.args[0]
    elif isinstance(right, fx.Node) and (_permuted_key(q, right) or is_transpose_last_two(q)):
        # LeViT: the key permuted straight to (B, H, D, N); LeViT-conv: q.transpose(-2, -1) @ k
        # with q and k both (B, H, D, N). Either way k is its own point (heads on axis 1).
        k = right
    else:
        return None
    probs = softmax
    while len(probs.users) == 1 and is_pass_through_module(gm, next(iter(probs.users))):
        probs = next(iter(probs.users))
    out = next((u for u in probs.users if is_matmul(u) and u.args[0] is probs), None)
    v = out.args[1] if out is not None else None
    if out is None:  # LeViT-conv: v @ probs.transpose(-2, -1), the output (B, H, D, N)
        turned = single_user(probs)
        out = single_user(turned) if turned is not None and is_transpose_last_two(turned) else None
        if out is None or not is_matmul(out) or out.args[1] is not turned:
            return None
        v = out.args[0]
    return AttentionMatch(
        module=module_path(scores),
        q=q,
        k=k,
        v=v,
        scale_mul=scale_mul,
        scale=scale,
        scores=scores,
        softmax=softmax,
        out=out,
    )
