"""Node-by-node numeric comparison of a graph against the FP32 reference graph."""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Optional

import torch
import torch.fx as fx

from fxquant.infra.neutrality import output_qsnr  # noqa: F401  (re-exported: analysis, api and tests use it)
from fxquant.ir.capture import capture_values, flatten_tensors  # noqa: F401  (re-exported)
from fxquant.ir.meta import MODULE, ORIGIN, ORIGIN_SLICE, POINT, ROLE, WEIGHT
from fxquant.quant.quantizers import qsnr_db

# A healthy 8-bit point keeps about this much QSNR: inputs above it count as this much
# when deciding whether a node "drops" precision, so ordinary quantization is not flagged.
DROP_CEILING_DB = 40.0
DROP_THRESHOLD_DB = 10.0


def _reference_for(node: fx.Node, ref_values: dict[str, Any]) -> Optional[torch.Tensor]:
    ref = ref_values.get(node.meta.get(ORIGIN, ""))
    if not isinstance(ref, torch.Tensor) or not ref.is_floating_point():
        return None
    cut = node.meta.get(ORIGIN_SLICE)
    if cut is not None:
        dim, start, length = cut
        ref = ref.narrow(dim, start, length)
    return ref


@torch.no_grad()
def compare_graph(
    gm: fx.GraphModule,
    inputs: tuple,
    ref_values: dict[str, Any],
    ref_output: Any,
    *,
    adopt_new: bool = False,
    values: Optional[dict[str, Any]] = None,
    cache: Optional[dict] = None,
) -> tuple[list[dict], float, Optional[dict]]:
    """Per-node QSNR of ``gm`` vs the reference values; returns (nodes, output QSNR, first drop).

    With ``adopt_new`` (after a numerically neutral pass) a node whose origin the reference
    lacks, a node that pass created, becomes part of the reference with its current value
    (the pass manager has checked the pass's output first). ``values``: ``gm``'s values on
    ``inputs`` when already captured. ``cache`` (a dict the caller keeps between calls): a node
    whose reference and value equal those of the same node at the previous call keeps that
    call's QSNR (the same number, not recomputed); the cache then holds this call's.
    """
    if values is None:
        values = capture_values(gm, inputs)
    if adopt_new:
        adopt_new_origins(gm, ref_values, values)
    with _one_thread():
        return _compare(gm, values, ref_values, ref_output, cache)


@contextmanager
def _one_thread():
    """The per-node comparison is thousands of small ops (one diff image): with several intra-op
    threads each op waits for the others, and on a busy machine that wait (milliseconds per op)
    costs more than the arithmetic. One thread for them, the caller's count restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _compare(gm, values, ref_values, ref_output, cache) -> tuple[list[dict], float, Optional[dict]]:
    records: list[dict] = []
    by_name: dict[str, float] = {}
    output_value = None
    for node in gm.graph.nodes:
        if node.op == "output":
            output_value = values.get(node.name)
            continue
        value = values.get(node.name)
        ref = _reference_for(node, ref_values)
        inputs_db = [by_name[a.name] for a in node.all_input_nodes if a.name in by_name]
        if ref is None or not isinstance(value, torch.Tensor) or value.shape != ref.shape:
            if inputs_db:  # an unpaired node passes its inputs' precision on, so drops stay visible
                by_name[node.name] = min(inputs_db)
            continue
        key = (node.meta.get(ORIGIN, ""), node.meta.get(ORIGIN_SLICE))
        db = _cached_qsnr(cache, node.name, key, ref, value)
        by_name[node.name] = db
        point = node.meta.get(POINT) or node.meta.get(WEIGHT)
        records.append(
            {
                "node": node.name,
                "origin": node.meta.get(ORIGIN, ""),
                "module": point.module if point is not None else node.meta.get(MODULE, ""),
                "group": point.label if point is not None else "",
                "role": node.meta.get(ROLE, ""),
                "op": node.op if node.op != "call_function" else getattr(node.target, "__name__", str(node.target)),
                "qsnr_db": db,
                "input_qsnr_db": min(inputs_db) if inputs_db else None,
            }
        )
    if cache is not None:  # only this graph's nodes: a value left from an older graph is not kept alive
        for name in [name for name in cache if isinstance(name, str) and name not in by_name]:
            del cache[name]
    output_db = output_qsnr(ref_output, output_value)
    return records, output_db, first_drop(records, output_db=output_db)


def new_origins(gm: fx.GraphModule, ref_values: dict[str, Any]) -> list[fx.Node]:
    """The nodes whose origin the reference lacks: nodes a neutral pass created (or rescaled)."""
    return [
        node
        for node in gm.graph.nodes
        if node.meta.get(ORIGIN)
        and node.meta[ORIGIN] not in ref_values
        and node.op != "output"
        and ORIGIN_SLICE not in node.meta
    ]


def adopt_new_origins(gm: fx.GraphModule, ref_values: dict[str, Any], values: dict[str, Any]) -> None:
    """After a neutral pass: its new origins join the reference with their current ``values``."""
    for node in new_origins(gm, ref_values):
        ref_values[node.meta[ORIGIN]] = values.get(node.name)


def _cached_qsnr(cache: Optional[dict], name: str, key: tuple, ref: torch.Tensor, value: torch.Tensor) -> float:
    """QSNR of ``value`` against ``ref``; the cached one when the node's reference key and value
    are unchanged. The cached tensor must not have been modified in place since (a parameter's
    value is the parameter itself, and a pass may rescale it): its version counter says so."""
    if cache is not None:
        hit = cache.get(name)
        if (
            hit is not None
            and hit[0] == key
            and hit[1].dtype == value.dtype
            and _version(hit[1]) == hit[2]
            and torch.equal(hit[1], value)
        ):
            return hit[3]
    signal = None
    if cache is not None:  # sum(ref^2) once per reference tensor (unchanged since: same object, same version)
        known = cache.get(("signal", key))
        if known is not None and known[0] is ref and known[1] == _version(ref) is not None:
            signal = known[2]
    db, signal = fast_qsnr_db(ref, value, signal)
    version = _version(value)
    if cache is not None and version is not None:
        cache[name] = (key, value, version, db)
        if signal is not None:
            cache[("signal", key)] = (ref, _version(ref), signal)
    return db


def _version(value: torch.Tensor) -> Optional[int]:
    """The tensor's in-place modification counter (None for inference-mode tensors, which keep none)."""
    try:
        return value._version
    except RuntimeError:
        return None


def fast_qsnr_db(ref: torch.Tensor, x: torch.Tensor, signal: Optional[float] = None) -> tuple[float, Optional[float]]:
    """(:func:`fxquant.quant.quantizers.qsnr_db`, the same number; ``sum(ref^2)``, None when not
    finite). Without qsnr_db's two scans for non-finite values: a NaN or inf in either tensor
    makes one of the float64 sums non-finite, and then ``qsnr_db`` itself decides (as it does
    for a sum that overflows). ``signal``: ``sum(ref^2)`` when already known (finite)."""
    r = ref.detach().to(torch.float64)
    d = x.detach().to(device=r.device, dtype=torch.float64)
    if r.shape != d.shape:
        return qsnr_db(ref, x), None  # raises its shape error
    noise = float(torch.sum((r - d) ** 2))
    if signal is None:
        signal = float(torch.sum(r * r))
    if not (math.isfinite(noise) and math.isfinite(signal)):
        return qsnr_db(ref, x), (signal if math.isfinite(signal) else None)
    if noise == 0.0:
        return float("inf"), signal
    if signal == 0.0:
        return float("-inf"), signal
    return 10.0 * math.log10(signal / noise), signal


def first_drop(
    records: list[dict],
    threshold_db: float = DROP_THRESHOLD_DB,
    ceiling_db: float = DROP_CEILING_DB,
    output_db: Optional[float] = None,
) -> Optional[dict]:
    """The first node (topological order) whose QSNR falls more than ``threshold_db`` below
    its inputs' (inputs above ``ceiling_db`` count as ``ceiling_db``).

    With ``output_db`` (the graph output's QSNR), the first such drop that reaches the
    output's level (within ``threshold_db`` of it) comes first: in a 0 dB model a drop to 28 dB
    at an attention point is real but not what ruined the output; the point where the values
    fall to about 0 dB is. Without one that reaches it, the first drop."""
    drops = []
    for rec in records:
        if rec["input_qsnr_db"] is None:
            continue
        before = min(rec["input_qsnr_db"], ceiling_db)
        if math.isfinite(rec["qsnr_db"]) or rec["qsnr_db"] < 0:
            drop = before - rec["qsnr_db"]
            if drop > threshold_db:
                drops.append(
                    {
                        "node": rec["node"],
                        "module": rec["module"],
                        "group": rec["group"],
                        "qsnr_db": rec["qsnr_db"],
                        "drop_db": drop,
                    }
                )
    if output_db is not None and not math.isnan(output_db):
        ruinous = [d for d in drops if d["qsnr_db"] <= output_db + threshold_db]
        if ruinous:
            return ruinous[0]
    return drops[0] if drops else None
