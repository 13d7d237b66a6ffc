"""Layer statistics of the activation quantization points of a compiled fake-quant graph.

One row per (FakeQuantize node, batch). The values are taken on the FP32 path: the graph is
run with every point off (``debug.only_enabled(qm, ())``) and each FakeQuantize's input is
recorded by a forward hook; the point's own fake-quant (its QParams and method, without the
folded ``post_scale``) is then applied to that input alone, so the error columns are the
point's *isolated* error on that batch.

Columns (every key appears once):

* ``node``, ``target``, ``group``, ``module``, ``method``, ``per_channel``, ``batch``, ``numel``
* ``min``, ``max``, ``mean``, ``std`` (population std)
* ``p0.1``, ``p1``, ``p50``, ``p99``, ``p99.9``: percentiles by ``torch.kthvalue`` on a
  flattened copy (a seeded random subsample of 2**24 elements for larger tensors)
* ``outlier_ratio``: fraction of elements with ``|x - median| > 6 * sigma`` where
  ``sigma = 1.4826 * MAD`` (median absolute deviation scaled to a Gaussian's sigma). When
  the MAD is 0 (more than half the elements equal the median) ``sigma`` falls back to the
  std; when that is 0 too, the ratio is 0. A Gaussian gives ~2e-9.
* ``clipping_ratio``: fraction of elements the quantizer saturates. Uniform points: values
  more than half a step outside ``[(qmin - zp) * scale, (qmax - zp) * scale]`` (per channel
  along ``qparams.axis`` when per-channel), i.e. exactly the values whose rounded code
  lands outside ``[qmin, qmax]`` and is clamped. Log2 points: values above ``scale`` (``|x|``
  above ``scale`` for signed log2), which saturate to the largest magnitude.
* ``qsnr_db``, ``mse``, ``cosine``: the fake-quantized value against the input value.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.fx as fx

from fxquant.analysis.isolated import only_enabled
from fxquant.infra.records import INF_DB
from fxquant.quant.quantizers import fake_quantize, qsnr_db
from fxquant.runtime.fake_quant import FakeQuantize

PERCENTILES = (("p0.1", 0.1), ("p1", 1.0), ("p50", 50.0), ("p99", 99.0), ("p99.9", 99.9))
SUBSAMPLE_LIMIT = 2**24
OUTLIER_SIGMAS = 6.0
MAD_TO_SIGMA = 1.4826
COLUMNS = (
    "node",
    "target",
    "group",
    "module",
    "method",
    "per_channel",
    "batch",
    "numel",
    "min",
    "max",
    "mean",
    "std",
    *(k for k, _ in PERCENTILES),
    "outlier_ratio",
    "clipping_ratio",
    "qsnr_db",
    "mse",
    "cosine",
)


def fake_quant_nodes(qm: fx.GraphModule) -> list[fx.Node]:
    """The FakeQuantize (activation point) nodes of ``qm``, in topological order."""
    return [
        n for n in qm.graph.nodes if n.op == "call_module" and isinstance(qm.get_submodule(str(n.target)), FakeQuantize)
    ]


def _batches(batches: Any) -> list[tuple]:
    """A tensor is one batch; an iterable yields tensors, tuples of inputs or (x, label) pairs."""
    if isinstance(batches, torch.Tensor):
        return [(batches,)]
    out = []
    for item in batches:
        if isinstance(item, torch.Tensor):
            out.append((item,))
        elif isinstance(item, (tuple, list)) and item and isinstance(item[0], torch.Tensor):
            out.append((item[0],))  # (images, labels) as a DataLoader gives them
        else:
            raise TypeError(f"a batch must be a tensor or (tensor, label), got {type(item).__name__}")
    return out


@torch.no_grad()
def point_inputs(qm: fx.GraphModule, inputs: tuple) -> dict[str, torch.Tensor]:
    """Each FakeQuantize node's input on the FP32 path (every point off), by node name."""
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for node in fake_quant_nodes(qm):
        module = qm.get_submodule(str(node.target))

        def hook(_mod, args, _out, name=node.name):
            seen[name] = args[0].detach().clone()

        handles.append(module.register_forward_hook(hook))
    try:
        with only_enabled(qm, ()):
            qm(*inputs)
    finally:
        for h in handles:
            h.remove()
    return seen


def _flat_sample(x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    flat = x.detach().reshape(-1).to(torch.float64)
    if flat.numel() > SUBSAMPLE_LIMIT:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        idx = torch.randint(flat.numel(), (SUBSAMPLE_LIMIT,), generator=gen).to(flat.device)
        flat = flat[idx]
    return flat


def _percentile(sorted_src: torch.Tensor, q: float) -> float:
    n = sorted_src.numel()
    k = min(max(int(round(q / 100.0 * (n - 1))) + 1, 1), n)
    return float(torch.kthvalue(sorted_src, k).values)


def outlier_ratio(x: torch.Tensor, sigmas: float = OUTLIER_SIGMAS) -> float:
    """Fraction of elements with ``|x - median| > sigmas * 1.4826 * MAD`` (see module doc)."""
    flat = _flat_sample(x)
    if flat.numel() == 0:
        return 0.0
    med = _percentile(flat, 50.0)
    dev = (flat - med).abs()
    sigma = MAD_TO_SIGMA * _percentile(dev, 50.0)
    if sigma == 0.0:
        sigma = float(flat.std(unbiased=False))
    if sigma == 0.0 or not math.isfinite(sigma):
        return 0.0
    return float((dev > sigmas * sigma).double().mean())


def clipping_ratio(x: torch.Tensor, fq: FakeQuantize) -> float:
    """Fraction of ``x`` that ``fq``'s quantizer saturates (see module doc)."""
    qp = fq.qparams
    xf = x.detach().to(torch.float32)
    scale = qp.broadcast_scale(xf.dim()).to(xf.device)
    if fq.method != "uniform":  # the log methods: values above the scale saturate
        mag = xf.abs() if qp.qmin < 0 else xf
        return float((mag > scale).double().mean())
    zp = qp.broadcast_zero_point(xf.dim()).to(xf.device)
    lo = (qp.qmin - zp - 0.5) * scale
    hi = (qp.qmax - zp + 0.5) * scale
    return float(((xf < lo) | (xf > hi)).double().mean())


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.reshape(-1).double(), b.reshape(-1).double()
    na, nb = float(a.norm()), float(b.norm())
    if na == 0.0 and nb == 0.0:
        return 1.0
    if na == 0.0 or nb == 0.0:
        return 0.0
    value = float(torch.dot(a, b)) / (na * nb)
    return value if math.isfinite(value) else 0.0


def tensor_statistics(x: torch.Tensor) -> dict:
    """min/max/mean/std/percentiles/outlier_ratio of one tensor."""
    flat = _flat_sample(x)
    full = x.detach().to(torch.float64)
    row: dict[str, Any] = {
        "numel": int(x.numel()),
        "min": float(full.min()),
        "max": float(full.max()),
        "mean": float(full.mean()),
        "std": float(full.std(unbiased=False)),
    }
    for key, q in PERCENTILES:
        row[key] = _percentile(flat, q)
    row["outlier_ratio"] = outlier_ratio(x)
    return row


@torch.no_grad()
def layer_statistics(qm: fx.GraphModule, batches: Any) -> list[dict]:
    """One row per (FakeQuantize node, batch), topological order, batch-major within a node.

    ``batches``: a tensor (one batch), or an iterable of tensors / (tensor, label) pairs.
    """
    nodes = fake_quant_nodes(qm)
    rows: list[dict] = []
    per_batch = [point_inputs(qm, inputs) for inputs in _batches(batches)]
    for node in nodes:
        fq = qm.get_submodule(str(node.target))
        for b, seen in enumerate(per_batch):
            if node.name not in seen:
                continue  # not reached on this input (dead branch)
            x = seen[node.name]
            y = fake_quantize(x, fq.qparams, fq.method)
            diff = y.double() - x.double()
            row = {
                "node": node.name,
                "target": str(node.target),
                "group": fq.point.label,
                "module": fq.point.module,
                "method": fq.method,
                "per_channel": fq.qparams.per_channel,
                "batch": b,
                **tensor_statistics(x),
                "clipping_ratio": clipping_ratio(x, fq),
                "qsnr_db": qsnr_db(x, y),
                "mse": float((diff * diff).mean()),
                "cosine": _cosine(x, y),
            }
            rows.append({k: row[k] for k in COLUMNS})
    return rows


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        if math.isnan(value):
            return None  # never written as NaN
        if math.isinf(value):
            return INF_DB if value > 0 else -INF_DB
    return value


def write_statistics(rows: Iterable[dict], path_stem: str | Path) -> tuple[Path, Path]:
    """Write ``<stem>.csv`` and ``<stem>.json``; +-inf is written as +-999.0, never NaN."""
    rows = [{k: _finite(v) for k, v in r.items()} for r in rows]
    stem = Path(path_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = stem.with_name(stem.name + ".csv"), stem.with_name(stem.name + ".json")
    columns = list(COLUMNS) + [k for r in rows for k in r if k not in COLUMNS]
    columns = list(dict.fromkeys(columns))
    with csv_path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})
    json_path.write_text(json.dumps({"columns": columns, "rows": rows}, indent=1, allow_nan=False))
    return csv_path, json_path


__all__ = [
    "layer_statistics",
    "write_statistics",
    "point_inputs",
    "fake_quant_nodes",
    "tensor_statistics",
    "outlier_ratio",
    "clipping_ratio",
    "COLUMNS",
]
