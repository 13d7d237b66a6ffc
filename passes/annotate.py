"""annotate: give every quantizable op its group and QuantSpec (meta only; graph unchanged).

A LayerNorm group may also quantize the norm's input (``norm1: {input: {...}}``), on
the edge into the norm only. Groups are found by module path (``blocks.3.attn.qkv`` -> ``attn_qkv``) and, inside
attention, by role (q, k, v, scores, probabilities, probs@v); a Linear/Conv2d that no path rule places is
in the generic ``linear`` group; the final norm's point sits on what the head reads of it (the class
token or the token mean). The spec comes from the
qconfig after overrides and ``skip``; an op whose group has no spec stays float and is
listed in ``report.float_points``. A ``skip`` or ``overrides`` glob that matches no module
of the model fails the pass, naming the glob and the closest module paths.
"""

from __future__ import annotations

import operator
import re
from typing import Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from fxquant.errors import NodeError, QConfigError
from fxquant.infra.contracts import Contract, Prop
from fxquant.infra.pass_manager import Pass, PassContext
from fxquant.ir.graph_utils import propagate_shapes, shape_of
from fxquant.ir.hf_names import HF_BLOCK_PATH, HF_FAMILY_META, HF_LINEAR_RULES, HF_NORM_RULES, is_separate_qkv
from fxquant.ir.meta import INPUT_POINT, MODULE, POINT, ROLE, WEIGHT
from fxquant.ir.patterns import find_attention, is_pass_through_module, submodule
from fxquant.quant.points import QuantPoint
from fxquant.quant.qconfig import ACT
from fxquant.quant.qconfig_globs import check_globs
from fxquant.quant.qconfig_groups import RESIDUAL_GROUPS

LINEAR_RULES = [
    (re.compile(r"(^|\.)qkv$"), "attn_qkv"),
    (re.compile(r"(^|\.)attn\.proj$"), "attn_proj"),
    (re.compile(r"(^|\.)fc1$"), "mlp_fc1"),
    (re.compile(r"(^|\.)fc2$"), "mlp_fc2"),
    (re.compile(r"(^|\.)patch_embed\.proj$"), "patch_embed"),
    (re.compile(r"^head(\.fc)?$|^head_dist$"), "head"),
    (re.compile(r"(^|\.)downsample\.reduction$"), "patch_merging"),
    *HF_LINEAR_RULES,  # transformers' names for the same ops (fxquant/ir/hf_names.py)
]
# a Linear/Conv no rule above places: conv+BN attention projections, hybrid stems, position-bias MLPs
OTHER_LINEAR = "linear"
NORM_RULES = [
    (re.compile(r"(^|\.)norm1$"), "norm1"),
    (re.compile(r"(^|\.)norm2$"), "norm2"),
    (re.compile(r"(^|\.)downsample\.norm$"), "patch_merging_norm"),
    (re.compile(r"^(norm|fc_norm)$"), "final_norm"),
    *HF_NORM_RULES,
]
BLOCK_PATH = re.compile(r"(^|\.)blocks\.\d+$")
ATTENTION_ROLES = {
    "q": "attn_q_out",
    "k": "attn_k_out",
    "v": "attn_v_input",
    "scores": "attn_kv_out",
    "softmax": "intSoft",
    "out": "attn_v_out",
}


def _match(rules, path: str) -> Optional[str]:
    return next((group for pattern, group in rules if pattern.search(path)), None)


def _is_gelu(gm: fx.GraphModule, node: fx.Node) -> bool:
    return isinstance(submodule(gm, node), nn.GELU) or (node.op == "call_function" and node.target is F.gelu)


def _is_residual_add(node: fx.Node, blocks: tuple) -> bool:
    return (
        node.op == "call_function"
        and node.target in (operator.add, torch.add)
        and len(node.args) >= 2
        and all(isinstance(a, fx.Node) for a in node.args[:2])
        and any(p.search(node.meta.get(MODULE, "")) for p in blocks)
    )


def _is_token_pool(node: fx.Node) -> bool:
    """``x.mean(dim=1)`` / ``torch.mean(x, 1)``: the pooled token a head reads."""
    is_mean = (node.op == "call_method" and node.target == "mean") or (
        node.op == "call_function" and node.target is torch.mean
    )
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    return is_mean and dim in (1, (1,), [1])


def _consumer_read(gm: fx.GraphModule, norm: fx.Node) -> fx.Node:
    """What the head reads of the final norm: the class token ``x[:, 0]`` or the pooled token
    when the norm's only way to a Linear goes through such a selection, else the norm itself.

    The final norm's point is calibrated there: with LayerScale at random init the class
    token stays ~1000x smaller than the patch tokens, and a range fitted to every token
    rounds the one token the head reads to zero."""
    node, read = norm, norm
    while True:
        users = [u for u in node.users if not _reads_shape_only(u)]
        if len(users) != 1:
            return norm
        user = users[0]
        if isinstance(submodule(gm, user), (nn.Linear, nn.Conv2d)):
            return read
        if is_pass_through_module(gm, user):
            node = user
        elif (user.op == "call_function" and user.target is operator.getitem) or _is_token_pool(user):
            node = read = user
        else:
            return norm


def _reads_shape_only(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target is getattr) or (
        node.op == "call_method" and node.target in ("size", "dim")
    )


class Annotate(Pass):
    name = "annotate"
    neutral = True
    # its rules name the fused qkv Linear, which split_qkv replaces by three
    contract = Contract(provides={Prop.ANNOTATED}, excludes={Prop.QKV_SPLIT})

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        # a skip/overrides glob that covers no module would be ignored silently: refuse it first
        paths = {name for name, _ in gm.named_modules()} | {n.meta.get(MODULE, "") for n in gm.graph.nodes}
        check_globs(ctx.qconfig, paths, gm.meta.get("fxq.model_name", "the model"))
        propagate_shapes(gm, ctx.diff_inputs)
        self.gm, self.ctx, self.float_points, self.seen_groups = gm, ctx, [], set()
        self.residual_adds: dict[str, int] = {}  # block path -> residual adds seen so far
        heads: dict[str, int] = {}
        # transformers' blocks are `layers.N` / `layer.N`: only on a transformers graph (fxquant.ir.hf_trace)
        blocks = (BLOCK_PATH, HF_BLOCK_PATH) if HF_FAMILY_META in gm.meta else (BLOCK_PATH,)
        for match in find_attention(gm):
            heads[match.module] = shape_of(match.q)[1]
            for role, group in ATTENTION_ROLES.items():
                node = getattr(match, role)
                node.meta[ROLE] = f"attn_{role}"
                self._point(node, group, ACT, attention=True, module=match.module)
        for node in gm.graph.nodes:
            ctx.current_node = node.name
            path = node.meta.get(MODULE, "")
            module = submodule(gm, node)
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                group = _match(LINEAR_RULES, path) or OTHER_LINEAR
                self._weight(node, group, module, heads.get(path.rsplit(".", 1)[0]))
                # a convolution's output is (B, C, H, W): its channels are axis 1, not the last axis
                channel_axis = 1 if isinstance(module, nn.Conv2d) else -1
                self._point(node, group, "output", attention=False, channel_axis=channel_axis)
            elif isinstance(module, nn.LayerNorm):
                group = _match(NORM_RULES, path)
                if group is not None:
                    read = _consumer_read(gm, node) if group == "final_norm" else node
                    self._point(read, group, ACT, attention=False, module=path)
                    self._norm_input(node, group)
            elif _is_gelu(gm, node):
                self._activation(node, "mlp_gelu", attention=False)
            elif _is_residual_add(node, blocks):
                self._activation(node, self._residual_group(node), attention=False)
        if ctx.report is not None:
            ctx.report.float_points = list(self.float_points)
        self._check_strict_groups(ctx.qconfig)
        return gm

    def _residual_group(self, node: fx.Node) -> str:
        """A block's first residual add (after attention) is ``residual1``, its second (after
        the MLP) ``residual2``, where the qconfig names that group; else ``residual``."""
        block = node.meta.get(MODULE, "")
        self.residual_adds[block] = self.residual_adds.get(block, 0) + 1
        group = f"residual{self.residual_adds[block]}"
        return group if group in RESIDUAL_GROUPS and self.ctx.qconfig.names_group(group) else "residual"

    def _check_strict_groups(self, qconfig) -> None:
        """A per-part config directory names groups on purpose: one the model lacks is a mistake."""
        for group, source in qconfig.strict_groups.items():
            if group not in self.seen_groups:
                raise QConfigError(
                    f"{source}: {group}: this model has no {group} op (it has: "
                    f"{', '.join(sorted(self.seen_groups)) or 'none'}); remove the group or "
                    "check that the file belongs to this model"
                )

    def _activation(self, node: fx.Node, group: str, *, attention: bool) -> None:
        self._point(node, group, ACT, attention=attention)

    def _point(
        self, node: fx.Node, group: str, section: str, *, attention: bool, module: str = "", channel_axis: int = -1
    ) -> None:
        self.seen_groups.add(group)
        path = module or node.meta.get(MODULE, "")
        spec = self.ctx.qconfig.spec_for(group, section, path)
        label = group if section == ACT else f"{group}.{section}"
        if spec is None:
            if section == ACT:
                self.float_points.append(f"{node.name} ({label}): float")
            return
        shape = shape_of(node)
        axis, num_groups = None, None
        if spec.granularity != "layer_wise":
            if shape is None:
                raise NodeError(node.name, f"{label}: cannot tell the tensor's shape for {spec.granularity}")
            if attention:  # (B, heads, N, *): heads are axis 1
                if spec.granularity == "channel_wise":
                    raise NodeError(
                        node.name,
                        f"{label}: channel_wise is not defined on per-head attention "
                        "tensors (B, heads, N, d); use head_wise or layer_wise",
                    )
                axis, num_groups = 1, shape[1]
            elif spec.granularity == "channel_wise":
                axis = channel_axis
            else:
                raise NodeError(
                    node.name,
                    f"{label}: {spec.granularity} applies to attention tensors and the "
                    "qkv weight only; use layer_wise or channel_wise here",
                )
        node.meta[POINT] = QuantPoint(group, section, spec, path, axis, num_groups)

    def _norm_input(self, node: fx.Node, group: str) -> None:
        """The LayerNorm's input, quantized on the edge into the norm only (the residual
        stream itself stays as it is): FQ-ViT's PTF point."""
        path = node.meta.get(MODULE, "")
        spec = self.ctx.qconfig.spec_for(group, "input", path)
        if spec is None:
            return
        if spec.granularity not in ("layer_wise", "channel_wise"):
            raise NodeError(
                node.name,
                f"{group}.input: {spec.granularity} is not defined on a LayerNorm input; "
                "use channel_wise (with PtfObserver) or layer_wise",
            )
        axis = -1 if spec.granularity == "channel_wise" else None
        node.meta[INPUT_POINT] = QuantPoint(group, "input", spec, path, axis)

    def _weight(self, node: fx.Node, group: str, module: nn.Module, heads: Optional[int]) -> None:
        self.seen_groups.add(group)
        path = node.meta.get(MODULE, "")
        spec = self.ctx.qconfig.spec_for(group, "weight", path)
        if spec is None:
            self.float_points.append(f"{node.name} ({group}.weight): float")
            return
        num_groups = None
        if group == "attn_qkv" and is_separate_qkv(path) and spec.granularity in ("group_wise", "head_wise"):
            # transformers' Q, K, V are Linears of their own: one matrix is one group, its heads the head groups
            if spec.granularity == "group_wise":
                spec = spec.with_(granularity="layer_wise")
            elif heads is None:
                raise NodeError(node.name, f"{group}.weight: head_wise needs the attention's head count")
            else:
                num_groups = heads
        elif spec.granularity == "group_wise":
            if group != "attn_qkv":
                raise NodeError(
                    node.name, f"{group}.weight: group_wise needs a fused qkv weight; use layer_wise or channel_wise"
                )
            num_groups = 3
        elif spec.granularity == "head_wise":
            if group != "attn_qkv" or heads is None:
                raise NodeError(node.name, f"{group}.weight: head_wise applies to the qkv weight only")
            num_groups = 3 * heads
        node.meta[WEIGHT] = QuantPoint(group, "weight", spec, path, axis=0, num_groups=num_groups)
