"""Debugging a compiled model: isolated vs propagated error per quantization point,
sensitivity ranking and float fallback of the most sensitive points.

A quantization point is a FakeQuantize node (an activation) or a QuantLinear/QuantConv2d
node (a weight). A point is turned *off* by making its FakeQuantize an identity (times its
``post_scale``, a folded constant that must stay) or by swapping in the weight's float
original (``float_weight``, kept by lower_fake_quant: the smoothed float weight). With every
point off the compiled graph computes FP32 (after smoothing, which is exact), so the
all-off run of the same graph is the reference and no origin bookkeeping is needed.

* propagated QSNR: a point's output with every point on, against the all-off run;
* isolated QSNR: the same output with only that point on, everything else off;
* output QSNR (isolated): the model's output with only that point on (sensitivity).
"""
from __future__ import annotations

import contextlib
import json
import math
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

import torch
import torch.fx as fx
from torch import nn

from .calib_data import reusable_batches
from .numeric_diff import capture_values, output_qsnr
from .errors import FxqError
from .log_int_softmax import LogIntSoftmax
from .modules import QUANTIZED_WEIGHT_TYPES, FakeQuantize, QuantConv2d
from .quantizers import qsnr_db
from .report import INF_DB, db_for_json

DB_KEYS = ("isolated_qsnr_db", "propagated_qsnr_db", "output_qsnr_db_isolated")


# ---------------------------------------------------------------- turning points on and off
def quant_point_nodes(qm: fx.GraphModule) -> list[fx.Node]:
    """Every quantization point of ``qm``, in topological order."""
    out = []
    for node in qm.graph.nodes:
        if node.op == "call_module":
            module = qm.get_submodule(str(node.target))
            if isinstance(module, (FakeQuantize, LogIntSoftmax, *QUANTIZED_WEIGHT_TYPES)):
                out.append(node)
    return out


def _bypass(self: FakeQuantize, x: torch.Tensor) -> torch.Tensor:
    return x * self.post_scale if self.post_scale != 1.0 else x


def _turn_off(module: nn.Module):
    """Turn one point off; returns the function that turns it back on."""
    if isinstance(module, FakeQuantize):
        module.forward = types.MethodType(_bypass, module)
        return lambda: module.__dict__.pop("forward", None)
    if isinstance(module, LogIntSoftmax):  # off = the float softmax it replaced
        dim = module.dim  # a plain function: an nn.Module attribute would become a child, not the forward
        module.forward = lambda x: torch.softmax(x, dim)
        return lambda: module.__dict__.pop("forward", None)
    if not hasattr(module, "float_weight"):
        raise FxqError(f"{type(module).__name__} has no float_weight (compiled by an older fxquant); recompile")
    quantized = module.weight
    module.weight = module.float_weight
    return lambda: setattr(module, "weight", quantized)


@contextlib.contextmanager
def only_enabled(qm: fx.GraphModule, enabled: Optional[Iterable[str]]) -> Iterator[fx.GraphModule]:
    """Within the block only the points named in ``enabled`` quantize (None: all of them)."""
    keep = None if enabled is None else set(enabled)
    undo = []
    try:
        for node in quant_point_nodes(qm):
            if keep is not None and node.name not in keep:
                undo.append(_turn_off(qm.get_submodule(str(node.target))))
        yield qm
    finally:
        for restore in reversed(undo):
            restore()


# ---------------------------------------------------------------- measuring
def _output_name(qm: fx.GraphModule) -> str:
    return next(n.name for n in qm.graph.nodes if n.op == "output")


def _node_db(ref: Any, value: Any) -> float:
    if isinstance(ref, torch.Tensor) and isinstance(value, torch.Tensor):
        return qsnr_db(ref, value)
    return output_qsnr(ref, value)


def _describe(qm: fx.GraphModule, node: fx.Node) -> dict:
    module = qm.get_submodule(str(node.target))
    point = module.point
    return {"node": node.name, "group": point.label, "module": point.module,
            "kind": "weight" if isinstance(module, QUANTIZED_WEIGHT_TYPES) else "activation"}


@torch.no_grad()
def isolated_errors(qm: fx.GraphModule, diff_inputs: Sequence[torch.Tensor] | torch.Tensor | None = None,
                    points: Optional[Iterable[str]] = None) -> list[dict]:
    """Per quantization point (topological order): isolated, propagated and end-to-end QSNR.

    ``points`` restricts the (one graph run per point) isolated measurement to those nodes.
    """
    inputs = _resolve_inputs(diff_inputs, None)
    nodes = quant_point_nodes(qm)
    if points is not None:
        wanted = set(points)
        unknown = wanted - {n.name for n in nodes}
        if unknown:
            raise FxqError(f"not quantization points of this graph: {sorted(unknown)}")
        nodes = [n for n in nodes if n.name in wanted]
    out = _output_name(qm)
    with only_enabled(qm, ()):
        ref = capture_values(qm, inputs)
    full = capture_values(qm, inputs)
    rows = []
    for index, node in enumerate(nodes):
        with only_enabled(qm, {node.name}):
            alone = capture_values(qm, inputs)
        rows.append({**_describe(qm, node), "order": index,
                     "isolated_qsnr_db": _node_db(ref[node.name], alone[node.name]),
                     "propagated_qsnr_db": _node_db(ref[node.name], full[node.name]),
                     "output_qsnr_db_isolated": output_qsnr(ref[out], alone[out])})
    return rows


# ---------------------------------------------------------------- fxquant.diff
@dataclass
class DiffResult:
    rows: list[dict]  # worst isolated QSNR first
    output_qsnr_db: float  # the whole quantized graph vs its all-float run
    model: str = ""
    qconfig: str = ""
    extra: dict = field(default_factory=dict)

    def table(self, top: Optional[int] = 20) -> str:
        lines = []
        if self.rows:
            w = self.rows[0]
            lines.append(f"worst point: {w['node']} ({w['group']}, {w['module']}) isolated "
                         f"{_fmt(w['isolated_qsnr_db'])} dB, propagated {_fmt(w['propagated_qsnr_db'])} dB")
        else:
            lines.append("no quantization points")
        lines.append(f"fxquant diff: model={self.model} qconfig={self.qconfig} points={len(self.rows)} "
                     f"output QSNR {_fmt(self.output_qsnr_db)} dB")
        lines.append(f"{'isolated':>9} {'propag.':>9} {'out(iso)':>9}  {'group':<22} {'node':<36} module")
        for r in self.rows[:top] if top else self.rows:
            lines.append(f"{_fmt(r['isolated_qsnr_db']):>9} {_fmt(r['propagated_qsnr_db']):>9} "
                         f"{_fmt(r['output_qsnr_db_isolated']):>9}  {r['group']:<22} {r['node']:<36} {r['module']}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"model": self.model, "qconfig": self.qconfig, "output_qsnr_db": db_for_json(self.output_qsnr_db),
                "points": [{**r, **{k: db_for_json(r[k]) for k in DB_KEYS}} for r in self.rows]}

    def to_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1, allow_nan=False))
        return path

    def __str__(self) -> str:
        return self.table()


def _fmt(value: float) -> str:
    return ("inf" if value > 0 else "-inf") if math.isinf(value) else f"{value:.2f}"


def _sort_key(key: str):
    return lambda r: (r[key], r["order"])


def _resolve_inputs(diff_inputs, calib_data) -> tuple:
    from .api import default_diff_inputs

    if diff_inputs is not None:
        return (diff_inputs,) if isinstance(diff_inputs, torch.Tensor) else tuple(diff_inputs)
    if calib_data is None:
        raise FxqError("give diff_inputs (or calib_data, whose first batch shapes the default input)")
    example, _ = reusable_batches(calib_data)
    return default_diff_inputs(example)


def _reusable(calib_data):
    """Calibration data that can be read more than once (a generator becomes a list)."""
    return None if calib_data is None else reusable_batches(calib_data)[1]


def _compiled(model_or_qm, qconfig, calib_data, **kwargs) -> fx.GraphModule:
    if isinstance(model_or_qm, fx.GraphModule) and quant_point_nodes(model_or_qm):
        return model_or_qm
    from .api import compile as fxq_compile

    if calib_data is None:
        raise FxqError("fxquant.diff on an uncompiled model needs calib_data")
    return fxq_compile(model_or_qm, qconfig, calib_data=calib_data, progress=False, **kwargs)


def diff(model_or_qm: nn.Module, qconfig="w8a8", *, calib_data=None, diff_inputs=None,
         points: Optional[Iterable[str]] = None, model_name: Optional[str] = None) -> DiffResult:
    """Isolated and propagated QSNR of every quantization point, worst isolated first.

    ``model_or_qm`` is a GraphModule from ``fxquant.compile`` (used as is) or a model
    (compiled with ``qconfig`` and ``calib_data`` first).
    """
    calib_data = _reusable(calib_data)
    qm = _compiled(model_or_qm, qconfig, calib_data, model_name=model_name)
    inputs = _resolve_inputs(diff_inputs, calib_data)
    rows = sorted(isolated_errors(qm, inputs, points), key=_sort_key("isolated_qsnr_db"))
    with torch.no_grad():
        with only_enabled(qm, ()):
            ref = qm(*inputs)
        out_db = output_qsnr(ref, qm(*inputs))
    report = getattr(qm, "report", None)  # a deepcopy of a GraphModule drops .report/.qconfig
    model = model_name or getattr(report, "model", None) or qm.meta.get("fxq.model_name") or type(qm).__name__
    qconfig_name = (getattr(report, "qconfig", None) or getattr(getattr(qm, "qconfig", None), "name", None)
                    or qm.meta.get("fxq.qconfig_name", "?"))
    return DiffResult(rows, out_db, model=model, qconfig=qconfig_name)


# ---------------------------------------------------------------- sensitivity and float fallback
def sensitivity(model_or_qm: nn.Module, qconfig="w8a8", calib_data=None, diff_inputs=None,
                points: Optional[Iterable[str]] = None) -> list[dict]:
    """Quantization points ranked most sensitive first: lowest end-to-end output QSNR when
    each alone is quantized."""
    calib_data = _reusable(calib_data)
    qm = _compiled(model_or_qm, qconfig, calib_data)
    inputs = _resolve_inputs(diff_inputs, calib_data)
    return sorted(isolated_errors(qm, inputs, points), key=_sort_key("output_qsnr_db_isolated"))


class FloatPoint(nn.Module):
    """A FakeQuantize left in float: identity times the folded constant ``post_scale``."""

    def __init__(self, fq: FakeQuantize):
        super().__init__()
        self.point, self.post_scale = fq.point, fq.post_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.post_scale if self.post_scale != 1.0 else x


def _float_module(module: nn.Module) -> nn.Module:
    if isinstance(module, FakeQuantize):
        return FloatPoint(module)
    if isinstance(module, LogIntSoftmax):
        return nn.Softmax(module.dim)
    if isinstance(module, QuantConv2d):
        conv = nn.Conv2d(module.float_weight.shape[1] * module.groups, module.float_weight.shape[0],
                         tuple(module.float_weight.shape[2:]), module.stride, module.padding, module.dilation,
                         module.groups, bias=module.bias is not None)
    else:
        conv = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
    with torch.no_grad():
        conv.weight.copy_(module.float_weight)
        if module.bias is not None:
            conv.bias.copy_(module.bias)
    return conv


def keep_in_float(qm: fx.GraphModule, names: Sequence[str], why: str = "keep_float") -> fx.GraphModule:
    """Replace the named points of ``qm`` (in place) by float modules; recorded in the report."""
    by_name = {n.name: n for n in quant_point_nodes(qm)}
    for name in names:
        if name not in by_name:
            raise FxqError(f"'{name}' is not a quantization point of this graph")
        target = str(by_name[name].target)
        qm.add_submodule(target, _float_module(qm.get_submodule(target)))
        if getattr(qm, "report", None) is not None:
            qm.report.float_points.append(f"{name}: kept in float ({why})")
            if hasattr(qm.report, "keep_float"):
                qm.report.keep_float.append(name)
    qm.keep_float = list(getattr(qm, "keep_float", [])) + list(names)
    return qm


@torch.no_grad()
def rank_by_output(qm: fx.GraphModule, inputs: Sequence[torch.Tensor] | torch.Tensor) -> list[dict]:
    """Every point ranked most sensitive first by the model output's QSNR (vs the all-off run)
    when that point alone quantizes: the ranking of :func:`sensitivity`, with one plain graph
    run per point (no per-node capture, so it is cheap enough for a calibration batch)."""
    inputs = _resolve_inputs(inputs, None)
    with only_enabled(qm, ()):
        ref = qm(*inputs)
    rows = []
    for index, node in enumerate(quant_point_nodes(qm)):
        with only_enabled(qm, {node.name}):
            rows.append({**_describe(qm, node), "order": index,
                         "output_qsnr_db_isolated": output_qsnr(ref, qm(*inputs))})
    return sorted(rows, key=_sort_key("output_qsnr_db_isolated"))


def choose_float_points(qm: fx.GraphModule, k: int, inputs: Sequence[torch.Tensor] | torch.Tensor,
                        ranked: Optional[list[dict]] = None) -> list[dict]:
    """Up to ``k`` points whose fallback to float raises the output QSNR on ``inputs`` most.

    Points' errors do not add up independently (two errors may partly cancel), so the points
    that hurt most when quantized alone are only candidates: the 2k most sensitive ones (at
    least k + 4). From them, greedy forward selection adds, one at a time, the candidate whose
    fallback (together with those already chosen) gives the highest output QSNR, and stops
    early when no candidate raises it: each point kept in float is one that helped on
    ``inputs``. Rows are the ranking rows plus ``output_qsnr_db_kept`` (all others quantized).
    """
    inputs = _resolve_inputs(inputs, None)
    ranked = rank_by_output(qm, inputs) if ranked is None else ranked
    candidates = ranked[:max(2 * k, k + 4)]
    all_names = [n.name for n in quant_point_nodes(qm)]
    with torch.no_grad():
        with only_enabled(qm, ()):
            ref = qm(*inputs)
        current = output_qsnr(ref, qm(*inputs))
        chosen: list[dict] = []
        while len(chosen) < k:
            off = {row["node"] for row in chosen}
            best, best_db = None, current
            for row in candidates:
                if row["node"] in off:
                    continue
                with only_enabled(qm, [n for n in all_names if n not in off and n != row["node"]]):
                    db = output_qsnr(ref, qm(*inputs))
                if db > best_db:
                    best, best_db = row, db
            if best is None:
                break
            chosen.append({**best, "output_qsnr_db_kept": best_db})
            current = best_db
    return chosen


def keep_most_sensitive(qm: fx.GraphModule, k: int, inputs: Sequence[torch.Tensor] | torch.Tensor) -> list[dict]:
    """Leave up to ``k`` points of ``qm`` in float (in place), chosen by
    :func:`choose_float_points` on ``inputs``; returns their rows.
    ``fxquant.compile(keep_float=k)`` calls this with its first calibration batch."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise FxqError(f"keep_float must be an integer >= 0, got {k!r}")
    qm.keep_float = list(getattr(qm, "keep_float", []))
    if k == 0:
        return []
    chosen = choose_float_points(qm, k, inputs)
    for rank, row in enumerate(chosen, 1):
        keep_in_float(qm, [row["node"]], why=f"keep_float: pick {rank}, output QSNR "
                      f"{_fmt(row['output_qsnr_db_isolated'])} dB when quantized alone, "
                      f"{_fmt(row['output_qsnr_db_kept'])} dB with it and the picks before it in float")
    if len(chosen) < k and getattr(qm, "report", None) is not None:
        qm.report.notes.append(f"keep_float {k}: only {len(chosen)} point(s) raised the output QSNR when left in "
                               "float; the others were left quantized")
    return chosen


def compile_keep_float(model: nn.Module, qconfig="w8a8", *, calib_data, k: int = 1,
                       diff_inputs=None, **compile_kwargs) -> fx.GraphModule:
    """Alias of ``fxquant.compile(model, qconfig, calib_data=..., keep_float=k)``."""
    from .api import compile as fxq_compile

    return fxq_compile(model, qconfig, calib_data=calib_data, diff_inputs=diff_inputs, keep_float=k,
                       **compile_kwargs)


__all__ = ["isolated_errors", "diff", "DiffResult", "sensitivity", "only_enabled", "quant_point_nodes",
           "keep_in_float", "keep_most_sensitive", "choose_float_points", "rank_by_output", "compile_keep_float", "FloatPoint", "INF_DB"]
