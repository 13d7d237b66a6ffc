"""NaN and inf through the integer graph: a sample that is NaN in FP32 is NaN here too.

Float arithmetic carries NaN and inf to the output; quantizing to codes does not (the clamp
sends +-inf to the end codes, and a NaN cast to int8 is some arbitrary code). Without help,
``backend="int"`` turns a NaN or inf input into a finite, wrong output where the FP32 model
(and the fake-quant graph, for NaN) returns NaN. ``guard_nonfinite`` (run by
``lower_to_integer``) adds a per-sample guard made of plain torch ops:

* **Where a non-finite value can be lost.** Integer modules compute on bounded codes: their
  outputs, and every DequantizeCodes', are finite. A non-finite value therefore comes from a
  graph input through float ops only (a static taint: placeholders, and every node reading a
  tainted node that is not an integer module), and it is lost where such a value enters an
  integer module (QuantizeCodes, the scores of a LisShiftMatmul) or a fake-quant module left
  in float (FakeQuantize, LogIntSoftmax clamp inf). Only those tensors are checked: in a
  w8a8 ViT the LayerNorm outputs on the float residual stream (2 per block and the final
  norm), in fqvit_w8a8 and int8_all the patch-embedding output alone.
* **The check**: ``amax`` and ``amin`` of each checked tensor over all but its first
  dimension (two read passes, no temporary of the tensor's size), then, for all checks at
  once, ``max * 0 + min * 0``: 0 for a finite row, NaN for a row holding a NaN or an inf,
  exactly (a product by 0 cannot overflow, where a sum of the row could). A row is a
  sample, or a window of one (Swin's ``(B * windows, tokens, C)``, batch-major as timm's
  window partition lays it out): the rows of one sample are reduced together.
* **The poison**: the per-sample result, -0.0 or NaN, is added to every floating-point
  output whose first dimension is the batch: ``y + -0.0`` is ``y`` bit for bit, so finite
  samples keep exactly the outputs they had, and a flagged sample is NaN in all its
  outputs. An output whose first dimension is not the batch, or a check whose first
  dimension does not hold the batch, makes the whole batch NaN when it fires.

Why per sample: FP32 attention mixes every token of a sample (Swin: the windows through
shifts, patch merging and the final pooling), and an inf becomes NaN at the next LayerNorm
or softmax, so one NaN or inf pixel makes every output of its sample NaN in FP32; no op
mixes samples, so the other samples stay finite. The guard reproduces exactly that.

Cost (ViT-B/16 w8a8, random init, batch 8, eager, measured on a shared 2-core x86 machine):
25 checked tensors of (8, 197, 768), each reduced right after it is computed (while it is in
cache, and so that it is freed as before). By torch.profiler the reductions take 2.4 ms of
a 706 ms forward on the portable kernels, 2.7 ms of 491 ms with oneDNN's (0.3 % and 0.55 %,
2 threads; 0.31 % and 0.46 % with 1 thread). End to end, guarded against the same graph with
the guard stripped (ABBA order, 16 pairs, 1 thread): median of the paired differences +9 ms
of 1.32 s (+0.7 %) portable, -1 ms of 0.87 s oneDNN; the machine's noise is +-2 %.
fqvit_w8a8 and int8_all check one tensor, the patch embedding's output. The guard compiles
with the graph under torch.compile.

Guard nodes carry ``node.meta[GUARD]`` (``"check"`` or ``"poison"``); ``strip_nonfinite_guard``
removes them. They are ``torch`` functions only, so a guarded graph saves like any other.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.fx as fx

from fxquant.ir.graph_utils import propagate_shapes, shape_of
from fxquant.ir.patterns import submodule
from fxquant.runtime.catalog import integer_module_types
from fxquant.runtime.fake_quant import FakeQuantize
from fxquant.runtime.log_base_softmax import SOFTMAX_POINT_TYPES

GUARD = "fxq.nonfinite_guard"  # node meta: "check" (a per-sample test) or "poison" (an output + NaN flags)

__all__ = ["guard_nonfinite", "strip_nonfinite_guard", "guard_nodes", "GUARD"]


def _dtype(node: fx.Node) -> Optional[torch.dtype]:
    return getattr(node.meta.get("tensor_meta"), "dtype", None)


def _holds_float(meta) -> bool:
    """A float tensor, or a tuple/list/dict holding one (``split``, ``unbind``)."""
    dtype = getattr(meta, "dtype", None)  # TensorMetadata is itself a NamedTuple: test it first
    if isinstance(dtype, torch.dtype):
        return dtype.is_floating_point
    if isinstance(meta, (list, tuple)):
        return any(_holds_float(m) for m in meta)
    if isinstance(meta, dict):
        return any(_holds_float(m) for m in meta.values())
    return False


def _tainted(gm: fx.GraphModule, integer: tuple) -> set:
    """Float nodes whose value may hold a NaN or an inf: graph inputs and what float ops make
    of them (shape reads and codes do not carry it)."""
    tainted = set()
    for node in gm.graph.nodes:
        if node.op == "output" or not _holds_float(node.meta.get("tensor_meta")):
            continue
        if node.op == "placeholder" or (
            not isinstance(submodule(gm, node), integer) and any(arg in tainted for arg in node.all_input_nodes)
        ):
            tainted.add(node)
    return tainted


def _input_dependent(gm: fx.GraphModule) -> set:
    depends = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder" or any(arg in depends for arg in node.all_input_nodes):
            depends.add(node)
    return depends


def _check_sites(gm: fx.GraphModule) -> list[fx.Node]:
    """Tainted float tensors read by an integer or fake-quant module, in graph order."""
    integer = integer_module_types()
    lossy = integer + (FakeQuantize, *SOFTMAX_POINT_TYPES)
    tainted = _tainted(gm, integer)
    sites = set()
    for node in gm.graph.nodes:
        if isinstance(submodule(gm, node), lossy):
            sites.update(
                arg
                for arg in node.all_input_nodes
                if arg in tainted and shape_of(arg) is not None and _dtype(arg).is_floating_point
            )
    return [n for n in gm.graph.nodes if n in sites]


def _batch_size(gm: fx.GraphModule) -> Optional[int]:
    for node in gm.graph.nodes:
        shape = shape_of(node) if node.op == "placeholder" else None
        if shape:
            return shape[0]
    return None


def _call(graph: fx.Graph, target, args: tuple, kwargs: Optional[dict] = None, kind: str = "check") -> fx.Node:
    """A guard node: a torch function, or a Tensor method when ``target`` is a str."""
    op = "call_method" if isinstance(target, str) else "call_function"
    node = graph.create_node(op, target, args, kwargs or {})
    node.meta[GUARD] = kind
    return node


def _scales_with_batch(shape: Optional[tuple], wide: Optional[tuple], batch: int) -> bool:
    """True when the first dimension holds the batch: it doubled, alone, when the batch did,
    and it is a multiple of the batch (rows of one sample are consecutive: batch-major)."""
    return (
        bool(shape)
        and wide is not None
        and len(wide) == len(shape)
        and wide[0] == 2 * shape[0]
        and tuple(wide[1:]) == tuple(shape[1:])
        and shape[0] % batch == 0
    )


def _extremes(graph: fx.Graph, site: fx.Node, per_sample: bool, batch: int) -> tuple[fx.Node, fx.Node]:
    """(max, min) of ``site``: (samples,) vectors when ``per_sample`` (its first dimension
    holds the batch, maybe batch-major rows of it: Swin's windows), else 0-d, one value for
    the whole batch. A NaN in the reduced values reaches both, an inf one of them."""
    shape = shape_of(site)
    dims = tuple(range(1 if per_sample else 0, len(shape)))
    high, low = (
        (_call(graph, torch.amax, (site,), {"dim": dims}), _call(graph, torch.amin, (site,), {"dim": dims}))
        if dims
        else (site, site)
    )
    rows = shape[0] // batch if per_sample else 1
    if rows > 1:  # the rows of one sample are consecutive: reduce them once more
        high = _call(graph, torch.amax, (_call(graph, torch.reshape, (high, (-1, rows))),), {"dim": 1})
        low = _call(graph, torch.amin, (_call(graph, torch.reshape, (low, (-1, rows))),), {"dim": 1})
    if _dtype(site) != torch.float32:
        high, low = _call(graph, "float", (high,)), _call(graph, "float", (low,))
    return high, low


def _flags(graph: fx.Graph, extremes: list[fx.Node]) -> fx.Node:
    """``-|sum(max * 0 + min * 0)|`` over the stacked extremes: -0.0 where all are finite,
    NaN where one is not (exact: a product by 0 never overflows). -0.0, not 0.0: ``y + -0.0``
    is ``y`` bit for bit, a -0.0 output included."""
    half = len(extremes) // 2
    high = _call(graph, torch.stack, (extremes[:half],))
    low = _call(graph, torch.stack, (extremes[half:],))
    zeros = _call(graph, torch.add, (_call(graph, torch.mul, (high, 0)), _call(graph, torch.mul, (low, 0))))
    return _call(graph, torch.neg, (_call(graph, torch.abs, (_call(graph, torch.sum, (zeros,), {"dim": 0}),)),))


def _poison(graph: fx.Graph, out: fx.Node, flags: fx.Node, per_sample: bool) -> fx.Node:
    shape, dtype = shape_of(out), _dtype(out)
    if per_sample:
        flags = _call(graph, torch.reshape, (flags, (-1, *([1] * (len(shape) - 1)))), kind="poison")
    else:
        flags = _call(graph, torch.amax, (flags,), kind="poison")  # -0.0 or NaN for every element
    if dtype != torch.float32:
        flags = _call(graph, "to", (flags, dtype), kind="poison")
    poisoned = _call(graph, torch.add, (out, flags), kind="poison")
    for key, value in out.meta.items():  # the same value on finite inputs: the diff pairs it with the output
        if key.startswith("fxq.") and key != GUARD:
            poisoned.meta[key] = value
    return poisoned


def _shapes(gm: fx.GraphModule, inputs: tuple) -> dict[fx.Node, Optional[tuple]]:
    propagate_shapes(gm, inputs)
    return {node: shape_of(node) for node in gm.graph.nodes}


def guard_nonfinite(gm: fx.GraphModule, example_inputs: tuple) -> list[str]:
    """Add the per-sample non-finite guard to an integer graph, in place (an existing guard
    is replaced). The graph runs on ``example_inputs`` and on them twice over (concatenated
    along the first dimension): which tensors hold the batch in their first dimension is
    learnt from the shapes that doubled. Returns the names of the checked tensors; nothing
    is added when no non-finite value can be lost."""
    strip_nonfinite_guard(gm)
    doubled = tuple(torch.cat([t, t]) if isinstance(t, torch.Tensor) and t.dim() else t for t in example_inputs)
    try:
        wide = _shapes(gm, doubled)
    except Exception:  # noqa: BLE001 - a graph that runs at one batch size only: every check flags the whole batch
        wide = {}
    shapes = _shapes(gm, tuple(example_inputs))  # tensor_meta: the example inputs' shapes
    batch = _batch_size(gm)
    sites = _check_sites(gm) if batch else []
    output = next(n for n in gm.graph.nodes if n.op == "output")
    outputs = []
    fx.node.map_arg(output.args, lambda n: outputs.append(n) or n)
    depends = _input_dependent(gm)
    outputs = [
        n for n in dict.fromkeys(outputs) if n in depends and shapes[n] is not None and _dtype(n).is_floating_point
    ]
    if not sites or not outputs:
        return []
    graph = gm.graph
    groups: dict[bool, list] = {True: [], False: []}  # (max, min) pairs: per sample / whole batch
    for site in sites:  # reduced right after it is computed: the tensor is not kept alive to the end
        per_sample = _scales_with_batch(shapes[site], wide.get(site), batch)
        with graph.inserting_before(site.next):
            groups[per_sample].append(_extremes(graph, site, per_sample, batch))
    with graph.inserting_before(output):
        # (samples,) flags from the per-sample checks, plus one 0-d flag for the others
        parts = [_flags(graph, [h for h, _ in pairs] + [lo for _, lo in pairs]) for pairs in groups.values() if pairs]
        flags = parts[0] if len(parts) == 1 else _call(graph, torch.add, tuple(parts))
        poisoned = {
            out: _poison(
                graph, out, flags, shapes[out][:1] == (batch,) and _scales_with_batch(shapes[out], wide.get(out), batch)
            )
            for out in outputs
        }
    output.args = fx.node.map_arg(output.args, lambda n: poisoned.get(n, n))
    graph.lint()
    gm.recompile()
    return [site.name for site in sites]


def guard_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if GUARD in n.meta]


def strip_nonfinite_guard(gm: fx.GraphModule) -> int:
    """Remove the guard (for measurements, or before a pass rewrites the graph); returns the
    number of nodes removed."""
    nodes = guard_nodes(gm)
    if not nodes:
        return 0
    output = next(n for n in gm.graph.nodes if n.op == "output")
    unwrap = {n: n.args[0] for n in nodes if n.meta[GUARD] == "poison" and n.target is torch.add}
    output.args = fx.node.map_arg(output.args, lambda n: unwrap.get(n, n))
    for node in reversed(nodes):
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return len(nodes)
