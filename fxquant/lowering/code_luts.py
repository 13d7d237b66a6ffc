"""Element-wise float ops around the points of the integer graph, fused with their boundaries.

``DequantizeCodes -> act -> QuantizeCodes`` (``int8_all``'s GELU between the ``mlp_fc1`` and
``mlp_gelu`` points) is a function of the 256 input codes: one ``CodeLut``
(``fxquant.runtime.code_lut``) replaces the three nodes. A residual add of a dequantized
point (``x + proj's output``) becomes one ``DequantizeAdd`` on the codes
(``fxquant.runtime.fast_codes``). ``lower_integer`` calls ``fuse_elementwise`` after its own
rewrites.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F

from fxquant.ir.graph_utils import install_submodule, unique_attr
from fxquant.ir.patterns import behind_pass_through, is_add_of_two_values, single_user, submodule
from fxquant.lowering.code_chains import LoweredPoint
from fxquant.runtime.code_lut import CodeLut, code_table
from fxquant.runtime.fast_codes import DequantizeAdd
from fxquant.runtime.int_modules import DequantizeCodes, QuantizeCodes

__all__ = ["fuse_elementwise", "fuse_code_luts", "fuse_dequantize_adds"]

_MODULES = (torch.nn.GELU, torch.nn.ReLU, torch.nn.SiLU, torch.nn.Hardswish, torch.nn.Sigmoid, torch.nn.Tanh)
_FUNCTIONS = (F.gelu, F.relu, F.silu, F.hardswish, torch.relu, torch.sigmoid, torch.tanh)


def _elementwise(gm: fx.GraphModule, node: fx.Node) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
    """The op of ``node`` as a function of its one tensor input, when it is an element-wise activation."""
    module = submodule(gm, node)
    if isinstance(module, _MODULES) and len(node.args) == 1 and not node.kwargs:
        return module
    if node.op == "call_function" and node.target in _FUNCTIONS and node.args:
        rest = (*node.args[1:], *node.kwargs.values())
        if any(isinstance(a, fx.Node) for a in rest):
            return None
        return lambda x: node.target(x, *node.args[1:], **node.kwargs)
    return None


def _channels(*params: torch.Tensor) -> Optional[int]:
    """1 when every parameter is one value, C when they vary along the last dimension only, else None."""
    sizes = {p.numel() for p in params} - {1}
    if not sizes:
        return 1
    if len(sizes) > 1:
        return None
    count = sizes.pop()
    return count if all(p.numel() == 1 or p.shape[-1] == count for p in params) else None


def fuse_code_luts(gm: fx.GraphModule, points: Iterable[LoweredPoint]) -> list[str]:
    """Rewrite every ``DequantizeCodes -> activation -> QuantizeCodes`` (each read only by
    the next) into one ``CodeLut`` on the input codes; returns "act: in -> out" per table."""
    by_codes = {point.codes: point for point in points}
    done = []
    for node in list(gm.graph.nodes):
        quantize = submodule(gm, node)
        if not isinstance(quantize, QuantizeCodes) or node not in by_codes or not node.args:
            continue
        act = node.args[0]
        op = _elementwise(gm, act) if isinstance(act, fx.Node) and single_user(act) is node else None
        dequant_node = act.args[0] if op is not None else None
        dequant = submodule(gm, dequant_node) if isinstance(dequant_node, fx.Node) else None
        if not isinstance(dequant, DequantizeCodes) or single_user(dequant_node) is not act:
            continue
        channels = _channels(dequant.scale, dequant.zero_point, quantize.scale, quantize.zero_point)
        if channels is None:
            continue
        try:
            table = code_table(dequant, op, quantize, False, channels)
        except (ValueError, RuntimeError):  # scales laid out along other dimensions: leave it in float
            continue
        path = unique_attr(gm, f"fxq_lut_{act.name}")
        lut = CodeLut(table, quantize.qmin, quantize.qmax, quantize.codes_dtype == "uint8", False, quantize.label)
        install_submodule(gm, path, lut)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(path, (dequant_node.args[0],))
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        by_codes[node].codes = new
        for dead in (node, act, dequant_node):
            gm.graph.erase_node(dead)
        done.append(f"{act.name}: {by_codes[node].name} as a table of 256 codes")
    return done


def _dequantized_codes(gm: fx.GraphModule, node) -> Optional[tuple[fx.Node, list[fx.Node]]]:
    """(the DequantizeCodes node, the pass-through nodes after it) when ``node`` is a
    dequantized point read through identity modules only (each read only by the next)."""
    node, chain = behind_pass_through(gm, node)
    if node is not None and len(node.users) == 1 and isinstance(submodule(gm, node), DequantizeCodes):
        return (node, chain) if not submodule(gm, node).fused_affine else None
    return None


def fuse_dequantize_adds(gm: fx.GraphModule) -> list[str]:
    """``x + dequantize(codes)`` (either order, through identity modules) -> ``DequantizeAdd(x, codes)``."""
    done = []
    for node in list(gm.graph.nodes):
        if not is_add_of_two_values(node):
            continue
        for index in (1, 0):
            found = _dequantized_codes(gm, node.args[index])
            if found is None or node.args[1 - index] is found[0]:
                continue
            dequant_node, chain = found
            dequant: DequantizeCodes = submodule(gm, dequant_node)
            path = unique_attr(gm, f"fxq_add_{node.name}")
            install_submodule(
                gm, path, DequantizeAdd(dequant.label, dequant.scale, dequant.zero_point, dequant.post_scale)
            )
            with gm.graph.inserting_before(node):
                new = gm.graph.call_module(path, (node.args[1 - index], dequant_node.args[0]))
            new.meta.update(node.meta)
            node.replace_all_uses_with(new)
            for dead in (node, *chain, dequant_node):
                gm.graph.erase_node(dead)
            done.append(f"{node.name}: + {dequant.label} codes")
            break
    return done


def fuse_elementwise(gm: fx.GraphModule, points: Iterable[LoweredPoint]) -> list[str]:
    """``fuse_code_luts`` then ``fuse_dequantize_adds``; what each did."""
    luts = [f"code table: {r}" for r in fuse_code_luts(gm, points)]
    return luts + [f"dequantize fused into the add: {r}" for r in fuse_dequantize_adds(gm)]
