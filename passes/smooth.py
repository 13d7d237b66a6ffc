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
from fxquant.ir.meta import INPUT_POINT, POINT
from fxquant.ir.patterns import find_attention, is_scale_transparent, reads_shape_only, submodule
from fxquant.quant import distributed
from fxquant.quant.calib_data import as_batches, iter_batches
from fxquant.quant.observers import EarlyStatistics, Observer, make_observer
from fxquant.quant.observers.deferred import DeferredScale, deferred_for

SCALE_RANGE = (1e-5, 1e5)


@dataclass
class _Pair:
    act: fx.Node  # the Linear input whose channels are smoothed (last dimension)
    producer: fx.Node  # LayerNorm or V Linear node whose parameters absorb 1/s
    consumers: list  # Linear nodes whose weight columns absorb s
    v: Optional[fx.Node] = None  # attention's V operand, when the producer is the V Linear
    out: Optional[fx.Node] = None  # attn@V, when the producer is the V Linear


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
        pairs.append(_Pair(act, v_linear, [next(iter(act.users))], match.v, match.out))
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
    """Smooth's pass over the data: the per-channel |max| of the smoothed activations, the shapes
    the fold checks and, when ``early`` is given, the observers' statistics (:class:`_EarlyObservers`)."""

    def __init__(
        self,
        gm: fx.GraphModule,
        watched: set[str],
        shaped: set[str] = frozenset(),
        early: Optional["_EarlyObservers"] = None,
    ):
        super().__init__(gm)
        self.watched, self.shaped = watched, watched | set(shaped)
        self.absmax: dict[str, torch.Tensor] = {}
        self.shapes: dict[str, tuple] = {}
        self.early = early

    def run_node(self, n: fx.Node) -> Any:
        value = super().run_node(n)
        if n.name in self.shaped and isinstance(value, torch.Tensor):
            self.shapes[n.name] = tuple(value.shape)
        if n.name in self.watched:
            amax = value.detach().abs().reshape(-1, value.shape[-1]).amax(dim=0)
            previous = self.absmax.get(n.name)
            self.absmax[n.name] = amax if previous is None else torch.maximum(previous, amax)
        if self.early is not None and self.early.feeds(n.name):
            self.early.update(n.name, value)
        return value


STASH_LIMIT_BYTES = 512 * 2**20  # smoothed values kept for observers that need them (Stash), at most


class _EarlyObservers:
    """The observers ``insert_observers`` will create, calibrated in smooth's own pass over the
    data so that ``calibrate`` need not read it again (``PassContext.statistics``). A point whose
    values the fold rescales gets them as ``x / s`` once ``s`` is known (``deferred_for``: exact
    per-channel ranges for min-max observers, the batches kept for the others). Gives up (``off``
    says why; ``calibrate`` then reads the data as before) on an observed rescaled value of
    unknown channel layout, over ``STASH_LIMIT_BYTES`` of kept values, or on a batch an observer
    refuses (calibrate raises that error, naming its node)."""

    def __init__(self, gm: fx.GraphModule, layouts: dict[str, tuple[str, tuple]], changed: set[str]):
        self.observers: dict[str, Observer] = {}
        self.by_node: dict[str, list] = {}
        self.deferred: dict[str, list[tuple[DeferredScale, str]]] = {}  # pair key -> its rescaled feeders
        self.batches, self.off = 0, None
        for node in gm.graph.nodes:
            point, source = node.meta.get(POINT), node
            if point is None and INPUT_POINT in node.meta and isinstance(node.args[0], fx.Node):
                point, source = node.meta[INPUT_POINT], node.args[0]
                if POINT in source.meta:
                    continue  # insert_observers uses the source's own point there
            if point is None:
                continue
            name = f"{node.name} ({point.label})"
            if point.spec.method == "log_adaptive":  # its base search is fed by the ObserverModule itself
                self.off = f"{name}: log_adaptive's base search reads the calibration data in calibrate"
                return
            observer = make_observer(point.spec, name=name, **point.observer_kwargs())
            self.observers[name] = observer
            feeder = observer
            if source.name in changed:
                if source.name not in layouts:
                    self.off = f"{source.name} is observed and rescaled, with no known channel layout"
                    return
                pair, dims = layouts[source.name]
                feeder = deferred_for(observer, dims)
                self.deferred.setdefault(pair, []).append((feeder, source.name))
            self.by_node.setdefault(source.name, []).append(feeder)

    def feeds(self, name: str) -> bool:
        return self.off is None and name in self.by_node

    def update(self, name: str, value: Any) -> None:
        try:
            for feeder in self.by_node[name]:
                feeder.update(value)
        except ValueError as exc:
            self.stop(f"{name}: {exc}")
            return
        kept = sum(f.nbytes for feeders in self.deferred.values() for f, _ in feeders)
        if kept > STASH_LIMIT_BYTES:
            self.stop(f"the rescaled values to keep exceed {STASH_LIMIT_BYTES // 2**20} MiB")

    def stop(self, reason: str) -> None:
        self.off, self.by_node, self.deferred, self.observers = reason, {}, {}, {}

    def finish(self, pair: str, scale: torch.Tensor) -> None:
        """The fold divides pair ``pair``'s values by ``scale``: feed its deferred observers."""
        for feeder, _ in self.deferred.pop(pair, ()):
            feeder.finish(scale)


def _changed_nodes(pair: _Pair) -> set[str]:
    """The nodes whose values the fold of ``pair`` rescales (what ``mark_changed_values`` marks)."""
    todo, seen, stops = [pair.producer], set(), set(pair.consumers)
    while todo:
        node = todo.pop()
        if node in seen or node in stops:
            continue
        seen.add(node)
        todo.extend(u for u in node.users if u.op != "output" and not reads_shape_only(u))
    return {n.name for n in seen}


def _layouts(pair: _Pair, match_out: Optional[fx.Node]) -> dict[str, tuple[str, tuple]]:
    """Where the smoothed channel sits in the values the fold rescales, where smooth knows it:
    the last axis of the activation and of the V Linear's output, heads x head dim of V and of
    attn@V, (B, H, N, D) (the layout ``_channel_mismatch`` checks)."""
    key = pair.act.name
    layouts = {pair.act.name: (key, (-1,)), pair.producer.name: (key, (-1,))}
    if pair.v is not None:
        layouts[pair.v.name] = (key, (1, 3))
        if match_out is not None:
            layouts[match_out.name] = (key, (1, 3))
    return layouts


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
        early = self._early_observers(gm, pairs)
        recorder = _AbsMaxRecorder(gm, {p.act.name for p in pairs}, {p.v.name for p in pairs if p.v is not None}, early)
        with torch.no_grad():
            for batch in iter_batches(as_batches(ctx.calib_data)):
                recorder.run(batch)
                early.batches += 1
        kept = []
        for pair in pairs:
            reason = _channel_mismatch(gm, pair, recorder.shapes) if pair.v is not None else None
            if reason:  # folding would scale the wrong channels: leave this pair unsmoothed
                ctx.note(f"{pair.act.name}: not smoothed ({reason})")
                early.stop("a pair was left unsmoothed")
            else:
                kept.append(pair)
        pairs = kept
        # under torchrun each rank saw its shard: the maxima over the whole set, on every rank
        absmax = {name: distributed.all_reduce_max(value) for name, value in sorted(recorder.absmax.items())}
        for pair in pairs:
            ctx.current_node = pair.act.name
            scale = self._scale(gm, pair, absmax[pair.act.name], alpha)
            self._fold(gm, pair, scale)
            try:
                early.finish(pair.act.name, scale)
            except ValueError as exc:  # a value without the channel layout smooth assumed: calibrate reads again
                early.stop(str(exc))
            mark_changed_values([pair.producer], pair.consumers, "smooth")
            ctx.note(
                f"{pair.act.name}: smoothed into {[c.name for c in pair.consumers]} "
                f"(max channel factor {scale.max().item():.3g})"
            )
        if early.off is None and early.batches:
            ctx.statistics = EarlyStatistics(self.name, early.observers, early.batches)
        elif early.off is not None:  # calibrate says why it reads the data again
            ctx.statistics = EarlyStatistics(self.name, off=early.off)
        return gm

    @staticmethod
    def _early_observers(gm: fx.GraphModule, pairs: list[_Pair]) -> _EarlyObservers:
        changed, layouts = set(), {}
        for pair in pairs:
            nodes = _changed_nodes(pair)
            if changed & nodes:  # two folds would rescale one value: not tracked
                early = _EarlyObservers(gm, {}, set())
                early.stop("two smoothed pairs share a value")
                return early
            changed |= nodes
            layouts.update(_layouts(pair, pair.out))
        return _EarlyObservers(gm, layouts, changed)  # under torchrun calibrate merges them across ranks

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
