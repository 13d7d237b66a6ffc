"""split_qkv: the fused qkv Linear (C -> 3C) becomes three Linears Q, K, V (C -> C each).

timm computes ``qkv(x).reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)``. Each of
Q, K and V then gets its own weight quantization (per matrix: a group_wise or layer_wise
spec on the fused weight becomes one scale per matrix) and its own output point, which is
what the seed's fused weight could not express. Numerically neutral in FP32.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.fx as fx
from torch import nn
from torch.nn.utils import skip_init

from fxquant.infra.contracts import Contract, Prop
from fxquant.infra.pass_manager import Pass, PassContext
from fxquant.ir.graph_utils import install_submodule, new_node, remove_dead_nodes, unique_attr
from fxquant.ir.hf_names import is_separate_qkv
from fxquant.ir.meta import MODULE, ORIGIN, ORIGIN_SLICE, POINT, ROLE, WEIGHT, copy_provenance
from fxquant.ir.patterns import single_user, submodule


@dataclass
class _FusedQkv:
    linear: fx.Node
    reshape: fx.Node
    permute: fx.Node
    unbind: fx.Node
    outputs: list  # getitem nodes for q, k, v (index order)


def _match_fused_qkv(gm: fx.GraphModule, node: fx.Node) -> Optional[_FusedQkv]:
    module = submodule(gm, node)
    if not isinstance(module, nn.Linear) or module.out_features % 3:
        return None
    reshape = single_user(node)
    if reshape is None or reshape.op != "call_method" or reshape.target not in ("reshape", "view"):
        return None
    shape = reshape.args[1:]
    if len(shape) != 5 or shape[2] != 3:
        return None
    permute = single_user(reshape)
    if (
        permute is None
        or permute.op != "call_method"
        or permute.target != "permute"
        or tuple(permute.args[1:]) != (2, 0, 3, 1, 4)
    ):
        return None
    unbind = single_user(permute)
    if (
        unbind is None
        or unbind.op != "call_method"
        or unbind.target != "unbind"
        or (unbind.args[1:] or (unbind.kwargs.get("dim", 0),))[0] != 0
    ):
        return None
    outputs: list = [None, None, None]
    for user in unbind.users:
        if user.op != "call_function" or user.target is not operator.getitem or user.args[1] not in (0, 1, 2):
            return None
        outputs[user.args[1]] = user
    return _FusedQkv(node, reshape, permute, unbind, outputs)


def _split_point(point, index: int):
    """A spec on the fused weight, seen by one of the three matrices."""
    if point is None:
        return None
    if point.spec.granularity == "group_wise":
        return replace(point, spec=point.spec.with_(granularity="layer_wise"), num_groups=None)
    if point.spec.granularity == "head_wise" and point.num_groups:
        return replace(point, num_groups=point.num_groups // 3)
    return point


class SplitQkv(Pass):
    name = "split_qkv"
    neutral = True
    # it carries the fused Linear's points over to Q, K and V: after annotate, before the observers
    contract = Contract(provides={Prop.QKV_SPLIT}, excludes={Prop.OBSERVED})

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        split = 0
        for node in list(gm.graph.nodes):
            ctx.current_node = node.name
            match = _match_fused_qkv(gm, node)
            if match is not None:
                self._split(gm, match)
                split += 1
        separate = sum(1 for n in gm.graph.nodes if n.op == "call_module" and is_separate_qkv(str(n.target)))
        if not split and separate:
            ctx.note(
                f"split_qkv: nothing to split, the model's Q, K and V are already separate Linears "
                f"({separate}, transformers naming): the per-matrix attn_qkv specs apply to them directly"
            )
        remove_dead_nodes(gm.graph)
        gm.delete_all_unused_submodules()
        return gm

    def _split(self, gm: fx.GraphModule, m: _FusedQkv) -> None:
        graph = gm.graph
        fused: nn.Linear = gm.get_submodule(str(m.linear.target))
        width = fused.out_features // 3
        batch, tokens, _, heads, head_dim = m.reshape.args[1:]
        parent_path, _, leaf = str(m.linear.target).rpartition(".")
        module = m.linear.meta.get(MODULE, "")
        for index, letter in enumerate("qkv"):
            # skip_init: no random initialisation (it would advance the user's global RNG),
            # the weights are copied from the fused matrix right away
            part = skip_init(
                nn.Linear,
                fused.in_features,
                width,
                bias=fused.bias is not None,
                device=fused.weight.device,
                dtype=fused.weight.dtype,
            )
            with torch.no_grad():
                part.weight.copy_(fused.weight[index * width : (index + 1) * width])
                if fused.bias is not None:
                    part.bias.copy_(fused.bias[index * width : (index + 1) * width])
            part.train(fused.training)
            path = unique_attr(gm, f"{parent_path}.{leaf}_{letter}" if parent_path else f"{leaf}_{letter}")
            install_submodule(gm, path, part)
            old = m.outputs[index]
            with graph.inserting_before(old):
                linear = new_node(
                    graph, "call_module", path, (m.linear.args[0],), module=path, origin=m.linear.meta.get(ORIGIN)
                )
                linear.meta[ORIGIN_SLICE] = (-1, index * width, width)
                for key in (WEIGHT, POINT):
                    point = _split_point(m.linear.meta.get(key), index)
                    if point is not None:
                        linear.meta[key] = replace(point, module=path)
                shaped = new_node(
                    graph, "call_method", "reshape", (linear, batch, tokens, heads, head_dim), module=module
                )
                heads_first = new_node(graph, "call_method", "permute", (shaped, 0, 2, 1, 3), module=module)
            copy_provenance(old, heads_first)
            for key in (POINT, ROLE):
                if key in old.meta:
                    heads_first.meta[key] = old.meta[key]
            old.replace_all_uses_with(heads_first)
        for node in (*m.outputs, m.unbind, m.permute, m.reshape, m.linear):
            graph.erase_node(node)
