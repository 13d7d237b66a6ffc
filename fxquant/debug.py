"""The debugging workflows that compile a model first when given one: ``diff`` (isolated and
propagated error per point), ``sensitivity`` and ``compile_keep_float``. The measurements
themselves live in :mod:`fxquant.analysis.isolated` and :mod:`fxquant.analysis.fallback`."""

from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.fx as fx
from torch import nn

from fxquant.analysis.fallback import choose_float_points, keep_in_float, keep_most_sensitive, rank_by_output
from fxquant.analysis.isolated import (
    DiffResult,
    isolated_errors,
    only_enabled,
    quant_point_nodes,
    resolve_inputs,
    sort_key,
)
from fxquant.analysis.numeric_diff import output_qsnr
from fxquant.api import compile as fxq_compile
from fxquant.errors import FxqError
from fxquant.infra.records import INF_DB
from fxquant.quant.calib_data import reusable_batches
from fxquant.runtime.float_point import FloatPoint


def _reusable(calib_data):
    """Calibration data that can be read more than once (a generator becomes a list)."""
    return None if calib_data is None else reusable_batches(calib_data)[1]


def _compiled(model_or_qm, qconfig, calib_data, **kwargs) -> fx.GraphModule:
    if isinstance(model_or_qm, fx.GraphModule) and quant_point_nodes(model_or_qm):
        return model_or_qm
    if calib_data is None:
        raise FxqError("fxquant.diff on an uncompiled model needs calib_data")
    return fxq_compile(model_or_qm, qconfig, calib_data=calib_data, progress=False, **kwargs)


def diff(
    model_or_qm: nn.Module,
    qconfig="w8a8",
    *,
    calib_data=None,
    diff_inputs=None,
    points: Optional[Iterable[str]] = None,
    model_name: Optional[str] = None,
) -> DiffResult:
    """Isolated and propagated QSNR of every quantization point, worst isolated first.

    ``model_or_qm`` is a GraphModule from ``fxquant.compile`` (used as is) or a model
    (compiled with ``qconfig`` and ``calib_data`` first).
    """
    calib_data = _reusable(calib_data)
    qm = _compiled(model_or_qm, qconfig, calib_data, model_name=model_name)
    inputs = resolve_inputs(diff_inputs, calib_data)
    rows = sorted(isolated_errors(qm, inputs, points), key=sort_key("isolated_qsnr_db"))
    with torch.no_grad():
        with only_enabled(qm, ()):
            ref = qm(*inputs)
        out_db = output_qsnr(ref, qm(*inputs))
    report = getattr(qm, "report", None)  # a deepcopy of a GraphModule drops .report/.qconfig
    model = model_name or getattr(report, "model", None) or qm.meta.get("fxq.model_name") or type(qm).__name__
    qconfig_name = (
        getattr(report, "qconfig", None)
        or getattr(getattr(qm, "qconfig", None), "name", None)
        or qm.meta.get("fxq.qconfig_name", "?")
    )
    return DiffResult(rows, out_db, model=model, qconfig=qconfig_name)


def sensitivity(
    model_or_qm: nn.Module, qconfig="w8a8", calib_data=None, diff_inputs=None, points: Optional[Iterable[str]] = None
) -> list[dict]:
    """Quantization points ranked most sensitive first: lowest end-to-end output QSNR when
    each alone is quantized."""
    calib_data = _reusable(calib_data)
    qm = _compiled(model_or_qm, qconfig, calib_data)
    inputs = resolve_inputs(diff_inputs, calib_data)
    return sorted(isolated_errors(qm, inputs, points), key=sort_key("output_qsnr_db_isolated"))


def compile_keep_float(
    model: nn.Module, qconfig="w8a8", *, calib_data, k: int = 1, diff_inputs=None, **compile_kwargs
) -> fx.GraphModule:
    """Alias of ``fxquant.compile(model, qconfig, calib_data=..., keep_float=k)``."""
    return fxq_compile(model, qconfig, calib_data=calib_data, diff_inputs=diff_inputs, keep_float=k, **compile_kwargs)


__all__ = [
    "isolated_errors",
    "diff",
    "DiffResult",
    "sensitivity",
    "only_enabled",
    "quant_point_nodes",
    "keep_in_float",
    "keep_most_sensitive",
    "choose_float_points",
    "rank_by_output",
    "compile_keep_float",
    "FloatPoint",
    "INF_DB",
]
