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

from fxquant.analysis.numeric_diff import capture_values, output_qsnr
from fxquant.errors import FxqError
from fxquant.infra.records import db_for_json
from fxquant.quant.calib_data import default_diff_inputs, reusable_batches
from fxquant.quant.quantizers import qsnr_db
from fxquant.runtime.fake_quant import QUANTIZED_WEIGHT_TYPES, FakeQuantize
from fxquant.runtime.log_base_softmax import SOFTMAX_POINT_TYPES

DB_KEYS = ("isolated_qsnr_db", "propagated_qsnr_db", "output_qsnr_db_isolated")


def quant_point_nodes(qm: fx.GraphModule) -> list[fx.Node]:
    """Every quantization point of ``qm``, in topological order."""
    out = []
    for node in qm.graph.nodes:
        if node.op == "call_module":
            module = qm.get_submodule(str(node.target))
            if isinstance(module, (FakeQuantize, *SOFTMAX_POINT_TYPES, *QUANTIZED_WEIGHT_TYPES)):
                out.append(node)
    return out


def _bypass(self: FakeQuantize, x: torch.Tensor) -> torch.Tensor:
    return x * self.post_scale if self.post_scale != 1.0 else x


def _turn_off(module: nn.Module):
    """Turn one point off; returns the function that turns it back on."""
    if isinstance(module, FakeQuantize):
        module.forward = types.MethodType(_bypass, module)
        return lambda: module.__dict__.pop("forward", None)
    if isinstance(module, SOFTMAX_POINT_TYPES):  # off = the float softmax it replaced
        dim = module.dim  # a plain function: an nn.Module attribute would become a child, not the forward
        module.forward = lambda x: torch.softmax(x, dim)
        return lambda: module.__dict__.pop("forward", None)
    if not hasattr(module, "float_weight"):
        raise FxqError(f"{type(module).__name__} has no float_weight (compiled by an older fxquant); recompile")
    quantized = module.weight
    module.weight = module.float_weight
    float_bias = getattr(module, "float_bias", None)  # the bias before bias_correction
    corrected = module.bias.detach().clone() if float_bias is not None else None
    if float_bias is not None:
        with torch.no_grad():
            module.bias.copy_(float_bias)

    def restore() -> None:
        module.weight = quantized
        if corrected is not None:
            with torch.no_grad():
                module.bias.copy_(corrected)

    return restore


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


def _output_name(qm: fx.GraphModule) -> str:
    return next(n.name for n in qm.graph.nodes if n.op == "output")


def _node_db(ref: Any, value: Any) -> float:
    if isinstance(ref, torch.Tensor) and isinstance(value, torch.Tensor):
        return qsnr_db(ref, value)
    return output_qsnr(ref, value)


def describe_point(qm: fx.GraphModule, node: fx.Node) -> dict:
    module = qm.get_submodule(str(node.target))
    point = module.point
    return {
        "node": node.name,
        "group": point.label,
        "module": point.module,
        "kind": "weight" if isinstance(module, QUANTIZED_WEIGHT_TYPES) else "activation",
    }


@torch.no_grad()
def isolated_errors(
    qm: fx.GraphModule,
    diff_inputs: Sequence[torch.Tensor] | torch.Tensor | None = None,
    points: Optional[Iterable[str]] = None,
) -> list[dict]:
    """Per quantization point (topological order): isolated, propagated and end-to-end QSNR.

    ``points`` restricts the (one graph run per point) isolated measurement to those nodes.
    """
    inputs = resolve_inputs(diff_inputs, None)
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
        rows.append(
            {
                **describe_point(qm, node),
                "order": index,
                "isolated_qsnr_db": _node_db(ref[node.name], alone[node.name]),
                "propagated_qsnr_db": _node_db(ref[node.name], full[node.name]),
                "output_qsnr_db_isolated": output_qsnr(ref[out], alone[out]),
            }
        )
    return rows


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
            lines.append(
                f"worst point: {w['node']} ({w['group']}, {w['module']}) isolated "
                f"{fmt_db(w['isolated_qsnr_db'])} dB, propagated {fmt_db(w['propagated_qsnr_db'])} dB"
            )
        else:
            lines.append("no quantization points")
        lines.append(
            f"fxquant diff: model={self.model} qconfig={self.qconfig} points={len(self.rows)} "
            f"output QSNR {fmt_db(self.output_qsnr_db)} dB"
        )
        lines.append(f"{'isolated':>9} {'propag.':>9} {'out(iso)':>9}  {'group':<22} {'node':<36} module")
        for r in self.rows[:top] if top else self.rows:
            lines.append(
                f"{fmt_db(r['isolated_qsnr_db']):>9} {fmt_db(r['propagated_qsnr_db']):>9} "
                f"{fmt_db(r['output_qsnr_db_isolated']):>9}  {r['group']:<22} {r['node']:<36} {r['module']}"
            )
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "qconfig": self.qconfig,
            "output_qsnr_db": db_for_json(self.output_qsnr_db),
            "points": [{**r, **{k: db_for_json(r[k]) for k in DB_KEYS}} for r in self.rows],
        }

    def to_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1, allow_nan=False))
        return path

    def __str__(self) -> str:
        return self.table()


def fmt_db(value: float) -> str:
    return ("inf" if value > 0 else "-inf") if math.isinf(value) else f"{value:.2f}"


def sort_key(key: str):
    return lambda r: (r[key], r["order"])


def resolve_inputs(diff_inputs, calib_data) -> tuple:
    if diff_inputs is not None:
        return (diff_inputs,) if isinstance(diff_inputs, torch.Tensor) else tuple(diff_inputs)
    if calib_data is None:
        raise FxqError("give diff_inputs (or calib_data, whose first batch shapes the default input)")
    example, _ = reusable_batches(calib_data)
    return default_diff_inputs(example)
