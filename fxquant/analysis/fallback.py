"""Float fallback: ranking the points by how much each alone costs the model output, and
leaving the most harmful ones in float (``compile(keep_float=k)``)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.fx as fx

from fxquant.analysis.isolated import describe_point, fmt_db, only_enabled, quant_point_nodes, resolve_inputs, sort_key
from fxquant.analysis.numeric_diff import output_qsnr
from fxquant.errors import FxqError
from fxquant.runtime.float_point import float_stand_in


def keep_in_float(qm: fx.GraphModule, names: Sequence[str], why: str = "keep_float") -> fx.GraphModule:
    """Replace the named points of ``qm`` (in place) by float modules; recorded in the report."""
    by_name = {n.name: n for n in quant_point_nodes(qm)}
    for name in names:
        if name not in by_name:
            raise FxqError(f"'{name}' is not a quantization point of this graph")
        target = str(by_name[name].target)
        qm.add_submodule(target, float_stand_in(qm.get_submodule(target)))
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
    inputs = resolve_inputs(inputs, None)
    with only_enabled(qm, ()):
        ref = qm(*inputs)
    rows = []
    for index, node in enumerate(quant_point_nodes(qm)):
        with only_enabled(qm, {node.name}):
            rows.append(
                {**describe_point(qm, node), "order": index, "output_qsnr_db_isolated": output_qsnr(ref, qm(*inputs))}
            )
    return sorted(rows, key=sort_key("output_qsnr_db_isolated"))


def choose_float_points(
    qm: fx.GraphModule, k: int, inputs: Sequence[torch.Tensor] | torch.Tensor, ranked: Optional[list[dict]] = None
) -> list[dict]:
    """Up to ``k`` points whose fallback to float raises the output QSNR on ``inputs`` most.

    Points' errors do not add up independently (two errors may partly cancel), so the points
    that hurt most when quantized alone are only candidates: the 2k most sensitive ones (at
    least k + 4). From them, greedy forward selection adds, one at a time, the candidate whose
    fallback (together with those already chosen) gives the highest output QSNR, and stops
    early when no candidate raises it: each point kept in float is one that helped on
    ``inputs``. Rows are the ranking rows plus ``output_qsnr_db_kept`` (all others quantized).
    """
    inputs = resolve_inputs(inputs, None)
    ranked = rank_by_output(qm, inputs) if ranked is None else ranked
    candidates = ranked[: max(2 * k, k + 4)]
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
        keep_in_float(
            qm,
            [row["node"]],
            why=f"keep_float: pick {rank}, output QSNR "
            f"{fmt_db(row['output_qsnr_db_isolated'])} dB when quantized alone, "
            f"{fmt_db(row['output_qsnr_db_kept'])} dB with it and the picks before it in float",
        )
    if len(chosen) < k and getattr(qm, "report", None) is not None:
        qm.report.notes.append(
            f"keep_float {k}: only {len(chosen)} point(s) raised the output QSNR when left in "
            "float; the others were left quantized"
        )
    return chosen
