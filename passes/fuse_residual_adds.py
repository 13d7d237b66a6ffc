"""fuse_residual_adds: a residual add after a oneDNN Linear goes into the GEMM's epilogue.

Runs after ``use_onednn_kernels``, before ``fuse_int_attention``. A pre-norm transformer block
ends each branch with a Linear whose float output is added to the residual stream
(``x + proj(...)``, ``x + fc2(...)``: 24 adds in ViT-B). Each ``OnednnLinear`` with a float32
output and no GELU whose result reaches an ``add`` only through pass-through modules
(``Dropout``, ``Identity``: timm's ``proj_drop``, ``ls1`` without LayerScale, ``drop_path1``),
each read by the next alone, becomes one call ``linear(codes, x)``: oneDNN adds ``x`` to the
GEMM's output in its epilogue (``qlinear_pointwise.binary``, post-op ``add``), so the
Linear's output never makes a round trip through memory before the add
(``fxquant.runtime.onednn``). The same fusion as torchao PT2E's X86 recipe.

Numerically neutral: the epilogue does the same single float32 addition (IEEE addition is
commutative, so ``x + y`` and ``y + x`` are the same bits); where the residual does not have
the output's exact shape and dtype at run time, the module falls back to the separate add.
Only adds of two float32 values of one shape are fused (shapes propagated on the diff
inputs; a broadcast add, such as the non-finite guard added to the output, stays separate).
The fused node takes the add's provenance, so the numeric diff pairs it with the float
model's add; the Linear's own output is no longer a value of the graph.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.fx as fx

from fxquant.infra.contracts import Contract, Prop
from fxquant.infra.pass_manager import Pass, PassContext
from fxquant.ir.graph_utils import propagate_shapes
from fxquant.ir.meta import copy_provenance
from fxquant.ir.patterns import behind_pass_through, is_add_of_two_values, submodule
from fxquant.runtime.onednn import OnednnLinear


def _float_linear_behind(gm: fx.GraphModule, node: fx.Node) -> Optional[tuple[fx.Node, list[fx.Node]]]:
    """The float-output ``OnednnLinear`` call ``node`` reads through pass-through modules only,
    each node on the way (the Linear included) read by the next alone; with that chain."""
    node, chain = behind_pass_through(gm, node)
    module = submodule(gm, node) if node is not None else None
    if not isinstance(module, OnednnLinear) or len(node.users) != 1 or len(node.args) != 1 or node.kwargs:
        return None
    if module.output != "float32" or module.post_op != "none":
        return None
    return node, chain


def _same_float32_shape(a: fx.Node, b: fx.Node) -> bool:
    """Both values are float32 tensors of one shape (``tensor_meta`` from a shape propagation)."""
    metas = [n.meta.get("tensor_meta") for n in (a, b)]
    if any(getattr(m, "shape", None) is None for m in metas):
        return False
    return metas[0].shape == metas[1].shape and all(m.dtype == torch.float32 for m in metas)


def residual_add_pattern(gm: fx.GraphModule, add: fx.Node) -> Optional[tuple[fx.Node, list[fx.Node], fx.Node]]:
    """For an ``add`` of a float oneDNN Linear's output (either operand) and another float32
    value of the same shape (shapes from ``propagate_shapes``): the Linear's node, the
    pass-through chain between them, the other operand; else None."""
    if not is_add_of_two_values(add):
        return None
    for index in (1, 0):  # timm writes x + branch(x): the branch is usually the second operand
        found = _float_linear_behind(gm, add.args[index])
        other = add.args[1 - index]
        if found is None or other is found[0] or other in found[1]:
            continue
        if _same_float32_shape(found[0], other):
            return found[0], found[1], other
    return None


class FuseResidualAdds(Pass):
    name = "fuse_residual_adds"
    neutral = True
    contract = Contract(requires={Prop.ONEDNN_KERNELS}, provides={Prop.RESIDUAL_FUSED})

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        if not ctx.diff_inputs:
            ctx.note("fuse_residual_adds: no example input to read the operands' shapes from; nothing fused")
            return gm
        propagate_shapes(gm, tuple(ctx.diff_inputs))
        fused = []
        for add in list(gm.graph.nodes):
            match = residual_add_pattern(gm, add)
            if match is None:
                continue
            linear, chain, other = match
            with gm.graph.inserting_before(add):
                new = gm.graph.call_module(str(linear.target), (linear.args[0], other))
            new.meta.update(linear.meta)
            copy_provenance(add, new)
            add.replace_all_uses_with(new)
            for dead in (add, *chain, linear):
                gm.graph.erase_node(dead)
            fused.append(f"{add.name} into {linear.target}")
        if fused:
            gm.graph.lint()
            gm.recompile()
        ctx.note(
            f"fuse_residual_adds: {len(fused)} residual adds in the epilogue of the oneDNN Linear before them"
            + (f" ({', '.join(fused[:3])}{', ...' if len(fused) > 3 else ''})" if fused else "")
        )
        return gm


__all__ = ["FuseResidualAdds", "residual_add_pattern"]
