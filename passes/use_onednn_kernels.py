"""use_onednn_kernels: the integer graph's Linears run on oneDNN's fused int8 kernel.

Runs after ``lower_integer`` when ``compile(..., backend="int", int_kernels="onednn")``.
Each ``IntLinear`` (``torch._int_mm`` plus a separate requantization) becomes an
``OnednnLinear`` (``fxquant.runtime.onednn``): one oneDNN call that also applies the scales, the
bias, and either gives the float result, or the next point's codes, or, where the Linear
is followed by an exact GELU and a per-tensor point (``fc1 -> GELU -> mlp_gelu``), GELU
and that point's quantization in its epilogue.

oneDNN's fast path needs **uint8** activations, so the codes feeding converted Linears are
emitted as ``int8 code + 128``: a *code group* is one producer of codes (a
``QuantizeCodes``, an ``IntLayerNorm``, a ``CodeLut`` or a Linear that requantizes) with every node that
only moves its elements (reshape, permute, getitem, dropout, Swin's roll and padding); the
group switches to uint8 when every reader of it is a converted Linear, a
``DequantizeCodes`` (its zero point moves by 128), an integer matmul, the V operand of a
``LisShiftMatmul`` or a shape read. A Linear whose input group cannot switch (read by an
integer LayerNorm, say) or whose input or output point is narrower than 8 bits stays on the
portable kernel, and the report says why.

The integer attention matmuls (``IntMatmul``) that requantize switch to the same float32
scale arithmetic (``use_float_requantization``), which fuses into the softmax's kernel
under torch.compile.

Neutral in intent, not bit-exact: oneDNN applies the scales in float32 where the portable
kernel uses dyadic integer multipliers, so a code may differ by one step where a value is
within float32 rounding of a step boundary. ``fxquant.compile`` measures the final graph's
codes against the fake-quant graph (``fxquant.analysis.equivalence``) and writes that into
the report.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.fx as fx
import torch.nn.functional as F

from fxquant.errors import NodeError
from fxquant.infra.contracts import Contract, Prop
from fxquant.infra.pass_manager import Pass, PassContext
from fxquant.ir.graph_utils import install_submodule, remove_dead_nodes
from fxquant.ir.meta import CODES_OF
from fxquant.ir.patterns import single_user, submodule
from fxquant.lowering.code_chains import drop_origin, moves_elements, reads_shape
from fxquant.runtime.code_lut import CodeLut
from fxquant.runtime.fast_codes import DequantizeAdd
from fxquant.runtime.int_layernorm import IntLayerNorm
from fxquant.runtime.int_modules import (
    DequantizeCodes,
    IntLinear,
    IntMatmul,
    QuantizeCodes,
)
from fxquant.runtime.integer import INT8_RANGE, UINT8_OFFSET
from fxquant.runtime.log_base_softmax import LogBaseShiftMatmul
from fxquant.runtime.log_int_softmax import LisShiftMatmul
from fxquant.runtime.onednn import OnednnLinear, onednn_available

_SHIFT_MATMULS = (LisShiftMatmul, LogBaseShiftMatmul)  # attn@V by shifts: V codes may arrive as uint8

_INT8 = INT8_RANGE  # a full 8-bit point's (shifted) code range: what oneDNN's uint8 codes hold


def _is_pad(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is F.pad


def _moves(gm: fx.GraphModule, node: fx.Node, source: fx.Node) -> bool:
    """``node`` only rearranges ``source`` (its first argument), or pads it with a constant:
    on codes, lower_integer made that fill value the zero point's code, not 0."""
    if not node.args or node.args[0] is not source:
        return False
    if _is_pad(node):
        return node.kwargs.get("mode", node.args[2] if len(node.args) > 2 else "constant") == "constant"
    return moves_elements(gm, node, allow_pad=False)


def _shift_pad_value(node: fx.Node) -> None:
    """The fill code of a constant pad on codes moves with the codes (+128)."""
    if len(node.args) > 3:
        node.args = (*node.args[:3], (node.args[3] or 0) + UINT8_OFFSET, *node.args[4:])
    else:
        node.kwargs = {**node.kwargs, "value": (node.kwargs.get("value") or 0) + UINT8_OFFSET}


def _is_exact_gelu(gm: fx.GraphModule, node: fx.Node) -> bool:
    module = submodule(gm, node)
    if isinstance(module, torch.nn.GELU):
        return module.approximate == "none"
    return (
        node.op == "call_function"
        and node.target is F.gelu
        and len(node.args) == 1
        and node.kwargs.get("approximate", "none") == "none"
    )


class _Group:
    """One producer of codes and the element-moving nodes after it."""

    def __init__(self, gm: fx.GraphModule, root: fx.Node):
        self.root, self.members, self.readers = root, [root], []
        stack = [root]
        while stack:
            node = stack.pop()
            for user in node.users:
                if _moves(gm, user, node):
                    self.members.append(user)
                    stack.append(user)
                else:
                    self.readers.append(user)


class _Conversion:
    def __init__(self, gm: fx.GraphModule):
        self.gm, self.graph = gm, gm.graph
        self.linears = [n for n in self.graph.nodes if isinstance(submodule(gm, n), IntLinear)]
        self.groups: dict[fx.Node, _Group] = {}  # root -> group
        self.group_of_member: dict[fx.Node, _Group] = {}
        self.kept: dict[str, str] = {}  # linear node name -> why it stays portable
        for node in self.graph.nodes:
            module = submodule(gm, node)
            if isinstance(module, (QuantizeCodes, IntLayerNorm, CodeLut)) or (
                isinstance(module, IntLinear) and module.requantizes
            ):
                group = _Group(gm, node)
                self.groups[node] = group
                for member in group.members:
                    self.group_of_member.setdefault(member, group)

    # -- which Linears convert, which groups switch to uint8
    def _input_group(self, linear: fx.Node) -> Optional[_Group]:
        source = linear.args[0] if linear.args else None
        return self.group_of_member.get(source) if isinstance(source, fx.Node) else None

    def _readers_take_uint8(self, group: _Group, chosen: set) -> Optional[str]:
        for reader in group.readers:
            module = submodule(self.gm, reader)
            if reader in chosen or reads_shape(reader) or isinstance(module, (DequantizeCodes, IntMatmul, CodeLut)):
                continue
            if isinstance(module, DequantizeAdd) and reader.args[0] not in group.members:  # the codes operand
                continue
            if isinstance(module, _SHIFT_MATMULS) and reader.args[0] not in group.members:  # V only
                continue
            return f"{reader.name} reads the same codes and needs int8"
        return None

    def _gelu_point(self, linear: fx.Node, chosen: set) -> Optional[fx.Node]:
        """The QuantizeCodes node of ``linear -> exact GELU -> point`` (per-tensor, 8-bit),
        when everything reading that point's codes can take uint8."""
        gelu = None if submodule(self.gm, linear).requantizes else single_user(linear)
        if gelu is None or not _is_exact_gelu(self.gm, gelu):
            return None
        point = single_user(gelu)
        codes = submodule(self.gm, point) if point is not None else None
        if not isinstance(codes, QuantizeCodes) or codes.scale.numel() != 1 or codes.zero_point.numel() != 1:
            return None
        if (codes.qmin, codes.qmax) != _INT8 or self._readers_take_uint8(self.groups[point], chosen):
            return None
        return point

    def _why_not(self, linear: fx.Node, chosen: set) -> Optional[str]:
        module = submodule(self.gm, linear)
        group = self._input_group(linear)
        if group is None:
            return "its input codes do not come from a point or a requantizing Linear"
        root_module = submodule(self.gm, group.root)
        if isinstance(root_module, IntLinear) and group.root not in chosen:
            return f"the Linear producing its input ({group.root.name}) stays portable"
        if isinstance(root_module, (QuantizeCodes, IntLayerNorm, CodeLut)) and (
            (root_module.qmin, root_module.qmax) != _INT8
        ):
            return "its input point is narrower than 8 bits"
        reason = self._readers_take_uint8(group, chosen)
        if reason:
            return f"its input codes must become uint8, but {reason}"
        if module.requantizes:
            if (module.qmin, module.qmax) != _INT8:
                return "its output point is narrower than 8 bits"
            reason = self._readers_take_uint8(self.groups[linear], chosen)
            if reason:  # oneDNN gives quantized outputs as uint8 only (inductor's lowering assumes it)
                return f"its output codes would be uint8, but {reason}"
        return None

    def choose(self) -> set:
        chosen = set(self.linears)
        changed = True
        while changed:
            changed = False
            for linear in list(chosen):
                reason = self._why_not(linear, chosen)
                if reason:
                    chosen.discard(linear)
                    self.kept[linear.name] = reason
                    changed = True
        for linear in chosen:
            self.kept.pop(linear.name, None)
        return chosen

    # -- rewrite
    def convert(self, linear: fx.Node, chosen: set) -> tuple[str, Optional[fx.Node]]:
        """Replace one IntLinear; returns (what it computes now, root of an output group that
        becomes uint8 or None)."""
        module: IntLinear = submodule(self.gm, linear)
        common = dict(
            weight_codes=module.weight_codes,
            input_scale=module.input_scale,
            input_zero_point=module.input_zero_point + UINT8_OFFSET,
            label=module.label,
        )
        weight_scale = module.weight_scale.to(torch.float64)
        bias = module.bias.to(torch.float64) if module.bias is not None else torch.zeros_like(weight_scale)
        gelu_point = self._gelu_point(linear, chosen)
        out_root = None
        if module.requantizes:  # per-feature output scale and zero point folded into w_scale and bias
            out_scale, out_zero = module.out_point_scale, module.out_point_zero
            zero = out_zero.reshape(-1).expand(module.out_features) + UINT8_OFFSET
            scale = out_scale.reshape(-1).expand(module.out_features)
            new = OnednnLinear(
                weight_scale=weight_scale / scale,
                bias=bias / scale + zero,
                output="uint8",
                out_label=module.out_label,
                **common,
            )
            kind, out_root = f"codes of {module.out_label}", linear
        elif gelu_point is not None:
            codes: QuantizeCodes = submodule(self.gm, gelu_point)
            zero = float(codes.zero_point) + UINT8_OFFSET
            new = OnednnLinear(
                weight_scale=weight_scale,
                bias=bias,
                output="uint8",
                output_scale=float(codes.scale),
                output_zero_point=int(round(zero)),
                post_op="gelu",
                out_label=codes.label,
                **common,
            )
            gelu = next(iter(linear.users))
            drop_origin(linear)
            linear.meta[CODES_OF] = gelu_point.meta.get(CODES_OF)
            gelu_point.replace_all_uses_with(linear)
            self.graph.erase_node(gelu_point)
            self.graph.erase_node(gelu)
            group = self.groups.pop(gelu_point)
            group.root, group.members[0] = linear, linear
            self.groups[linear] = group
            kind, out_root = f"GELU and codes of {codes.label} in the epilogue", linear
        else:
            new = OnednnLinear(weight_scale=weight_scale, bias=bias, output="float32", **common)
            kind = "float output"
        install_submodule(self.gm, str(linear.target), new)
        return kind, out_root

    def switch_group(self, root: fx.Node) -> None:
        """Every code of the group becomes uint8: producer, readers and the diff's meta."""
        group = self.groups[root]
        module = submodule(self.gm, root)
        if isinstance(module, (QuantizeCodes, IntLayerNorm, CodeLut)):
            module.to_uint8()
        members = set(group.members)
        for member in group.members:
            if _is_pad(member):
                _shift_pad_value(member)
        for reader in group.readers:
            reader_module = submodule(self.gm, reader)
            if isinstance(reader_module, (DequantizeCodes, DequantizeAdd)):
                reader_module.to_uint8()
            elif isinstance(reader_module, (IntMatmul, *_SHIFT_MATMULS, CodeLut)):
                for index, arg in enumerate(reader.args[:2]):
                    if arg in members:
                        reader_module.input_to_uint8(index)
        self._shift_meta(group)

    @staticmethod
    def _shift_meta(group: _Group) -> None:
        for member in group.members:
            if member.meta.get(CODES_OF):
                name, shift = member.meta[CODES_OF]
                member.meta[CODES_OF] = (name, shift - UINT8_OFFSET)


class UseOnednnKernels(Pass):
    name = "use_onednn_kernels"
    contract = Contract(requires={Prop.INTEGER}, provides={Prop.ONEDNN_KERNELS})

    def requires(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        if not any(isinstance(m, (QuantizeCodes, IntLinear, IntMatmul)) for m in gm.modules()):
            raise NodeError("output", "no integer modules in the graph; run lower_integer first")
        linears = [m for m in gm.modules() if isinstance(m, IntLinear)]  # none: a preset without Linear points
        if any(m.weight_scale is None for m in linears):
            raise NodeError(
                "output",
                "the IntLinears' scales were already released (fxquant.compile releases them at the end "
                "of its pipeline): run use_onednn_kernels in the same pipeline as lower_integer",
            )
        if not onednn_available():
            raise NodeError(
                "output",
                "oneDNN's int8 Linear kernels are not available here (they need an x86 CPU "
                "build of torch with oneDNN); use int_kernels='portable'",
            )

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        conversion = _Conversion(gm)
        chosen = conversion.choose()
        switched = {conversion._input_group(linear).root for linear in chosen}
        kinds = {}
        for linear in [n for n in gm.graph.nodes if n in chosen]:  # graph order: producers first
            kinds[linear.name], out_root = conversion.convert(linear, chosen)
            if out_root is not None:
                switched.add(out_root)
        for root in switched:
            if root in conversion.groups:  # a fused GELU point was erased: its group's root is now its Linear
                conversion.switch_group(root)
        float_requant = 0
        for module in gm.modules():  # the attention matmuls requantize with float32 scales too
            if isinstance(module, IntMatmul) and module.requantizes:
                module.use_float_requantization()
                float_requant += 1
        remove_dead_nodes(gm.graph)
        gm.delete_all_unused_submodules()
        gm.recompile()
        gelu = sum("GELU" in k for k in kinds.values())
        ctx.note(
            f"use_onednn_kernels: {len(kinds)} of {len(conversion.linears)} Linears on oneDNN's int8 "
            f"kernel ({gelu} with GELU and the next point's quantization in the epilogue); "
            f"{float_requant} integer matmuls requantize with float32 scales"
        )
        ctx.note(*(f"portable Linear {name}: {why}" for name, why in sorted(conversion.kept.items())))
        return gm

    def ensures(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        for name, module in gm.named_modules():
            if isinstance(module, OnednnLinear) and module.weight_codes.dtype != torch.int8:
                raise NodeError(name, "OnednnLinear weight is not stored as int8")


__all__ = ["UseOnednnKernels"]
