"""``fxquant report DIR``: the HTML debugging page from what ``fxquant compile`` left in DIR.

DIR is a ``--dump-dir``: the page needs its ``report.json`` (``compile --report
DIR/report.json``); the graph picture uses the last ``NN_<pass>.dot`` dump there; with a
saved model (``--model FILE.fxq``, from ``compile --save``) the page also gets the FP32 vs
quantized histograms and the layer statistics, measured on seeded random images of the
graph's input size (``--images N``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

import fxquant
from fxquant.cli.deploy import input_shape, load_graph
from fxquant.cli.inputs import check_output_file, positive_int, writing
from fxquant.errors import FxqError
from fxquant.infra.records import Report


class ReportError(FxqError):
    """Bad input to ``fxquant report``: one line, exit status 2."""


def add_report_parser(sub) -> None:
    rep = sub.add_parser("report", help="write the HTML debugging page from a compile's dump directory")
    rep.add_argument("dump_dir", help="a directory written by fxquant compile --dump-dir DIR --report DIR/report.json")
    rep.add_argument("--report", help="the report JSON (default: DIR/report.json)")
    rep.add_argument("--model", help="a saved model (compile --save) for histograms and layer statistics")
    rep.add_argument(
        "--images", type=positive_int, default=4, help="seeded random images for the histograms (default 4)"
    )
    rep.add_argument("--out", help="the HTML file to write (default: DIR/report.html)")


def run_report(args) -> int:
    directory = Path(args.dump_dir)
    if not directory.is_dir():
        raise ReportError(f"{directory}: not a directory (make one with fxquant compile ... --dump-dir DIR)")
    out = Path(args.out) if args.out else directory / "report.html"
    check_output_file(str(out), "--out", "report.html")
    report_path = Path(args.report) if args.report else directory / "report.json"
    if not report_path.is_file():
        raise ReportError(
            f"{report_path}: no report JSON; compile with --report {directory / 'report.json'} or pass --report FILE"
        )
    try:
        report = Report.from_json(report_path)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ReportError(f"{report_path}: not an fxquant report ({type(exc).__name__}: {exc})") from None
    dots = sorted(directory.glob("*.dot"))
    if args.model:
        qm = load_graph(args.model)
        qm.report = report
        shape = input_shape(qm, None, args.model)
        batch = torch.randn(args.images, *shape, generator=torch.Generator().manual_seed(0))
        with writing("--out", str(out)):
            path = write_debug_page(qm, batch, str(out), str(directory))
    else:
        with writing("--out", str(out)):
            path = fxquant.write_html_report(report, out, dot_path=dots[-1] if dots else None)
    print(f"HTML report written to {path}")
    return 0


def stats_stem(page: Path) -> Path:
    """Where the layer statistics beside an HTML page go: <stem>.csv and <stem>.json."""
    return page.with_suffix("").with_name(page.stem + "_stats")


def write_debug_page(qm, batch: torch.Tensor, html_path: str, dump_dir: Optional[str]) -> Path:
    """Layer statistics on one calibration batch (CSV + JSON beside the page) and the HTML page."""
    path = Path(html_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = fxquant.layer_statistics(qm, [batch])
    fxquant.write_statistics(rows, stats_stem(path))
    dots = sorted(Path(dump_dir).glob("*.dot")) if dump_dir else []
    return fxquant.write_html_report(
        qm.report, path, qm=qm, stats=rows, inputs=batch, dot_path=dots[-1] if dots else None
    )
