"""pack_int4_weights: 4-bit integer weights stored two codes per byte (``backend="int"``).

The last pass of an integer pipeline. Each ``IntLinear`` / ``OnednnLinear`` whose weight
point's grid fits 4 bits (``qmin >= -8`` and ``qmax <= 7``: ``w4a8``, ``w4a4``) keeps its
weight as a packed uint8 tensor (out, ceil(in / 2)), low nibble first
(``fxquant.runtime.int4_weights``), in memory and in a saved ``.fxq``: an eighth of the FP32
bytes. The kernels unpack it into their int8 GEMM at call time, so the output is exactly
the unpacked graph's (a neutral pass: the manager checks that).

A Linear is packed on its weight point's grid (``fxq.weight`` meta), not on the codes it
happens to hold: an 8-bit grid stays int8. A 4-bit grid whose codes leave -8..7 (never
made by fxquant's quantizers) is an error naming the node.
"""

from __future__ import annotations

import torch.fx as fx

from fxquant.errors import NodeError
from fxquant.infra.contracts import Contract, Prop
from fxquant.infra.pass_manager import Pass, PassContext
from fxquant.ir.meta import WEIGHT
from fxquant.ir.patterns import submodule
from fxquant.runtime.int4_weights import PackedWeight, fits_int4

MIB = 2**20


def pack_int4_weights(gm: fx.GraphModule) -> tuple[list[str], int, int]:
    """Pack every integer Linear with a 4-bit weight grid; returns (packed node names, weight
    bytes before, after) over the packed layers."""
    packed, before, after = [], 0, 0
    for node in gm.graph.nodes:
        module = submodule(gm, node) if node.op == "call_module" else None
        if not isinstance(module, PackedWeight) or module.packed:
            continue
        point = node.meta.get(WEIGHT)
        if point is None or not fits_int4(point.spec.qmin, point.spec.qmax):
            continue
        old = module.weight_storage_bytes()
        try:
            module.pack_weight()
        except ValueError as exc:
            raise NodeError(
                node.name, f"its weight grid is [{point.spec.qmin}, {point.spec.qmax}], but {exc}"
            ) from None
        packed.append(node.name)
        before, after = before + old, after + module.weight_storage_bytes()
    return packed, before, after


class PackInt4Weights(Pass):
    name = "pack_int4_weights"
    neutral = True  # the GEMMs read the same int8 codes, unpacked
    contract = Contract(requires={Prop.INTEGER}, provides={Prop.WEIGHTS_PACKED})

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        packed, before, after = pack_int4_weights(gm)
        linears = sum(isinstance(m, PackedWeight) for m in gm.modules())
        if packed:
            ctx.note(
                f"pack_int4_weights: {len(packed)} of {linears} integer Linears hold 4-bit weight codes two "
                f"per byte: {before / MIB:.2f} -> {after / MIB:.2f} MiB (unpacked into the int8 GEMM per call)"
            )
        else:
            ctx.note(f"pack_int4_weights: none of {linears} integer Linears has a 4-bit weight grid; nothing packed")
        return gm

    def ensures(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        for node in gm.graph.nodes:
            module = submodule(gm, node) if node.op == "call_module" else None
            point = node.meta.get(WEIGHT)
            if isinstance(module, PackedWeight) and point is not None and fits_int4(point.spec.qmin, point.spec.qmax):
                if not module.packed:
                    raise NodeError(node.name, "its weight grid fits 4 bits but it is not packed")


__all__ = ["PackInt4Weights", "pack_int4_weights"]
