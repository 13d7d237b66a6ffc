"""The shared vocabulary of the integer lowering: a point as codes plus an explicit
dequantize (:class:`LoweredPoint`), the element-moving chains codes flow through (reshape,
permute, getitem, Dropout, roll, constant padding), how a point's scales map through such a
chain, and the clean-up of a lowered graph. ``lower_integer`` builds the integer graph with
them; ``use_onednn_kernels`` re-targets it with the same predicates."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch
import torch.fx as fx

from fxquant.ir.meta import ORIGIN, ORIGIN_SLICE, POINT
from fxquant.ir.patterns import is_softmax, is_zero_pad, rearranges_elements, submodule
from fxquant.runtime.fake_quant import FakeQuantize

_SHAPE_READS = {"size", "dim"}


@dataclass
class LoweredPoint:
    """One FakeQuantize point of the fake graph, now codes plus an explicit dequantize."""

    name: str  # the FakeQuantize node's name (in the fake graph)
    label: str
    fake_quantize: FakeQuantize
    shift: int  # codes are stored as code - shift (int8)
    shape: tuple  # the point's value shape on the diff inputs
    codes: fx.Node
    dequant: fx.Node

    @property
    def per_tensor(self) -> bool:
        return not self.fake_quantize.qparams.per_channel

    @property
    def qmin(self) -> int:
        return self.fake_quantize.qparams.qmin - self.shift

    @property
    def qmax(self) -> int:
        return self.fake_quantize.qparams.qmax - self.shift

    def scale(self, ndim: int) -> torch.Tensor:
        """Broadcast against an ``ndim``-d tensor of the point's layout (0: per-tensor only)."""
        qp = self.fake_quantize.qparams
        return (qp.broadcast_scale(ndim) if ndim else qp.scale).to(torch.float64)

    def zero_point(self, ndim: int) -> torch.Tensor:
        qp = self.fake_quantize.qparams
        return (qp.broadcast_zero_point(ndim) if ndim else qp.zero_point) - self.shift

    def magnitude(self) -> int:
        """The largest |code - zero point| this point can produce."""
        zp = self.fake_quantize.qparams.zero_point - self.shift
        return int(torch.max(torch.maximum(zp - self.qmin, self.qmax - zp)))


@dataclass
class IntegerLowering:
    """What ``lower_to_integer`` did: points lowered, ops left in float and why."""

    points: dict[str, LoweredPoint] = field(default_factory=dict)
    int_linears: list[str] = field(default_factory=list)
    int_matmuls: list[str] = field(default_factory=list)
    int_layernorms: list[str] = field(default_factory=list)
    shift_matmuls: list[str] = field(default_factory=list)  # Log-Int-Softmax + attn@V by shifts
    code_luts: list[str] = field(default_factory=list)  # activations between points as code tables
    fused_dequantize: list[str] = field(default_factory=list)  # points dequantized by one multiply-add
    requantized: list[str] = field(default_factory=list)  # "op -> point" fused requantizations
    float_points: list[str] = field(default_factory=list)
    float_boundaries: list[str] = field(default_factory=list)  # points dequantized for float ops
    nonfinite_checks: list[str] = field(default_factory=list)  # tensors checked per sample (fxquant.lowering.nonfinite)


def reads_shape(node: fx.Node) -> bool:
    """``x.shape`` / ``x.size()`` / ``x.dim()``: reads no values, so codes serve as well as floats."""
    return (node.op == "call_function" and node.target is getattr and node.args[1] == "shape") or (
        node.op == "call_method" and node.target in _SHAPE_READS
    )


def moves_elements(gm: fx.GraphModule, node: fx.Node, allow_pad: bool) -> bool:
    """True when ``node`` only rearranges its first input, so codes can flow through it.

    ``allow_pad``: a zero pad counts too. Only for a chain that ``codes_through`` copies
    onto codes (it rewrites the fill to the point's zero-point code, one zero point per
    tensor: ``trace_back`` refuses a per-channel point). A chain that an integer op's
    requantized codes travel along as they are (``lower_integer``'s fused requantization)
    passes ``allow_pad=False``: its pad would fill with code 0, which is the value
    ``-zero_point * scale`` and not 0 for an asymmetric point.
    """
    if not node.args or not isinstance(node.args[0], fx.Node):
        return False
    return rearranges_elements(gm, node) or (allow_pad and is_zero_pad(node))


def selection_to_point(gm: fx.GraphModule, node: fx.Node, by_codes: dict) -> list[fx.Node]:
    """The element-moving ops (``x[:, 0]``, Dropout) from ``node`` to the point (a key of
    ``by_codes``) its only chain of readers ends in; empty when ``node`` feeds that point
    directly, or reaches anything else."""
    chain = []
    while len(node.users) == 1:
        user = next(iter(node.users))
        if user in by_codes:
            return chain
        if not moves_elements(gm, user, allow_pad=False) or user.args[0] is not node:
            return []
        chain.append(user)
        node = user
    return []


def trace_back(gm: fx.GraphModule, node, by_dequant: dict) -> Optional[tuple[LoweredPoint, list[fx.Node]]]:
    """(point, chain) when ``node`` is a point's dequantized value moved by element-moving ops."""
    chain = []
    while isinstance(node, fx.Node) and node not in by_dequant:
        if not moves_elements(gm, node, allow_pad=True):
            return None
        chain.append(node)
        node = node.args[0]
    if not isinstance(node, fx.Node):
        return None
    point = by_dequant[node]
    if not point.per_tensor and any(is_zero_pad(n) for n in chain):
        return None  # padding with one zero code needs one zero point
    return point, chain[::-1]


def replay(gm: fx.GraphModule, chain: list[fx.Node], start: torch.Tensor, values: dict) -> torch.Tensor:
    """Run ``chain`` on ``start`` (the other arguments from the recorded ``values``)."""
    current = start
    for node in chain:
        prev = node.args[0]
        args = fx.node.map_arg(node.args, lambda a: current if a is prev else values[a.name])
        kwargs = fx.node.map_arg(node.kwargs, lambda a: current if a is prev else values[a.name])
        if node.op == "call_method":
            current = getattr(args[0], str(node.target))(*args[1:], **kwargs)
        elif node.op == "call_function":
            current = node.target(*args, **kwargs)
        else:
            current = gm.get_submodule(str(node.target))(*args, **kwargs)
    return current


def reduce_broadcast(t: torch.Tensor) -> torch.Tensor:
    """The smallest tensor that broadcasts to ``t``: dims along which it is constant -> 1."""
    for dim in range(t.dim()):
        if t.size(dim) > 1 and bool((t == t.narrow(dim, 0, 1)).all()):
            t = t.narrow(dim, 0, 1)
    return t.contiguous().clone()


def params_after(gm, chain, point: LoweredPoint, values) -> tuple[torch.Tensor, torch.Tensor]:
    """A point's (scale, zero point) laid out as its codes arrive at the end of ``chain``."""
    ndim = len(point.shape)
    if point.per_tensor:
        return point.scale(0), point.zero_point(0)
    index = torch.arange(int(torch.Size(point.shape).numel())).reshape(point.shape)
    where = replay(gm, chain, index, values)
    scale = point.scale(ndim).expand(point.shape).reshape(-1)[where]
    zero = point.zero_point(ndim).expand(point.shape).reshape(-1)[where]
    return reduce_broadcast(scale), reduce_broadcast(zero)


def params_before(gm, chain, point: LoweredPoint, out_shape, values) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """A point's (scale, zero point) laid out as an op's output that ``chain`` moves to the
    point; None when some output element does not reach the point."""
    ndim = len(point.shape)
    if point.per_tensor:
        return point.scale(0), point.zero_point(0)
    count = int(torch.Size(out_shape).numel())
    where = replay(gm, chain, torch.arange(count).reshape(out_shape), values)
    if tuple(where.shape) != point.shape:
        return None
    scale = torch.full((count,), float("nan"), dtype=torch.float64)
    zero = torch.full((count,), float("nan"), dtype=torch.float32)
    scale[where.reshape(-1)] = point.scale(ndim).expand(point.shape).reshape(-1)
    zero[where.reshape(-1)] = point.zero_point(ndim).expand(point.shape).reshape(-1)
    if torch.isnan(scale).any():
        return None
    return reduce_broadcast(scale.reshape(out_shape)), reduce_broadcast(zero.reshape(out_shape))


def only_last_dim(t: torch.Tensor) -> bool:
    return all(size == 1 for size in t.shape[:-1])


def batch_independent(t: torch.Tensor) -> bool:
    """Constant along the first (batch) dim and the matmul's own two dims."""
    return t.dim() < 3 or (t.size(0) == 1 and t.size(-1) == 1 and t.size(-2) == 1)


def drop_origin(node: fx.Node) -> None:
    """A node holding codes has no float counterpart: the diff must not pair it."""
    node.meta.pop(ORIGIN, None)
    node.meta.pop(ORIGIN_SLICE, None)
    node.meta.pop(POINT, None)


def codes_through(graph: fx.Graph, point: LoweredPoint, chain: list[fx.Node], copies: dict) -> fx.Node:
    """The point's codes moved by a copy of ``chain``; ``copies`` (original -> copy) shares
    the copies between users."""
    current = point.codes
    for node in chain:
        if node in copies:
            current = copies[node]
            continue
        prev = node.args[0]
        with graph.inserting_after(node):
            moved = graph.node_copy(node, lambda a: current if a is prev else a)
        if is_zero_pad(node):  # zero is the zero point's code, not code 0
            zero = int(point.zero_point(0))
            if len(moved.args) > 3:
                moved.args = (*moved.args[:3], zero, *moved.args[4:])
            else:
                moved.kwargs = {**moved.kwargs, "value": zero}
        drop_origin(moved)
        copies[node] = current = moved
    return current


def read_shapes_from_codes(points: Iterable[LoweredPoint], copies: Optional[dict] = None) -> None:
    """``x.shape`` / ``x.size()`` of a dequantized value, or of a float chain node that
    ``codes_through`` copied onto codes (``copies``: original -> copy): read it from the
    codes instead, so that a dequantize and a float chain no float op needs are not kept
    alive by shape reads (Swin reads the padded windows' shape)."""
    moved = {point.dequant: point.codes for point in points}
    moved.update(copies or {})
    for original, codes in moved.items():
        for user in list(original.users):
            if reads_shape(user):
                user.replace_input_with(original, codes)


def only_softmax_reads(gm: fx.GraphModule, node: fx.Node, depth: int = 3) -> bool:
    """Every use of ``node`` ends in a softmax, through at most ``depth`` plain function
    calls (timm's mask helpers between the scores and the softmax)."""
    if not node.users:
        return False
    for user in node.users:
        if is_softmax(gm, user):
            continue
        if user.op != "call_function" or depth == 0 or not only_softmax_reads(gm, user, depth - 1):
            return False
    return True


def fuse_softmax_dequantize(gm: fx.GraphModule, points: Iterable[LoweredPoint]) -> list[str]:
    """Dequantizes read only by a softmax become one multiply-add; returns their points."""
    fused = []
    for point in points:
        if point.dequant.graph is gm.graph and only_softmax_reads(gm, point.dequant):
            submodule(gm, point.dequant).fuse_affine()
            fused.append(point.name)
    return fused


def float_boundaries(graph: fx.Graph, points: Iterable[LoweredPoint]) -> list[str]:
    """The points whose dequantized value float ops still read, with those readers."""
    out = []
    for point in points:
        if point.dequant.graph is graph and point.dequant.users:
            users = ", ".join(sorted(u.name for u in point.dequant.users))
            out.append(f"{point.name} ({point.label}) dequantized for float: {users}")
    return out
