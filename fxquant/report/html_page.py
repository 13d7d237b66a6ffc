"""One self-contained HTML page for a compile report: no network, no external JS or CSS.

The page is XHTML-compatible (every tag closed, text escaped with ``html.escape``), so
``xml.etree`` parses it. Sections: the per-pass table, per-node QSNR of the final pass along
the graph (inline SVG drawn here), the worst points, FP32-vs-quantized histograms of the 5
worst activation points (when ``qm`` and ``inputs`` are given), and the graph (Graphviz
``dot`` rendered to inline SVG coloured by QSNR, or a text list when ``dot`` is missing).
"""

from __future__ import annotations

import html
import math
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from fxquant.analysis.stats import point_inputs
from fxquant.infra.records import Report
from fxquant.infra.records import format_db as _db
from fxquant.quant.quantizers import fake_quantize
from fxquant.runtime.fake_quant import FakeQuantize

WORST = 5
PLOT_MIN_DB, PLOT_MAX_DB = -10.0, 80.0
CSS = """body{font-family:sans-serif;margin:1.5em;color:#222}table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #bbb;padding:2px 8px;text-align:right}td.l,th.l{text-align:left}
h2{margin-top:1.5em}svg{background:#fafafa;border:1px solid #ddd}pre{background:#f4f4f4;padding:.5em}
.hist{display:inline-block;margin:4px}"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def qsnr_colour(db: Optional[float]) -> str:
    """Red (<= 10 dB) through yellow to green (>= 40 dB); grey without a value."""
    if db is None or (isinstance(db, float) and math.isnan(db)):
        return "#cccccc"
    t = min(max((db - 10.0) / 30.0, 0.0), 1.0)
    r, g = (255, int(510 * t)) if t < 0.5 else (int(255 * (2 - 2 * t)), 200)
    return f"#{r:02x}{g:02x}40"


# ---------------------------------------------------------------- sections
def _pass_table(report: Report) -> str:
    rows = [
        "<table id='passes'><tr><th>#</th><th class='l'>pass</th><th>seconds</th>"
        "<th>output QSNR dB</th><th>points</th></tr>"
    ]
    for i, rec in enumerate(report.passes):
        points = sum(1 for n in rec.nodes if n.get("group"))
        rows.append(
            f"<tr class='pass'><td>{i}</td><td class='l'>{_e(rec.name)}</td><td>{rec.seconds:.3f}</td>"
            f"<td>{_e(_db(rec.output_qsnr_db))}</td><td>{points}</td></tr>"
        )
    rows.append("</table>")
    return "\n".join(rows)


def _qsnr_plot(report: Report, width: int = 960, height: int = 300) -> str:
    nodes = [n for n in report.final.nodes if n.get("qsnr_db") is not None] if report.passes else []
    if not nodes:
        return "<p>no per-node QSNR in the final pass</p>"
    left, right, top, bottom = 50, 10, 10, 30
    pw, ph = width - left - right, height - top - bottom
    step = pw / max(len(nodes) - 1, 1)

    def y_of(db: float) -> float:
        clipped = min(max(db, PLOT_MIN_DB), PLOT_MAX_DB)
        return top + ph * (PLOT_MAX_DB - clipped) / (PLOT_MAX_DB - PLOT_MIN_DB)

    parts = [f"<svg xmlns='http://www.w3.org/2000/svg' id='qsnr-plot' width='{width}' height='{height}'>"]
    for db in range(int(PLOT_MIN_DB), int(PLOT_MAX_DB) + 1, 10):
        y = y_of(db)
        parts.append(
            f"<line x1='{left}' y1='{y:.1f}' x2='{width - right}' y2='{y:.1f}' stroke='#ddd'/>"
            f"<text x='{left - 5}' y='{y + 4:.1f}' font-size='10' text-anchor='end'>{db}</text>"
        )
    points = " ".join(f"{left + i * step:.1f},{y_of(n['qsnr_db']):.1f}" for i, n in enumerate(nodes))
    parts.append(f"<polyline points='{points}' fill='none' stroke='#4477aa' stroke-width='1'/>")
    for i, n in enumerate(nodes):
        if n.get("group"):
            parts.append(
                f"<circle cx='{left + i * step:.1f}' cy='{y_of(n['qsnr_db']):.1f}' r='3' "
                f"fill='{qsnr_colour(n['qsnr_db'])}' stroke='#333' stroke-width='0.5'>"
                f"<title>{_e(n['node'])} ({_e(n['group'])}) {_e(_db(n['qsnr_db']))} dB</title></circle>"
            )
    parts.append(
        f"<text x='{left + pw / 2:.0f}' y='{height - 8}' font-size='11' text-anchor='middle'>"
        f"nodes of '{_e(report.final.name)}' in topological order (circles: quantization points; "
        f"QSNR clipped to [{PLOT_MIN_DB:g}, {PLOT_MAX_DB:g}] dB)</text></svg>"
    )
    return "\n".join(parts)


def _worst_points(report: Report, stats: Optional[Sequence[dict]]) -> list[dict]:
    """The worst points: lowest isolated QSNR over batches from ``stats``, else the report's."""
    if stats:
        best: dict[str, dict] = {}
        for r in stats:
            if r["node"] not in best or r["qsnr_db"] < best[r["node"]]["qsnr_db"]:
                best[r["node"]] = r
        return sorted(best.values(), key=lambda r: r["qsnr_db"])[:WORST]
    return report.worst_nodes(WORST) if report.passes else []


def _worst_table(worst: list[dict], from_stats: bool, table_id: str = "worst") -> str:
    extra = ["clipping_ratio", "outlier_ratio", "min", "max"] if from_stats else []
    head = "".join(f"<th>{_e(k)}</th>" for k in extra)
    title = "isolated QSNR dB" if from_stats else "QSNR dB vs FP32"
    rows = [
        f"<table id='{table_id}'><tr><th class='l'>node</th><th class='l'>group</th><th class='l'>module</th>"
        f"<th>{title}</th>{head}</tr>"
    ]
    for r in worst:
        cells = "".join(f"<td>{r[k]:.4g}</td>" for k in extra)
        rows.append(
            f"<tr><td class='l'>{_e(r['node'])}</td><td class='l'>{_e(r.get('group') or '')}</td>"
            f"<td class='l'>{_e(r.get('module') or '')}</td><td>{_e(_db(r['qsnr_db']))}</td>{cells}</tr>"
        )
    rows.append("</table>")
    return "\n".join(rows)


def svg_histogram(
    fp32: torch.Tensor, quant: torch.Tensor, title: str, bins: int = 64, width: int = 360, height: int = 180
) -> str:
    """Two overlaid histograms (FP32 blue, quantized orange, log counts) as inline SVG."""
    a, b = fp32.detach().reshape(-1).float(), quant.detach().reshape(-1).float()
    lo, hi = float(torch.minimum(a.min(), b.min())), float(torch.maximum(a.max(), b.max()))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return f"<p>{_e(title)}: non-finite values</p>"
    hi = hi if hi > lo else lo + 1.0
    ha, hb = torch.histc(a, bins, lo, hi), torch.histc(b, bins, lo, hi)
    top = math.log10(float(torch.maximum(ha.max(), hb.max())) + 1.0) or 1.0
    left, bottom, ph = 5, 30, height - 50
    bw = (width - 2 * left) / bins
    parts = [
        f"<svg xmlns='http://www.w3.org/2000/svg' class='hist' width='{width}' height='{height}'>",
        f"<text x='{width / 2:.0f}' y='14' font-size='11' text-anchor='middle'>{_e(title)}</text>",
    ]
    for hist, colour in ((ha, "#4477aa"), (hb, "#ee7733")):
        for i, count in enumerate(hist.tolist()):
            if count <= 0:
                continue
            h = ph * math.log10(count + 1.0) / top
            parts.append(
                f"<rect x='{left + i * bw:.1f}' y='{height - bottom - h:.1f}' width='{bw:.2f}' "
                f"height='{h:.1f}' fill='{colour}' fill-opacity='0.55'/>"
            )
    parts.append(
        f"<text x='{left}' y='{height - 12}' font-size='10'>{lo:.3g}</text>"
        f"<text x='{width - left}' y='{height - 12}' font-size='10' text-anchor='end'>{hi:.3g}</text>"
        f"<text x='{width / 2:.0f}' y='{height - 2}' font-size='10' text-anchor='middle'>"
        f"FP32 (blue) vs fake-quantized (orange), log counts</text></svg>"
    )
    return "".join(parts)


def _histograms(qm, inputs, worst: list[dict]) -> str:
    if qm is None or inputs is None:
        return "<p>no histograms: pass qm and inputs to write_html_report</p>"
    inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    values = point_inputs(qm, inputs)
    by_name = {n.name: n for n in qm.graph.nodes}
    parts = []
    for r in worst:
        node = by_name.get(r["node"])
        if node is None or r["node"] not in values:
            continue
        fq = qm.get_submodule(str(node.target))
        if not isinstance(fq, FakeQuantize):
            continue
        x = values[r["node"]]
        parts.append(svg_histogram(x, fake_quantize(x, fq.qparams, fq.method), f"{r['node']} ({fq.point.label})"))
    return "\n".join(parts) or "<p>none of the worst points is an activation point of qm</p>"


def _dot_svg(dot_path: Path, colours: dict[str, str]) -> Optional[str]:
    """Render ``dot_path`` with Graphviz, node fill colours by QSNR; None if that fails."""
    dot = shutil.which("dot")
    if dot is None or not dot_path.exists():
        return None
    source = dot_path.read_text()
    close = source.rstrip().rfind("}")
    if close < 0:
        return None
    styled = "".join(f'\n  "{name}" [style=filled, fillcolor="{c}"];' for name, c in colours.items())
    source = source[:close] + styled + "\n" + source[close:]
    try:
        done = subprocess.run([dot, "-Tsvg"], input=source, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0 or "<svg" not in done.stdout:
        return None
    svg = done.stdout[done.stdout.index("<svg") :]
    return re.sub(r"<!--.*?-->", "", svg, flags=re.S)  # comments may hold '--' and node names


def _graph_section(report: Report, dot_path: Optional[Path]) -> str:
    nodes = report.final.nodes if report.passes else []
    colours = {n["node"]: qsnr_colour(n.get("qsnr_db")) for n in nodes}
    if dot_path is not None:
        svg = _dot_svg(Path(dot_path), colours)
        if svg is not None:
            return f"<div id='graph'>{svg}</div>"
    lines = [f"{_db(n.get('qsnr_db')):>8}  {n['node']:<40} {n.get('group') or ''}" for n in nodes]
    note = "" if dot_path is None else "<p>Graphviz 'dot' not available: text view</p>"
    return f"{note}<pre id='graph-text'>{_e(chr(10).join(lines))}</pre>"


# ---------------------------------------------------------------- page
def render_html_report(
    report: Report,
    *,
    qm=None,
    stats: Optional[Sequence[dict]] = None,
    dot_path: Optional[str | Path] = None,
    inputs=None,
) -> str:
    worst = _worst_points(report, stats)
    final = report.final.name if report.passes else "-"
    drop_line = report.first_drop_line()
    body = [
        f"<h1>fxquant report: {_e(report.model)}</h1>",
        f"<p>qconfig <b>{_e(report.qconfig)}</b>, backend <b>{_e(report.backend)}</b></p>",
        f"<p id='first-drop'><b>{_e(drop_line)}</b></p>"
        if drop_line
        else "<p id='first-drop'>no large drop: no node falls more than 10 dB below its inputs</p>",
        "<h2>Passes</h2>",
        _pass_table(report),
        f"<h2>Per-node QSNR after '{_e(final)}'</h2>",
        _qsnr_plot(report),
    ]
    if stats and report.passes:  # the points' own error, then what reaches each point end to end
        body += [
            f"<h2>Worst {WORST} quantization points by their own error (isolated)</h2>",
            _worst_table(worst, True),
            f"<h2>Worst {WORST} quantization points end to end (propagated)</h2>",
            _worst_table(report.worst_nodes(WORST), False, "worst-propagated"),
        ]
    else:
        body += [f"<h2>Worst {WORST} quantization points</h2>", _worst_table(worst, bool(stats))]
    body += [
        "<h2>Histograms of the worst points</h2>",
        _histograms(qm, inputs, worst),
        "<h2>Graph</h2>",
        _graph_section(report, dot_path),
    ]
    if report.float_points or report.notes:
        items = "".join(f"<li>{_e(x)}</li>" for x in [*report.float_points, *report.notes])
        body += ["<h2>Notes</h2>", f"<ul>{items}</ul>"]
    return (
        "<!DOCTYPE html>\n<html xmlns='http://www.w3.org/1999/xhtml'><head><meta charset='utf-8'/>"
        f"<title>fxquant report: {_e(report.model)}</title><style>{CSS}</style></head>\n<body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )


def write_html_report(
    report: Report,
    out_path: str | Path,
    *,
    qm=None,
    stats: Optional[Sequence[dict]] = None,
    dot_path: Optional[str | Path] = None,
    inputs=None,
) -> Path:
    """Write the self-contained page; ``inputs`` (a batch for ``qm``) enables the histograms."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(
        render_html_report(report, qm=qm, stats=stats, dot_path=dot_path, inputs=inputs), encoding="utf-8"
    )
    return out_path


__all__ = ["write_html_report", "render_html_report", "svg_histogram", "qsnr_colour"]
