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

import torch

from .cli_inputs import check_output_file, positive_int, writing
from .errors import FxqError


class ReportError(FxqError):
    """Bad input to ``fxquant report``: one line, exit status 2."""


def add_report_parser(sub) -> None:
    rep = sub.add_parser("report", help="write the HTML debugging page from a compile's dump directory")
    rep.add_argument("dump_dir", help="a directory written by fxquant compile --dump-dir DIR --report DIR/report.json")
    rep.add_argument("--report", help="the report JSON (default: DIR/report.json)")
    rep.add_argument("--model", help="a saved model (compile --save) for histograms and layer statistics")
    rep.add_argument("--images", type=positive_int, default=4, help="seeded random images for the histograms (default 4)")
    rep.add_argument("--out", help="the HTML file to write (default: DIR/report.html)")


def run_report(args) -> int:
    import fxquant
    from .cli import write_debug_page
    from .cli_deploy import _input_shape, _load
    from .report import Report

    directory = Path(args.dump_dir)
    if not directory.is_dir():
        raise ReportError(f"{directory}: not a directory (make one with fxquant compile ... --dump-dir DIR)")
    out = Path(args.out) if args.out else directory / "report.html"
    check_output_file(str(out), "--out", "report.html")
    report_path = Path(args.report) if args.report else directory / "report.json"
    if not report_path.is_file():
        raise ReportError(f"{report_path}: no report JSON; compile with --report {directory / 'report.json'} "
                          "or pass --report FILE")
    try:
        report = Report.from_json(report_path)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ReportError(f"{report_path}: not an fxquant report ({type(exc).__name__}: {exc})") from None
    dots = sorted(directory.glob("*.dot"))
    if args.model:
        qm = _load(args.model)
        qm.report = report
        shape = _input_shape(qm, None, args.model)
        batch = torch.randn(args.images, *shape, generator=torch.Generator().manual_seed(0))
        with writing("--out", str(out)):
            path = write_debug_page(qm, batch, str(out), str(directory))
    else:
        with writing("--out", str(out)):
            path = fxquant.write_html_report(report, out, dot_path=dots[-1] if dots else None)
    print(f"HTML report written to {path}")
    return 0
