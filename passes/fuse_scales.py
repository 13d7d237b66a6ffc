"""fuse_scales: share scales across scale-transparent ops and fold constant multiplies.

1. Two observed points joined only by reshape/permute/transpose/getitem/Identity see
   the same values: the upstream one is dropped and the downstream point's scale serves
   both (e.g. ``attn_qkv.output`` on the split Q linear and ``attn_q_out`` after the
   head reshape). Quantizing twice with two grids would add error for nothing.
2. A multiply by a Python constant right after a point (attention's 1/sqrt(d) on q) is
   folded into that point's dequantization scale (``post_scale``) and removed.

Observers still pass values through at this stage, so the FP32 output is bit-identical.
"""

from __future__ import annotations

from typing import Optional

import torch.fx as fx

from fxquant.infra.contracts import Contract, Prop
from fxquant.infra.pass_manager import Pass, PassContext
from fxquant.ir.graph_utils import remove_dead_nodes
from fxquant.ir.meta import POINT, copy_provenance
from fxquant.ir.patterns import is_scale_transparent, scalar_mul
from fxquant.runtime.fake_quant import ObserverModule, observer_nodes


def _follow_transparent(gm: fx.GraphModule, node: fx.Node) -> Optional[fx.Node]:
    """The first non-transparent node down a chain of single users, or None if it branches."""
    current = node
    while True:
        if len(current.users) != 1:
            return None
        user = next(iter(current.users))
        if not is_scale_transparent(gm, user) or user.args[0] is not current:
            return user
        current = user


def _is_observer(gm: fx.GraphModule, node: Optional[fx.Node]) -> bool:
    return (
        node is not None and node.op == "call_module" and isinstance(gm.get_submodule(str(node.target)), ObserverModule)
    )


class FuseScales(Pass):
    name = "fuse_scales"
    neutral = True
    contract = Contract(requires={Prop.OBSERVED}, provides={Prop.SCALES_FUSED})

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        for node, module in observer_nodes(gm):
            ctx.current_node = node.name
            downstream = _follow_transparent(gm, node)
            if _is_observer(gm, downstream):
                kept = downstream.meta[POINT].label
                ctx.note(f"{node.name} ({module.point.label}) shares the scale of {downstream.name} ({kept})")
                node.replace_all_uses_with(node.args[0])
                gm.graph.erase_node(node)
                continue
            found = scalar_mul(downstream) if downstream is not None else None
            if found is not None and found[0] is node:  # only a direct multiply: views keep their origins
                self._fold_multiply(gm, node, module, downstream, found[1], ctx)
        remove_dead_nodes(gm.graph)
        gm.delete_all_unused_submodules()
        return gm

    @staticmethod
    def _fold_multiply(gm, node, module: ObserverModule, mul: fx.Node, factor: float, ctx: PassContext) -> None:
        tensor_arg = node
        module.post_scale *= factor
        copy_provenance(mul, node)  # the observer now computes what the multiply did
        mul.replace_all_uses_with(tensor_arg)
        gm.graph.erase_node(mul)
        ctx.note(f"{mul.name} (x {factor:g}) folded into the scale of {node.name} ({module.point.label})")
