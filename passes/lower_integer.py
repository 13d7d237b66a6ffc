"""lower_integer: the lowered fake-quant graph becomes an integer graph (``backend="int"``).

Every uniform 8-bit FakeQuantize point becomes ``QuantizeCodes`` (float -> int8 codes)
followed by ``DequantizeCodes`` (the explicit way back to float). Then:

1. A QuantLinear whose input is such a point with one scale per tensor (through ops that
   only move elements: reshape, permute, getitem, Dropout, roll, zero padding) becomes an
   ``IntLinear`` on the codes: int8 x int8 -> int32 on ``torch._int_mm``.
2. A matmul whose two inputs are such points (attention's q @ kT; probs @ v when the
   probabilities are quantized uniformly) becomes an exact ``IntMatmul``.
3. An integer op whose result reaches a point through element-moving ops only requantizes
   to that point's codes directly (dyadic multiplier, bias and zero-point terms folded in):
   Q/K/V linears -> their head-wise points, q @ kT -> the score point.
4. A LayerNorm between a PTF input point (FQ-ViT's power-of-two factors) and one per-tensor
   output point becomes an ``IntLayerNorm``: codes in and out (``fxquant.quant.ptf``).
5. LIS + attn@V: one ``LisShiftMatmul``; GELU between points: ``CodeLut``; residual add: ``DequantizeAdd``.
6. A ``DequantizeCodes`` that no float op reads any more is dropped.
7. A per-sample guard makes a sample whose input holds a NaN or an inf NaN in every output,
   as in FP32 (``fxquant.lowering.nonfinite``).

What is not lowered stays float between explicit dequantize/quantize nodes and is listed
in ``report.float_points`` with the reason; nothing is lowered on a guess. The IntLinears keep
their scales and bias (``use_onednn_kernels`` reads them) until ``fxquant.compile`` releases
them at the end of the pipeline and measures the integer graph against the fake-quant one
(``fxquant.analysis.equivalence``).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.fx as fx

from fxquant.errors import NodeError
from fxquant.infra.contracts import Contract, Prop
from fxquant.infra.pass_manager import Pass, PassContext
from fxquant.ir.capture import capture_values
from fxquant.ir.graph_utils import install_submodule, remove_dead_nodes, unique_attr
from fxquant.ir.meta import CODES_OF, MODULE, ROLE
from fxquant.ir.patterns import is_matmul, is_pass_through_module, submodule
from fxquant.lowering.code_chains import (
    IntegerLowering,
    LoweredPoint,
    batch_independent,
    codes_through,
    drop_origin,
    float_boundaries,
    fuse_softmax_dequantize,
    moves_elements,
    only_last_dim,
    params_after,
    params_before,
    read_shapes_from_codes,
    selection_to_point,
    trace_back,
)
from fxquant.lowering.code_luts import fuse_elementwise
from fxquant.lowering.nonfinite import guard_nonfinite
from fxquant.quant.ptf import ptf_layernorm_constants
from fxquant.runtime.fake_quant import QUANTIZED_WEIGHT_TYPES, FakeQuantize, ObserverModule, QuantLinear
from fxquant.runtime.float_point import FloatPoint
from fxquant.runtime.int_layernorm import IntLayerNorm
from fxquant.runtime.int_modules import DequantizeCodes, IntLinear, IntMatmul, QuantizeCodes
from fxquant.runtime.integer import code_shift, exact_float_matmul_bound, exact_shift_matmul_bound
from fxquant.runtime.log_base_softmax import SOFTMAX_POINT_TYPES, LogBaseSoftmax
from fxquant.runtime.log_int_softmax import LisShiftMatmul, LogIntSoftmax

FLOAT_OPS = (
    "softmax without a log2 point, GELU, residual adds and LayerNorms without a PTF input point "
    "run in float between DequantizeCodes and QuantizeCodes nodes"
)


class _Lowering:
    def __init__(self, gm: fx.GraphModule, values: dict):
        self.gm, self.graph, self.values = gm, gm.graph, values
        self.result = IntegerLowering()
        self.by_dequant: dict[fx.Node, LoweredPoint] = {}
        self.by_codes: dict[fx.Node, LoweredPoint] = {}
        self.copies: dict[fx.Node, fx.Node] = {}  # original chain node -> its copy on codes
        self.int_nodes: list[fx.Node] = []

    def run(self) -> IntegerLowering:
        for node in [n for n in self.graph.nodes if isinstance(submodule(self.gm, n), FakeQuantize)]:
            self._split_point(node, submodule(self.gm, node))
        for node in [n for n in self.graph.nodes if isinstance(submodule(self.gm, n), torch.nn.LayerNorm)]:
            self._lower_layernorm(node)
        for node in list(self.graph.nodes):
            if isinstance(submodule(self.gm, node), QuantLinear):
                self._lower_linear(node)
            elif is_matmul(node):
                self._lower_matmul(node)
        for node in self.int_nodes:
            self._fuse_requantization(node)
        read_shapes_from_codes(self.result.points.values(), self.copies)
        self.result.fused_dequantize = fuse_softmax_dequantize(self.gm, self.result.points.values())
        self.result.code_luts = fuse_elementwise(self.gm, self.result.points.values())  # GELU tables, adds
        remove_dead_nodes(self.graph)
        self.gm.delete_all_unused_submodules()
        self.result.float_boundaries = float_boundaries(self.graph, self.result.points.values())
        return self.result

    def _split_point(self, node: fx.Node, fq: FakeQuantize) -> None:
        qp, label = fq.qparams, fq.point.label
        reason = None
        if fq.method != "uniform":
            reason = f"{fq.method} quantization has no integer lowering here yet"
        else:
            try:
                shift = code_shift(qp.qmin, qp.qmax)
            except ValueError as exc:
                reason = str(exc)
        if reason:
            self.result.float_points.append(f"{node.name} ({label}): stays fake-quant in float: {reason}")
            return
        shape = tuple(self.values[node.name].shape)
        scale, zero = qp.broadcast_scale(len(shape)), qp.broadcast_zero_point(len(shape)) - shift
        codes_path = unique_attr(self.gm, f"{node.target}_codes")
        dequant_path = unique_attr(self.gm, f"{node.target}_dequant")
        install_submodule(self.gm, codes_path, QuantizeCodes(label, scale, zero, qp.qmin - shift, qp.qmax - shift))
        install_submodule(self.gm, dequant_path, DequantizeCodes(label, scale, zero, fq.post_scale))
        with self.graph.inserting_before(node):
            codes = self.graph.call_module(codes_path, (node.args[0],))
            dequant = self.graph.call_module(dequant_path, (codes,))
        codes.meta[MODULE], codes.meta[CODES_OF] = node.meta.get(MODULE, ""), (node.name, shift)
        dequant.meta.update(node.meta)  # the dequantized value IS the fake-quant value: same origin
        node.replace_all_uses_with(dequant)
        self.graph.erase_node(node)
        point = LoweredPoint(node.name, label, fq, shift, shape, codes, dequant)
        self.result.points[node.name] = point
        self.by_dequant[dequant] = point
        self.by_codes[codes] = point

    # -- LayerNorm on PTF codes
    def _lower_layernorm(self, node: fx.Node) -> None:
        source = node.args[0] if len(node.args) == 1 and not node.kwargs else None
        point_in = self.by_dequant.get(source)
        if point_in is None:
            return  # a float input: LayerNorm stays float (the report's general note)
        module = submodule(self.gm, node)
        chain = selection_to_point(self.gm, node, self.by_codes)  # the final norm's point: the token the head reads
        users = list((chain[-1] if chain else node).users)
        point_out = self.by_codes.get(users[0]) if len(users) == 1 else None
        reason = None
        if point_out is None or not point_out.per_tensor:
            reason = "its output is not one per-tensor 8-bit point"
        elif point_in.fake_quantize.post_scale != 1.0:
            reason = f"its input point {point_in.name} carries a folded scale"
        elif len(module.normalized_shape) != 1 or module.weight is None:
            reason = "it normalizes over more than the last axis or has no affine weight"
        if reason is None:
            bias = module.bias if module.bias is not None else torch.zeros_like(module.weight)
            try:
                constants = ptf_layernorm_constants(
                    point_in.fake_quantize.qparams, module.weight, bias, module.eps, point_out.fake_quantize.qparams
                )
            except ValueError as exc:  # not power-of-two factors over one base scale
                reason = f"its input point {point_in.name} ({point_in.label}) is not a PTF point: {exc}"
        if reason:
            self.result.float_points.append(
                f"{node.name} (LayerNorm): float between explicit dequantize/quantize: {reason}"
            )
            return
        codes_node = users[0]
        path = unique_attr(self.gm, f"fxq_int_{node.name}")
        install_submodule(
            self.gm, path, IntLayerNorm(constants, point_in.shift, point_out.shift, point_in.label, point_out.label)
        )
        with self.graph.inserting_before(node):
            int_node = self.graph.call_module(path, (point_in.codes,))
            for step in chain:  # the same selection, on the codes of every token
                int_node = self.graph.node_copy(step, lambda arg, m={step.args[0]: int_node}: m.get(arg, arg))
        int_node.meta[MODULE], int_node.meta[CODES_OF] = node.meta.get(MODULE, ""), (point_out.name, point_out.shift)
        codes_node.replace_all_uses_with(int_node)
        for dead in (codes_node, *reversed(chain), node):
            self.graph.erase_node(dead)
        del self.by_codes[codes_node]
        point_out.codes = int_node
        self.by_codes[int_node] = point_out
        self.result.int_layernorms.append(f"{node.name}: {point_in.name} -> {point_out.name}")

    # -- linears
    def _lower_linear(self, node: fx.Node) -> None:
        module: QuantLinear = submodule(self.gm, node)
        label = module.point.label
        found = trace_back(self.gm, node.args[0], self.by_dequant) if len(node.args) == 1 else None
        wq = module.weight_qparams
        reason = None
        if found is None:
            reason = "its input is not an 8-bit uniform quantization point"
        elif not found[0].per_tensor:
            reason = (
                f"its input point {found[0].name} ({found[0].label}) has one scale per channel/head; "
                "an integer GEMM needs one scale per input tensor (use calibration_mode: layer_wise)"
            )
        elif module.weight_codes.dtype != torch.int8 or bool(torch.any(wq.zero_point != 0)):
            reason = "its weight is not symmetric int8 (needs signed: True, 8 bits or fewer)"
        elif wq.per_channel and wq.axis not in (0, -2):
            reason = f"its weight scale runs along axis {wq.axis}, not the output features"
        if reason:
            self.result.float_points.append(
                f"{node.name} ({label}): float Linear on its dequantized int8 weight: {reason}"
            )
            return
        point, chain = found
        codes = codes_through(self.graph, point, chain, self.copies)
        input_scale = float(point.scale(0)) * point.fake_quantize.post_scale
        int_linear = IntLinear(module.weight_codes, wq.scale, module.bias, input_scale, int(point.zero_point(0)), label)
        install_submodule(self.gm, str(node.target), int_linear)
        node.args = (codes,)
        self.int_nodes.append(node)
        self.result.int_linears.append(node.name)

    # -- attention matmuls
    def _lower_matmul(self, node: fx.Node) -> None:
        left = trace_back(self.gm, node.args[0], self.by_dequant)
        right = trace_back(self.gm, node.args[1], self.by_dequant)
        lis_node = self._lis_source(node.args[0]) if left is None and right is not None else None
        if lis_node is not None:
            self._lower_lis_matmul(node, lis_node, right)
            return
        if left is None or right is None:
            if left is not None or right is not None:
                self.result.float_points.append(
                    f"{node.name} ({node.meta.get(ROLE) or 'matmul'}): float matmul: "
                    "one of its inputs is not an 8-bit uniform point"
                )
            return
        (lp, lchain), (rp, rchain) = left, right
        lscale, lzero = params_after(self.gm, lchain, lp, self.values)
        rscale, rzero = params_after(self.gm, rchain, rp, self.values)
        depth = (self.values[lchain[-1].name].shape if lchain else lp.shape)[-1]
        reason = None
        if not all(batch_independent(t) for t in (lscale, lzero, rscale, rzero)):
            reason = "its inputs' scales vary along the batch or matrix dimensions"
        elif not exact_float_matmul_bound(depth, lp.magnitude(), rp.magnitude()):
            reason = f"a depth of {depth} could overflow float32's exact integers (2**24)"
        if reason:
            self.result.float_points.append(f"{node.name}: float matmul: {reason}")
            return
        acc_scale = (lscale * lp.fake_quantize.post_scale) * (rscale * rp.fake_quantize.post_scale)
        role = node.meta.get(ROLE, "")
        module = IntMatmul(lzero, rzero, acc_scale, label=role or node.name)
        path = unique_attr(self.gm, f"fxq_int_{node.name}")
        install_submodule(self.gm, path, module)
        a = codes_through(self.graph, lp, lchain, self.copies)
        b = codes_through(self.graph, rp, rchain, self.copies)
        with self.graph.inserting_before(node):
            int_node = self.graph.call_module(path, (a, b))
        int_node.meta.update(node.meta)
        node.replace_all_uses_with(int_node)
        self.graph.erase_node(node)
        self.values[int_node.name] = self.values[node.name]
        self.int_nodes.append(int_node)
        self.result.int_matmuls.append(int_node.name)

    def _lis_source(self, node) -> Optional[fx.Node]:
        """The LogIntSoftmax node whose probabilities reach ``node`` through pass-through modules only."""
        while isinstance(node, fx.Node) and len(node.users) == 1 and is_pass_through_module(self.gm, node):
            node = node.args[0]
        lis = submodule(self.gm, node) if isinstance(node, fx.Node) and len(node.users) == 1 else None
        if isinstance(lis, SOFTMAX_POINT_TYPES):
            return node if submodule(self.gm, node).dim in (-1, len(self.values[node.name].shape) - 1) else None
        return None

    def _lower_lis_matmul(self, node: fx.Node, lis_node: fx.Node, right) -> None:
        point, chain = right
        scale, zero = params_after(self.gm, chain, point, self.values)
        if (scale.dim() >= 2 and scale.size(-2) != 1) or (zero.dim() >= 2 and zero.size(-2) != 1):
            self.result.float_points.append(
                f"{node.name} (attn_out): float matmul: the V scale varies along the summed tokens"
            )
            return
        lis: LogIntSoftmax = submodule(self.gm, lis_node)
        tokens = self.values[lis_node.name].shape[-1]  # the probabilities' last axis is the summed one
        # every partial sum |v - zv| * 2**T * tokens must stay an exact float64 integer
        v_scale, label = scale * point.fake_quantize.post_scale, node.meta.get(ROLE) or node.name
        if isinstance(lis, LogBaseSoftmax):  # log_sqrt2 / adaptive base: one accumulator per constant
            max_shift = exact_shift_matmul_bound(tokens, point.magnitude(), lis.max_exponent)
            module = lis.shift_matmul(v_scale, zero, max_shift, label)
        else:
            max_shift = exact_shift_matmul_bound(tokens, point.magnitude(), 2**lis.bits - 2)
            module = LisShiftMatmul(lis.scale, lis.bits, lis.renormalize, v_scale, zero, max_shift, label=label)
        path = unique_attr(self.gm, f"fxq_shift_{node.name}")
        install_submodule(self.gm, path, module)
        v_codes = codes_through(self.graph, point, chain, self.copies)
        with self.graph.inserting_before(node):
            new = self.graph.call_module(path, (lis_node.args[0], v_codes))
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        self.graph.erase_node(node)
        self.values[new.name] = self.values[node.name]
        self.result.shift_matmuls.append(
            f"{new.name}: {lis_node.name} @ {point.name} ({point.label}), shifts up to {max_shift}"
        )

    # -- requantization straight to the next point
    def _fuse_requantization(self, node: fx.Node) -> None:
        chain, current = [], node
        while len(current.users) == 1:
            user = next(iter(current.users))
            if user in self.by_codes and user.args[0] is current:
                break
            if not (moves_elements(self.gm, user, allow_pad=False) and user.args[0] is current):
                return
            chain.append(user)
            current = user
        else:
            return
        codes_node = next(iter(current.users))
        point = self.by_codes[codes_node]
        params = params_before(self.gm, chain, point, tuple(self.values[node.name].shape), self.values)
        if params is None:
            return
        scale, zero = params
        module = submodule(self.gm, node)
        if isinstance(module, IntLinear):
            if not only_last_dim(scale) or not only_last_dim(zero):
                return
            features = module.out_features
            scale, zero = scale.reshape(-1).expand(features), zero.reshape(-1).expand(features)
        elif not (batch_independent(scale) and batch_independent(zero)):
            return
        module.set_codes_output(scale, zero.round(), point.qmin, point.qmax, point.label)
        for moved in [node, *chain]:
            drop_origin(moved)
        codes_node.replace_all_uses_with(current)
        self.graph.erase_node(codes_node)
        del self.by_codes[codes_node]
        current.meta[CODES_OF] = (point.name, point.shift)
        point.codes = current
        self.by_codes[current] = point
        self.result.requantized.append(f"{node.name} -> {point.name} ({point.label})")


def lower_to_integer(gm: fx.GraphModule, example_inputs: tuple) -> IntegerLowering:
    """Rewrite a lowered fake-quant GraphModule into an integer one, in place. ``example_inputs``
    are run once to learn tensor shapes (how scales map through reshapes). The IntLinears
    keep their setup tensors (``IntLinear.release_setup_tensors`` drops them)."""
    values = capture_values(gm, tuple(example_inputs))
    result = _Lowering(gm, values).run()
    result.nonfinite_checks = guard_nonfinite(gm, tuple(example_inputs))  # NaN/inf samples stay NaN
    gm.graph.lint()
    gm.recompile()
    return result


class LowerInteger(Pass):
    name = "lower_integer"
    contract = Contract(requires={Prop.FAKE_QUANT}, provides={Prop.INTEGER}, removes={Prop.FAKE_QUANT})

    def requires(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        modules = list(gm.modules())
        if any(isinstance(m, ObserverModule) for m in modules):
            raise NodeError("output", "the graph still holds observers; run calibrate and lower_fake_quant first")
        # a graph whose every point keep_float left in float (FloatPoint) has nothing to lower, and that is fine
        if not any(isinstance(m, (FakeQuantize, FloatPoint)) for m in modules):
            weights = any(isinstance(m, QUANTIZED_WEIGHT_TYPES) for m in modules)
            raise NodeError(
                "output",
                f"backend='int' computes on int8 activation codes, but qconfig "
                f"{ctx.qconfig.name!r} quantizes no activation (no quantization point in the graph"
                f"{', only weights' if weights else ''}): nothing can run in integer arithmetic. Use "
                "backend='fake', or a qconfig with activation points (the w8a8 preset, say)",
            )

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        result = lower_to_integer(gm, ctx.diff_inputs)
        if ctx.report is not None:
            ctx.report.float_points += [*result.float_points, FLOAT_OPS]
        ctx.note(
            f"lower_integer: {len(result.points)} points as int8 codes, {len(result.int_linears)} "
            f"IntLinear, {len(result.int_matmuls)} IntMatmul, {len(result.int_layernorms)} IntLayerNorm, "
            f"{len(result.shift_matmuls)} LisShiftMatmul, {len(result.requantized)} dyadic requantizations "
            "straight to the next point"
        )
        checks = result.nonfinite_checks
        ctx.note(
            f"non-finite guard: NaN/inf checked per sample in {len(checks)} float tensor(s) before they "
            f"become codes ({', '.join(checks) or 'none is computed from the inputs in float'}); a sample "
            "holding one gets NaN outputs, as in FP32 (fxquant.lowering.nonfinite)"
        )
        ctx.note(
            *(f"integer LayerNorm: {r}" for r in result.int_layernorms),
            *(f"attn@V by shifts: {r}" for r in result.shift_matmuls),
            *(f"elementwise: {r}" for r in result.code_luts),
            *(f"requantized: {r}" for r in result.requantized),
            *result.float_boundaries,
        )
        return gm

    def ensures(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        for name, module in gm.named_modules():
            if isinstance(module, IntLinear) and module.weight_codes.dtype != torch.int8:
                raise NodeError(name, "IntLinear weight is not stored as int8")


__all__ = ["LowerInteger", "lower_to_integer", "IntegerLowering", "CODES_OF"]
