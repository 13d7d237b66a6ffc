"""smooth: move activation outliers into the weights (SmoothQuant), exactly, by folding.

Real ViTs (DINOv2 among them) carry a few activation channels hundreds of times larger
than the rest; a per-tensor 8-bit grid spends its range on them. For a Linear input x
with channel maxima a_c and weight column maxima w_c, the scale
``s_c = a_c**alpha / w_c**(1 - alpha)`` divides channel c of x and multiplies column c of
the weight: the product is unchanged and x is flat enough for one scale. The division
is folded where it costs nothing:

- a LayerNorm feeding only Linears (norm1 -> Q, K, V; norm2 -> fc1): into gamma and beta;
- attention's V feeding the output projection: into the V Linear's rows and bias
  (attn@V is linear in V, so its output channels scale the same way).

Runs after ``split_qkv`` and before ``insert_observers``; only points quantized
per tensor are smoothed. FP32 output unchanged up to float rounding. The nodes whose
values are rescaled get a new origin, so the diff compares them with the smoothed FP32
graph rather than with the unscaled reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.fx as fx
from torch import nn

from fxquant.errors import FxqError
from fxquant.infra.contracts import Contract, Prop
from fxquant.infra.pass_manager import Pass, PassContext
from fxquant.ir.graph_utils import mark_changed_values
from fxquant.ir.meta import POINT
from fxquant.ir.patterns import find_attention, is_scale_transparent, reads_shape_only, submodule
from fxquant.quant import distributed
from fxquant.quant.calib_data import as_batches, iter_batches

SCALE_RANGE = (1e-5, 1e5)


@dataclass
class _Pair:
    act: fx.Node  # the Linear input whose channels are smoothed (last dimension)
    producer: fx.Node  # LayerNorm or V Linear node whose parameters absorb 1/s
    consumers: list  # Linear nodes whose weight columns absorb s
    v: Optional[fx.Node] = None  # attention's V operand, when the producer is the V Linear


def _linear(gm: fx.GraphModule, node: fx.Node) -> Optional[nn.Linear]:
    module = submodule(gm, node)
    return module if isinstance(module, nn.Linear) else None


def _per_tensor_point(node: fx.Node) -> bool:
    point = node.meta.get(POINT)
    return point is not None and point.spec.granularity == "layer_wise" and point.spec.method == "uniform"


def _norm_pairs(gm: fx.GraphModule) -> list[_Pair]:
    pairs = []
    for node in gm.graph.nodes:
        module = submodule(gm, node)
        if not isinstance(module, nn.LayerNorm) or not module.elementwise_affine or not _per_tensor_point(node):
            continue
        users = [u for u in node.users if not reads_shape_only(u)]
        if users and all(_linear(gm, u) is not None and u.args[0] is node for u in users):
            pairs.append(_Pair(node, node, users))
    return pairs


def _walk_back_to_linear(gm: fx.GraphModule, node: fx.Node) -> Optional[fx.Node]:
    while is_scale_transparent(gm, node) and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node if _linear(gm, node) is not None else None


def _v_proj_pairs(gm: fx.GraphModule) -> list[_Pair]:
    pairs = []
    for match in find_attention(gm):
        if not _per_tensor_point(match.out):
            continue
        v_linear = _walk_back_to_linear(gm, match.v)
        node, act = match.out, None
        while len(node.users) == 1:
            user = next(iter(node.users))
            if _linear(gm, user) is not None:
                act = node
                break
            if not is_scale_transparent(gm, user):
                break
            node = user
        if v_linear is None or act is None or len(v_linear.users) != 1:
            continue
        pairs.append(_Pair(act, v_linear, [next(iter(act.users))], match.v))
    return pairs


def _channel_mismatch(gm: fx.GraphModule, pair: _Pair, shapes: dict) -> Optional[str]:
    """Why V's output channels are not attn@V's last axis one for one (None when they are).

    The fold divides V's output channel c and multiplies the consumer's input column c: right
    for timm's ``v: (B, H, N, D)``, ``(attn @ v).transpose(1, 2).reshape(B, N, C)``; wrong when
    the V Linear still holds Q and K (a fused qkv that split_qkv did not split) or when attention
    mixes channels instead of tokens (XCiT's cross-covariance attention: v is (B, H, D, N))."""
    width = _linear(gm, pair.producer).out_features
    act_width = shapes[pair.act.name][-1]
    consumer_width = _linear(gm, pair.consumers[0]).in_features
    if not width == act_width == consumer_width:
        return f"V Linear {pair.producer.name} has {width} outputs, {pair.act.name} {act_width} channels"
    v_shape = shapes.get(pair.v.name) if pair.v is not None else None
    if v_shape is None or len(v_shape) != 4 or v_shape[1] * v_shape[3] != width:
        return f"V {pair.v.name} has shape {tuple(v_shape or ())}, not (B, heads, N, {width} / heads)"
    return None


class _AbsMaxRecorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, watched: set[str], shaped: set[str] = frozenset()):
        super().__init__(gm)
        self.watched, self.shaped = watched, watched | set(shaped)
        self.absmax: dict[str, torch.Tensor] = {}
        self.shapes: dict[str, tuple] = {}

    def run_node(self, n: fx.Node) -> Any:
        value = super().run_node(n)
        if n.name in self.shaped and isinstance(value, torch.Tensor):
            self.shapes[n.name] = tuple(value.shape)
        if n.name in self.watched:
            amax = value.detach().abs().reshape(-1, value.shape[-1]).amax(dim=0)
            previous = self.absmax.get(n.name)
            self.absmax[n.name] = amax if previous is None else torch.maximum(previous, amax)
        return value


class Smooth(Pass):
    name = "smooth"
    neutral = True
    # it smooths the points annotate put on ops, which insert_observers moves onto observers
    contract = Contract(requires={Prop.ANNOTATED}, provides={Prop.SMOOTHED}, excludes={Prop.OBSERVED})

    def requires(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        data = ctx.calib_data
        if ctx.qconfig.smooth_alpha is not None and data is not None and iter(data) is data:
            raise FxqError(
                "smooth and calibrate each go over calib_data, so it must be read more than "
                "once: pass a list, a tensor or a DataLoader, not a generator "
                "(fxquant.compile turns a generator into a list for you)"
            )

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        alpha = ctx.qconfig.smooth_alpha
        if alpha is None:
            return gm
        pairs = _norm_pairs(gm) + _v_proj_pairs(gm)
        if not pairs:
            return gm
        recorder = _AbsMaxRecorder(gm, {p.act.name for p in pairs}, {p.v.name for p in pairs if p.v is not None})
        with torch.no_grad():
            for batch in iter_batches(as_batches(ctx.calib_data)):
                recorder.run(batch)
        kept = []
        for pair in pairs:
            reason = _channel_mismatch(gm, pair, recorder.shapes) if pair.v is not None else None
            if reason:  # folding would scale the wrong channels: leave this pair unsmoothed
                ctx.note(f"{pair.act.name}: not smoothed ({reason})")
            else:
                kept.append(pair)
        pairs = kept
        # under torchrun each rank saw its shard: the maxima over the whole set, on every rank
        absmax = {name: distributed.all_reduce_max(value) for name, value in sorted(recorder.absmax.items())}
        for pair in pairs:
            ctx.current_node = pair.act.name
            scale = self._scale(gm, pair, absmax[pair.act.name], alpha)
            self._fold(gm, pair, scale)
            mark_changed_values([pair.producer], pair.consumers, "smooth")
            ctx.note(
                f"{pair.act.name}: smoothed into {[c.name for c in pair.consumers]} "
                f"(max channel factor {scale.max().item():.3g})"
            )
        return gm

    @staticmethod
    def _scale(gm, pair: _Pair, act_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
        weights = [_linear(gm, c).weight.detach() for c in pair.consumers]
        w_absmax = torch.stack([w.abs().amax(dim=0) for w in weights]).amax(dim=0)
        scale = act_absmax.clamp_min(1e-8).pow(alpha) / w_absmax.clamp_min(1e-8).pow(1.0 - alpha)
        scale = torch.where((act_absmax > 0) & (w_absmax > 0), scale, torch.ones_like(scale))
        return scale.clamp(*SCALE_RANGE)

    @staticmethod
    def _fold(gm, pair: _Pair, scale: torch.Tensor) -> None:
        producer = submodule(gm, pair.producer)
        with torch.no_grad():
            if isinstance(producer, nn.LayerNorm):
                producer.weight.div_(scale)
                if producer.bias is not None:
                    producer.bias.div_(scale)
            else:  # the V Linear: output channel c is divided by s_c
                producer.weight.div_(scale[:, None])
                if producer.bias is not None:
                    producer.bias.div_(scale)
            for consumer in pair.consumers:
                _linear(gm, consumer).weight.mul_(scale[None, :])
