"""rotate: multiply the residual stream and every attention head by an orthogonal matrix,
folded into the weights, so the quantized activations lose their outlier channels.

Real ViTs carry a few residual channels hundreds of times larger than the rest (DINOv2's
norm2 output: one channel at 140, the median at 6.5); per-tensor activation grids spend
their range on them. An orthogonal Q spreads each channel over all of them (QuaRot,
SpinQuant), and with ``Q @ 1 = 1`` (fxquant.quant.rotation) LayerNorm commutes with it,
so on a pre-LN transformer (fxquant.ir.residual) nothing but weights changes:

- residual (``rotate: {residual: true}``): the stream becomes ``x @ Q``. The embedding's
  parameters (cls token, position embedding) and the patch projection's output channels,
  and every branch's last Linear (attention proj, fc2, with its LayerScale folded in) write
  ``@ Q``; each LayerNorm that feeds Linears gives its gamma and beta to them and reads
  ``@ Q`` (``W <- W diag(gamma) Q``, ``b <- b + W beta``); the last LayerNorm's affine and
  the inverse rotation go into the head Linear when only token selection lies between
  them, else into a new float Linear ``<norm>_unrotate`` after it (listed in the report).
- heads (``rotate: {heads: true}``): per head, Q and K by the same randomized Hadamard R
  (``q R (k R)^T = q k^T``), V by another with its inverse folded into proj's columns.
- fc2 (``rotate: {fc2: true}``, off by default): an online block Walsh-Hadamard transform
  (fxquant.runtime.hadamard) between the GELU and fc2, fc2's columns times the same matrix;
  the quantization point of fc2's input moves onto the transform's output.

Runs after ``split_qkv`` and before ``smooth`` and the observers. FP32 output unchanged up
to float rounding (a neutral pass: >= 100 dB or the pass fails). Nodes holding rotated
values get ``<name>@rotate`` origins, so the diff pairs them with themselves. Where the
graph has no pre-LN residual stream (Swin's stages change width), the residual part is
skipped with the reason in the notes; heads are rotated wherever the
attention's layout is recognized.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.fx as fx
from torch import nn

from fxquant.infra.contracts import Contract, Prop
from fxquant.infra.pass_manager import Pass, PassContext
from fxquant.ir.graph_utils import (
    install_submodule,
    mark_changed_values,
    new_node,
    propagate_shapes,
    shape_of,
    unique_attr,
)
from fxquant.ir.meta import MODULE, POINT, WEIGHT, copy_provenance
from fxquant.ir.patterns import find_attention, is_pass_through_module, reads_shape_only, rearranges_elements, submodule
from fxquant.ir.residual import ResidualStream, attr_tensor, find_residual_stream, selects_tokens
from fxquant.quant.rotation import block_diagonal, hadamard, mean_preserving_orthogonal, random_hadamard
from fxquant.runtime.hadamard import BlockHadamard, largest_power_of_two_block


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float64)


def _set(param: torch.Tensor, value: torch.Tensor) -> None:
    with torch.no_grad():
        param.copy_(value.to(param.dtype))


# ------------------------------------------------------------------------ residual stream
def _fold_reader(gm: fx.GraphModule, norm_node: fx.Node, linears: list, q: torch.Tensor) -> None:
    """A LayerNorm now reads ``x @ Q``: its affine and Q^T's inverse into the Linears after it."""
    norm = submodule(gm, norm_node)
    gamma = _f64(norm.weight) if norm.weight is not None else torch.ones(q.shape[0], dtype=torch.float64)
    beta = _f64(norm.bias) if norm.bias is not None else torch.zeros(q.shape[0], dtype=torch.float64)
    for node in linears:
        linear = submodule(gm, node)
        w = _f64(linear.weight)
        bias = w @ beta + (_f64(linear.bias) if linear.bias is not None else 0.0)
        _set(linear.weight, (w * gamma[None, :]) @ q)
        if linear.bias is None:
            linear.bias = nn.Parameter(bias.to(linear.weight.dtype))
        else:
            _set(linear.bias, bias)
    _clear_affine(norm)


def _clear_affine(norm: nn.LayerNorm) -> None:
    with torch.no_grad():
        if norm.weight is not None:
            norm.weight.fill_(1.0)
        if norm.bias is not None:
            norm.bias.zero_()


def _fold_writer(gm: fx.GraphModule, writer, q: torch.Tensor) -> None:
    linear = submodule(gm, writer.linear)
    scale = torch.ones(q.shape[0], dtype=torch.float64)
    for attr in writer.layer_scales:
        param = attr_tensor(gm, attr)
        scale = scale * _f64(param)
        with torch.no_grad():
            param.fill_(1.0)
    _set(linear.weight, q.T @ (scale[:, None] * _f64(linear.weight)))
    if linear.bias is not None:
        _set(linear.bias, q.T @ (scale * _f64(linear.bias)))


def _rotate_embedding(gm: fx.GraphModule, stream: ResidualStream, q: torch.Tensor) -> None:
    for attr in stream.embed_params:
        value = attr_tensor(gm, attr)
        _set(value, _f64(value) @ q)
    for node in stream.embed_linears:
        module = submodule(gm, node)
        _set(module.weight, torch.einsum("o...,op->p...", _f64(module.weight), q))
        if module.bias is not None:
            _set(module.bias, _f64(module.bias) @ q)


def _head_after(gm: fx.GraphModule, norm_node: fx.Node) -> tuple[Optional[fx.Node], fx.Node]:
    """(the Linear the final norm reaches through token selection and pass-through modules
    only, or None; the last node of that chain, where the features leave the rotated basis)."""
    node = norm_node
    while len(node.users) == 1:
        user = next(iter(node.users))
        if isinstance(submodule(gm, user), nn.Linear) and user.args[0] is node:
            return user, node
        if not (selects_tokens(user) or is_pass_through_module(gm, user)) or user.op == "output":
            break
        node = user
    return None, node


def _unrotate_output(gm: fx.GraphModule, ctx: PassContext, stream: ResidualStream, q: torch.Tensor) -> fx.Node:
    final = stream.final_norm
    norm = submodule(gm, final)
    d = stream.width
    gamma = _f64(norm.weight) if norm.weight is not None else torch.ones(d, dtype=torch.float64)
    beta = _f64(norm.bias) if norm.bias is not None else torch.zeros(d, dtype=torch.float64)
    head, tail = _head_after(gm, final)
    if head is not None:
        _fold_reader(gm, final, [head], q)
        ctx.note(f"{final.name}: affine and inverse rotation folded into {head.name}")
        return head
    _clear_affine(norm)
    unrotate = nn.Linear(d, d, dtype=norm.weight.dtype if norm.weight is not None else torch.float32)
    _set(unrotate.weight, gamma[:, None] * q)
    _set(unrotate.bias, beta)
    path = unique_attr(gm, f"{final.target}_unrotate".replace(".", "_"))
    install_submodule(gm, path, unrotate)
    # after the token selection (the cls token only) and after any point on it, so the
    # quantized features stay in the rotated basis
    with gm.graph.inserting_after(tail):
        node = new_node(gm.graph, "call_module", path, (tail,), module=final.meta.get(MODULE, ""))
    tail.replace_all_uses_with(node, delete_user_cb=lambda user: user is not node)
    copy_provenance(tail, node)
    message = (
        f"{path} (float Linear): rotate's inverse rotation and {final.name}'s affine, "
        "restoring the output features' basis; no head Linear to fold it into"
    )
    if ctx.report is not None:
        ctx.report.float_points.append(message)
    ctx.note(message)
    return node


# --------------------------------------------------------------------------------- heads
def _linear_before(gm: fx.GraphModule, node: fx.Node) -> tuple[Optional[fx.Node], Optional[fx.Node]]:
    """Walk back over layout ops and pass-through modules: (Linear node, first reshape after it)."""
    reshape = None
    while not isinstance(submodule(gm, node), nn.Linear):
        if not rearranges_elements(gm, node) or not isinstance(node.args[0], fx.Node):
            return None, None
        if node.op == "call_method" and node.target in ("reshape", "view"):
            reshape = node
        node = node.args[0]
    return node, reshape


def _linear_after(gm: fx.GraphModule, node: fx.Node) -> Optional[fx.Node]:
    while len(node.users) == 1:
        user = next(iter(node.users))
        if isinstance(submodule(gm, user), nn.Linear):
            return user
        if not rearranges_elements(gm, user):
            return None
        node = user
    return None


def _heads_layout(reshape: Optional[fx.Node], out_features: int, head_dim: int) -> bool:
    """The Linear's outputs are split as (..., heads, head_dim), head_dim fastest."""
    if reshape is None or head_dim <= 0 or out_features % head_dim:
        return False
    sizes = reshape.args[1] if len(reshape.args) == 2 and isinstance(reshape.args[1], (tuple, list)) else reshape.args
    tail = tuple(sizes[-2:])
    heads = out_features // head_dim
    return tail in ((heads, head_dim), (heads, -1), (-1, head_dim))


def _rotate_rows(module: nn.Linear, rotation: torch.Tensor) -> None:
    _set(module.weight, rotation.T @ _f64(module.weight))
    if module.bias is not None:
        _set(module.bias, rotation.T @ _f64(module.bias))


def _rotate_heads(gm: fx.GraphModule, ctx: PassContext, seed: int) -> tuple[list, list]:
    """Returns (rotated producers, nodes that undo the rotation) for the origin update."""
    producers, stops = [], []
    for index, match in enumerate(find_attention(gm)):
        shape = shape_of(match.q)
        head_dim = shape[-1] if shape else 0
        q_lin, q_reshape = _linear_before(gm, match.q)
        k_lin, k_reshape = _linear_before(gm, match.k)
        v_lin, v_reshape = _linear_before(gm, match.v)
        proj = _linear_after(gm, match.out)
        done = []
        rotation = random_hadamard(head_dim, seed + 2 * index) if head_dim else None
        if (
            q_lin is not None
            and k_lin is not None
            and q_lin is not k_lin
            and len(q_lin.users) == 1
            and len(k_lin.users) == 1
            and _heads_layout(q_reshape, submodule(gm, q_lin).out_features, head_dim)
            and _heads_layout(k_reshape, submodule(gm, k_lin).out_features, head_dim)
        ):
            blocks = block_diagonal(rotation, submodule(gm, q_lin).out_features // head_dim)
            _rotate_rows(submodule(gm, q_lin), blocks)
            _rotate_rows(submodule(gm, k_lin), blocks)
            producers += [q_lin, k_lin]
            stops.append(match.scores)
            done.append("Q/K")
        v_head_dim = (shape_of(match.v) or (0,))[-1]
        if (
            v_lin is not None
            and proj is not None
            and len(v_lin.users) == 1
            and _heads_layout(v_reshape, submodule(gm, v_lin).out_features, v_head_dim)
            and submodule(gm, proj).in_features == submodule(gm, v_lin).out_features
        ):
            v_rotation = random_hadamard(v_head_dim, seed + 2 * index + 1)
            blocks = block_diagonal(v_rotation, submodule(gm, v_lin).out_features // v_head_dim)
            _rotate_rows(submodule(gm, v_lin), blocks)
            proj_module = submodule(gm, proj)
            _set(proj_module.weight, _f64(proj_module.weight) @ blocks)
            producers.append(v_lin)
            stops.append(proj)
            done.append("V/proj")
        where = match.module or match.scores.name
        ctx.note(f"{where}: heads rotated ({', '.join(done)})" if done else f"{where}: head layout not recognized")
    return producers, stops


# ----------------------------------------------------------------------------------- fc2
def _rotate_fc2_inputs(gm: fx.GraphModule, ctx: PassContext) -> None:
    for fc2 in list(gm.graph.nodes):
        weight = fc2.meta.get(WEIGHT)
        if weight is None or weight.group != "mlp_fc2" or not isinstance(submodule(gm, fc2), nn.Linear):
            continue
        point_node = fc2.args[0]
        while POINT not in point_node.meta and is_pass_through_module(gm, point_node) and len(point_node.users) == 1:
            point_node = point_node.args[0]
        if POINT not in point_node.meta or len(point_node.users) != 1:
            ctx.note(f"{fc2.name}: input not quantized on its own, no online Hadamard")
            continue
        linear = submodule(gm, fc2)
        block = largest_power_of_two_block(linear.in_features)
        if block < 2:
            ctx.note(f"{fc2.name}: {linear.in_features} inputs have no power-of-two block, no online Hadamard")
            continue
        path = unique_attr(gm, f"{fc2.target}_hadamard".replace(".", "_"))
        install_submodule(gm, path, BlockHadamard(linear.in_features, block))
        with gm.graph.inserting_before(fc2):
            node = new_node(gm.graph, "call_module", path, (fc2.args[0],), module=fc2.meta.get(MODULE, ""))
        fc2.args = (node, *fc2.args[1:])
        node.meta[POINT] = point_node.meta.pop(POINT)
        blocks = block_diagonal(hadamard(block), linear.in_features // block)
        _set(linear.weight, _f64(linear.weight) @ blocks)
        ctx.note(f"{fc2.name}: online Hadamard (blocks of {block}) on its input; point moved from {point_node.name}")


class Rotate(Pass):
    name = "rotate"
    neutral = True
    contract = Contract(
        requires={Prop.ANNOTATED, Prop.QKV_SPLIT}, provides={Prop.ROTATED}, excludes={Prop.SMOOTHED, Prop.OBSERVED}
    )

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        config = ctx.qconfig.recovery.get("rotate")
        if config is None:
            return gm
        if config.heads:
            propagate_shapes(gm, ctx.diff_inputs)
            producers, stops = _rotate_heads(gm, ctx, config.seed)
            mark_changed_values(producers, stops, "rotate")
        if config.fc2:
            _rotate_fc2_inputs(gm, ctx)
        if config.residual:
            stream = find_residual_stream(gm)
            if isinstance(stream, str):
                ctx.note(f"residual stream not rotated: {stream}")
            else:
                producers, stops = [], set()
                self._rotate_stream(gm, ctx, stream, config.seed, producers, stops)
                mark_changed_values(producers, stops, "rotate")
        gm.graph.lint()
        gm.recompile()
        return gm

    @staticmethod
    def _rotate_stream(gm, ctx, stream: ResidualStream, seed: int, producers: list, stops: set) -> None:
        q = mean_preserving_orthogonal(stream.width, seed)
        _rotate_embedding(gm, stream, q)
        for writer in stream.writers:
            _fold_writer(gm, writer, q)
        for reader in stream.readers:
            consumers = [u for u in reader.users if not reads_shape_only(u)]
            _fold_reader(gm, reader, consumers, q)
            stops.update(consumers)
        stops.add(_unrotate_output(gm, ctx, stream, q))
        producers += stream.embed_params + stream.embed_linears + [w.linear for w in stream.writers]
        ctx.note(
            f"residual stream ({stream.width} channels) rotated: {len(stream.embed_params)} embedding tensor(s), "
            f"{len(stream.embed_linears)} patch projection(s), {len(stream.writers)} writers, "
            f"{len(stream.readers)} LayerNorm readers"
        )
