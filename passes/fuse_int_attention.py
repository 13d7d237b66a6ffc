"""fuse_int_attention: each attention core of the integer graph becomes one ``IntAttention``.

Runs after ``use_onednn_kernels`` (``compile(..., backend="int", int_kernels="onednn")``).
The pattern, as ``lower_integer`` and ``use_onednn_kernels`` leave it when the attention
probabilities stay in float (``w8a8``):

    IntMatmul(q, kT) -> codes of the score point (float32 requantization)
      -> DequantizeCodes (one multiply-add)
      -> [timm's maybe_add_mask with no mask]
      -> softmax(dim=-1) -> [Dropout(p=0) / Identity]
      -> matmul(., DequantizeCodes(v codes))

becomes ``IntAttention(q, kT, v codes)`` (``fxquant.runtime.int_attention``): one C++ kernel per
(batch, head), the scores never written to memory. Anything else between those nodes (a
relative position bias or a mask, as in Swin; log2 probabilities, which ``lower_integer``
already made a ``LisShiftMatmul``; a node with a second reader) leaves that attention as it
is. Where the kernel cannot be built (no C++ compiler), nothing is fused and the report
says why.

With log2 probabilities (``fqvit_w8a8``, ``int8_all``), ``IntMatmul -> DequantizeCodes ->
[no-mask adds] -> LisShiftMatmul(scores, v codes)`` becomes ``IntLisAttention(q, kT, v codes)``
(``fxquant.runtime.int_lis_attention``) where the Log-Int-Softmax grid is the scores'
dequantization scale: bit-exact (its score codes stay inside the kernel too).

Not bit-exact (the float softmax): the softmax and attn@V round differently in float32 (the score codes are
computed with the same arithmetic), so the next point's codes can differ by one step where
a value lies within float32 rounding of a step boundary. The score point's codes stay
inside the kernel: the code comparison with the fake-quant graph, which ``fxquant.compile``
makes on the final graph, covers every other point, and a score's rare 1-LSB flip shows at the next
point (``attn_v_out``), where it can move a code by more than one step.
"""

from __future__ import annotations

import sys
from typing import Optional

import torch
import torch.fx as fx

from fxquant.errors import NodeError
from fxquant.infra.contracts import Contract, Prop
from fxquant.infra.pass_manager import Pass, PassContext
from fxquant.ir.graph_utils import install_submodule, propagate_shapes, remove_dead_nodes, shape_of, unique_attr
from fxquant.ir.meta import CODES_OF, POINT, ROLE, copy_provenance
from fxquant.ir.patterns import is_matmul, is_pass_through_module, is_softmax, single_user, softmax_dim, submodule
from fxquant.runtime.int_attention import (
    IntAttention,
    check_head_constants,
    kernel_error,
    load_kernel,
    needs_build,
    per_head,
)
from fxquant.runtime.int_lis_attention import IntLisAttention
from fxquant.runtime.int_modules import DequantizeCodes, IntMatmul
from fxquant.runtime.integer import UINT8_OFFSET
from fxquant.runtime.log_int_softmax import LisShiftMatmul, lis_kernel_constants


def _timm_attention_helper(node: fx.Node, name: str) -> bool:
    """``node`` calls timm's ``timm.layers.attention.<name>`` (the function itself, not a namesake)."""
    if node.op != "call_function":
        return False
    try:
        from timm.layers import attention as timm_attention
    except ImportError:  # pragma: no cover - timm is a dependency
        return False
    return node.target is getattr(timm_attention, name, None)


def _argument(node: fx.Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _is_unmasked(mask: fx.Node) -> bool:
    """``resolve_self_attn_mask(n, x, attn_mask=None, is_causal=False)`` (timm): it returns None."""
    return (
        _timm_attention_helper(mask, "resolve_self_attn_mask")
        and _argument(mask, 2, "attn_mask") is None
        and _argument(mask, 3, "is_causal", False) is False
    )


def _is_no_mask(node: fx.Node) -> bool:
    """timm's ``maybe_add_mask(x, m)`` with ``m`` None or an unmasked resolve: it returns x."""
    if not _timm_attention_helper(node, "maybe_add_mask"):
        return False
    mask = _argument(node, 1, "attn_mask")
    return mask is None or (isinstance(mask, fx.Node) and _is_unmasked(mask) and len(mask.users) == 1)


def _next_in_chain(node: fx.Node) -> Optional[fx.Node]:
    """The one reader of ``node``, not counting an unmasked resolve (it reads only the dtype)
    that feeds that reader."""
    users = list(node.users)
    if len(users) == 2:
        resolve = [u for u in users if _is_unmasked(u) and list(u.users) == [v for v in users if v is not u]]
        if resolve:
            users = [u for u in users if u is not resolve[0]]
    return users[0] if len(users) == 1 else None


def _softmax_last_dim(gm: fx.GraphModule, node: fx.Node) -> bool:
    if not is_softmax(gm, node) or node.kwargs.get("dtype") is not None:
        return False
    dim, shape = softmax_dim(gm, node), shape_of(node)
    return dim == -1 or (dim is not None and shape is not None and dim == len(shape) - 1)


def _identity_module(gm: fx.GraphModule, node: fx.Node) -> bool:
    module = submodule(gm, node)
    return is_pass_through_module(gm, node) and (not isinstance(module, torch.nn.Dropout) or module.p == 0)


class _Match:
    def __init__(self, scores: fx.Node, dequant: fx.Node, chain: list[fx.Node], matmul: fx.Node, v_dequant: fx.Node):
        self.scores, self.dequant, self.chain, self.matmul, self.v_dequant = scores, dequant, chain, matmul, v_dequant


def _match(gm: fx.GraphModule, scores: fx.Node) -> tuple[Optional[_Match], str]:
    """The attention core starting at an IntMatmul node, or None and why not."""
    module = submodule(gm, scores)
    if not module.requantizes or not module.float_requant:
        return None, "the scores are not requantized to codes with float32 scales"
    dequant = single_user(scores)
    dq = submodule(gm, dequant) if dequant is not None else None
    if not isinstance(dq, DequantizeCodes) or not dq.fused_affine:
        return None, "the score codes are not read by one multiply-add dequantization only"
    chain, node, softmax_seen = [], dequant, False
    while True:  # [no-mask adds] softmax(-1) [identities], each read only by the next
        nxt = _next_in_chain(node)
        if nxt is None:
            return None, "a value between the scores and attn@V has more than one reader"
        reads_node = bool(nxt.args) and nxt.args[0] is node
        if reads_node and _is_no_mask(nxt):
            pass
        elif reads_node and not softmax_seen and _softmax_last_dim(gm, nxt):
            softmax_seen = True
        elif softmax_seen and nxt.op == "call_module" and _identity_module(gm, nxt):
            pass
        else:
            break
        chain.append(nxt)
        node = nxt
    if not softmax_seen:
        return None, "something other than a softmax over the last dimension reads the scores"
    matmul = single_user(node)
    if matmul is None or not is_matmul(matmul) or len(matmul.args) != 2 or matmul.args[0] is not node:
        return None, "the probabilities are not the left operand of a matmul"
    v_dequant = matmul.args[1]
    vd = submodule(gm, v_dequant) if isinstance(v_dequant, fx.Node) else None
    if not isinstance(vd, DequantizeCodes) or vd.fused_affine or vd.post_scale != 1.0:
        return None, "V is not a plain dequantization of codes"
    operands = (scores.args[0], scores.args[1], v_dequant.args[0])
    shapes = [shape_of(n) if isinstance(n, fx.Node) else None for n in operands]
    if any(shape is None for shape in shapes):
        return None, "the operands' shapes are unknown (the pass needs diff inputs to propagate them)"
    if any(len(shape) != 4 for shape in shapes):
        return None, "the attention operands are not 4-d (batch, head, rows, cols)"
    return _Match(scores, dequant, chain, matmul, v_dequant), ""


def _match_lis(gm: fx.GraphModule, scores: fx.Node) -> tuple[Optional[_Match], str]:
    """IntMatmul -> DequantizeCodes -> [no-mask adds] -> LisShiftMatmul(scores, v codes), each
    read only by the next, with the scores' LIS grid equal to their dequantization scale (then
    the gaps to a row's largest score are those of the codes)."""
    module = submodule(gm, scores)
    dequant = single_user(scores)
    dq = submodule(gm, dequant) if dequant is not None else None
    if not isinstance(dq, DequantizeCodes):
        return None, ""  # not this pattern: the float-softmax match says why
    chain, node = [], dequant
    while True:
        nxt = _next_in_chain(node)
        if nxt is None or not (nxt.args and nxt.args[0] is node):
            return None, ""
        if not _is_no_mask(nxt):
            break
        chain.append(nxt)
        node = nxt
    lis = submodule(gm, nxt)
    if not isinstance(lis, LisShiftMatmul):
        return None, ""
    if not module.requantizes or not module.float_requant:
        return None, "the scores are not requantized to codes with float32 scales"
    if dq.fused_affine or dq.post_scale != 1.0:
        return None, "the score codes are not read by one plain dequantization only"
    operands = (scores.args[0], scores.args[1], nxt.args[1])
    shapes = [shape_of(n) if isinstance(n, fx.Node) else None for n in operands]
    if any(shape is None or len(shape) != 4 for shape in shapes):
        return None, "the operands' shapes are unknown or not 4-d (batch, head, rows, cols)"
    heads = shapes[0][1]
    try:
        grid, scale = per_head(lis.lis_scale, heads, "LIS grid"), per_head(dq.scale, heads, "score scale")
    except ValueError as exc:
        return None, str(exc)
    if not torch.equal(grid.expand(max(grid.numel(), scale.numel())), scale.expand(max(grid.numel(), scale.numel()))):
        return None, "the Log-Int-Softmax grid is not the scores' dequantization scale"
    return _Match(scores, dequant, chain, nxt, nxt.args[1]), ""


def _score_columns(scores: IntMatmul, where: str) -> list[torch.Tensor]:
    """q@kT's per-head constants both fused kernels start with: the Q and K zero points (on the
    codes' own type) and the score requantization's multiplier and zero point."""
    return [
        per_head(scores.a_zero_point + (UINT8_OFFSET if scores.a_uint8 else 0), None, f"{where}: q zero point"),
        per_head(scores.b_zero_point + (UINT8_OFFSET if scores.b_uint8 else 0), None, f"{where}: k zero point"),
        per_head(scores.float_multiplier, None, f"{where}: score multiplier"),
        per_head(scores.float_zero_point, None, f"{where}: score zero point"),
    ]


def _lis_module(match: _Match, gm: fx.GraphModule) -> IntLisAttention:
    scores: IntMatmul = submodule(gm, match.scores)
    lis: LisShiftMatmul = submodule(gm, match.matmul)
    where = str(match.scores.target)
    columns = _score_columns(scores, where)
    heads = max(c.numel() for c in columns)
    if any(c.numel() not in (1, heads) for c in columns):
        raise ValueError(f"{where}: the per-head constants disagree on the number of heads")
    v_zero = lis.v_zero_point + (UINT8_OFFSET if lis.v_uint8 else 0)
    shape_q, shape_v = shape_of(match.scores.args[0]), shape_of(match.v_dequant)
    if lis_kernel_constants(lis.lis_scale, lis.bits, lis.v_scale, v_zero, shape_q[1], shape_v[-1]) is None:
        raise ValueError(f"{where}: the Log-Int-Softmax constants do not fit the kernel (see lis_kernel_constants)")
    constants = torch.stack([c.expand(heads) for c in columns], dim=1)
    label = scores.label or where
    return IntLisAttention(
        constants,
        scores.qmin,
        scores.qmax,
        lis.lis_scale,
        lis.bits,
        lis.renormalize,
        lis.v_scale,
        v_zero,
        lis.max_shift,
        label=label,
    )


def _head_constants(match: _Match, gm: fx.GraphModule) -> torch.Tensor:
    scores: IntMatmul = submodule(gm, match.scores)
    dq: DequantizeCodes = submodule(gm, match.dequant)
    vd: DequantizeCodes = submodule(gm, match.v_dequant)
    where = str(match.scores.target)
    columns = _score_columns(scores, where) + [
        per_head(dq.affine_scale, None, f"{where}: score scale"),
        per_head(dq.affine_bias, None, f"{where}: score bias"),
        per_head(vd.scale, None, f"{where}: V scale"),
        per_head(vd.zero_point, None, f"{where}: V zero point"),
    ]
    heads = max(c.numel() for c in columns)
    if any(c.numel() not in (1, heads) for c in columns):
        raise ValueError(f"{where}: the per-head constants disagree on the number of heads")
    constants = torch.stack([c.expand(heads) for c in columns], dim=1)
    try:
        check_head_constants(constants)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    return constants


class FuseIntAttention(Pass):
    name = "fuse_int_attention"
    # its pattern is the float32 score requantization use_onednn_kernels sets up
    contract = Contract(requires={Prop.ONEDNN_KERNELS}, provides={Prop.ATTENTION_FUSED})

    def requires(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        if not any(isinstance(m, (IntMatmul, DequantizeCodes)) for m in gm.modules()):
            raise NodeError("output", "no integer modules in the graph; run lower_integer first")

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        if ctx.diff_inputs:  # ranks of the attention operands (the kernel takes 4-d ones)
            propagate_shapes(gm, tuple(ctx.diff_inputs))
        candidates = [n for n in gm.graph.nodes if isinstance(submodule(gm, n), IntMatmul)]
        matches, skipped = [], {}
        for node in candidates:
            match, why = _match(gm, node)
            try:
                if match is not None:
                    matches.append((match, _head_constants(match, gm)))
                    continue
                lis_match, lis_why = _match_lis(gm, node)
                if lis_match is not None:
                    matches.append((lis_match, _lis_module(lis_match, gm)))
                    continue
                skipped[node.name] = lis_why or why
            except ValueError as exc:
                skipped[node.name] = str(exc)
        if matches and ctx.progress and needs_build():
            print(
                "fuse_int_attention: compiling the fused attention kernel "
                "(fxquant/runtime/csrc/int_attention.cpp; once per "
                "machine, about 10-30 s)",
                file=sys.stderr,
                flush=True,
            )
        if matches and not load_kernel():
            ctx.note(f"fuse_int_attention: {len(matches)} attention cores left unfused: {kernel_error()}")
            matches = []
        for match, constants in matches:
            self._fuse(gm, match, constants)
        if matches:
            remove_dead_nodes(gm.graph)
            gm.delete_all_unused_submodules()
            gm.recompile()
            ctx.note(
                f"fuse_int_attention: {len(matches)} attention cores (q @ kT, score requantization, "
                f"softmax, attn@V) as one kernel each ({len(candidates)} integer matmuls examined); their "
                "score codes stay inside the kernel and are not in the code comparison"
            )
        ctx.note(*(f"unfused attention {name}: {why}" for name, why in sorted(skipped.items())))
        return gm

    @staticmethod
    def _fuse(gm: fx.GraphModule, match: _Match, constants) -> None:
        scores: IntMatmul = submodule(gm, match.scores)
        label = scores.label or str(match.scores.target)
        path = unique_attr(gm, f"fxq_{match.matmul.name}_attention")
        if isinstance(constants, IntLisAttention):  # the matmul is the LisShiftMatmul, "v_dequant" its V codes
            install_submodule(gm, path, constants)
            v_codes = match.v_dequant
        else:
            install_submodule(gm, path, IntAttention(constants, scores.qmin, scores.qmax, label=label))
            v_codes = match.v_dequant.args[0]
        q, kt = match.scores.args[0], match.scores.args[1]
        with gm.graph.inserting_before(match.matmul):
            fused = gm.graph.call_module(path, (q, kt, v_codes))
        copy_provenance(match.matmul, fused)  # it computes attn@V: the diff pairs it with the FP32 matmul
        for key in (ROLE, POINT, "tensor_meta"):
            if key in match.matmul.meta:
                fused.meta[key] = match.matmul.meta[key]
        match.matmul.replace_all_uses_with(fused)
        for node in [match.matmul, *reversed(match.chain), match.dequant, match.scores]:
            mask = _argument(node, 1, "attn_mask") if _is_no_mask(node) else None
            gm.graph.erase_node(node)
            if isinstance(mask, fx.Node) and not mask.users:
                gm.graph.erase_node(mask)

    def ensures(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        for node in gm.graph.nodes:
            if isinstance(submodule(gm, node), (IntAttention, IntLisAttention)) and CODES_OF in node.meta:
                raise NodeError(node.name, "a fused attention node cannot stand for a point's codes")


__all__ = ["FuseIntAttention"]
