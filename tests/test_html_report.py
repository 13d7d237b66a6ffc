"""fxquant.report.html_page: one self-contained, well-formed HTML page."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import xml.etree.ElementTree as ET
from html.parser import HTMLParser

import pytest
import timm
import torch

import fxquant
from fxquant.analysis.stats import layer_statistics
from fxquant.report.html_page import write_html_report

TINY = dict(img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=2, num_classes=10)
NS = "{http://www.w3.org/1999/xhtml}"


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", **TINY).eval()
    calib = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    qm = fxquant.compile(model, "w8a8", calib_data=calib, progress=False, model_name="tiny<vit>&")
    return qm, calib, layer_statistics(qm, calib)


class _TagCounter(HTMLParser):
    VOID = {"meta", "br", "img", "link", "input", "hr"}

    def __init__(self):
        super().__init__()
        self.stack, self.errors, self.seen = [], [], {}

    def handle_starttag(self, tag, attrs):
        self.seen[tag] = self.seen.get(tag, 0) + 1
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.seen[tag] = self.seen.get(tag, 0) + 1

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append((tag, list(self.stack[-3:])))
        else:
            self.stack.pop()


def _check_well_formed(text: str) -> dict:
    counter = _TagCounter()
    counter.feed(text)
    counter.close()
    assert not counter.errors and not counter.stack, (counter.errors, counter.stack)
    ET.fromstring(text.split("\n", 1)[1])  # XHTML-compatible after the doctype line
    return counter.seen


def test_page_with_stats_and_histograms(setup, tmp_path):
    qm, calib, rows = setup
    path = write_html_report(qm.report, tmp_path / "r" / "report.html", qm=qm, stats=rows, inputs=calib)
    text = path.read_text()
    seen = _check_well_formed(text)
    assert seen["svg"] >= 1 + 5  # the QSNR plot and five histograms
    assert "http://" not in text.replace("http://www.w3.org/", "") and "<script" not in text
    assert "tiny&lt;vit&gt;&amp;" in text and "tiny<vit>" not in text
    root = ET.fromstring(text.split("\n", 1)[1])
    pass_rows = root.findall(f".//{NS}table[@id='passes']/{NS}tr[@class='pass']")
    assert [r.findall(f"{NS}td")[1].text for r in pass_rows] == [p.name for p in qm.report.passes]
    worst = sorted(
        {r["node"]: min(x["qsnr_db"] for x in rows if x["node"] == r["node"]) for r in rows}.items(),
        key=lambda kv: kv[1],
    )[:5]
    for name, _ in worst:
        assert name in text
    assert "graph-text" in text or "id='graph'" in text


def test_page_from_report_only(setup, tmp_path):
    qm, _, _ = setup
    text = write_html_report(qm.report, tmp_path / "plain.html").read_text()
    seen = _check_well_formed(text)
    assert seen["svg"] == 1
    for n in qm.report.worst_nodes(5):
        assert n["node"] in text


def test_graph_through_dot(setup, tmp_path, monkeypatch):
    """A stand-in `dot` on PATH: its SVG is inlined and the QSNR colours reach its input."""
    qm, _, _ = setup
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "dot"
    fake.write_text(
        '#!/bin/sh\ncat > "$(dirname "$0")/seen.dot"\n'
        'printf \'<?xml version="1.0"?>\\n<!-- a -- comment -->\\n'
        '<svg xmlns="http://www.w3.org/2000/svg" id="dotgraph"><g/></svg>\\n\'\n'
    )
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    dot_file = tmp_path / "g.dot"
    dot_file.write_text("digraph G {\n  a -> b;\n}\n")
    text = write_html_report(qm.report, tmp_path / "dot.html", dot_path=dot_file).read_text()
    _check_well_formed(text)
    assert 'id="dotgraph"' in text and "graph-text" not in text
    seen = (bindir / "seen.dot").read_text()
    first = qm.report.final.nodes[0]["node"]
    assert f'"{first}" [style=filled, fillcolor="#' in seen and seen.rstrip().endswith("}")


CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--enable-logging=stderr",
    "--v=0",
]


@pytest.mark.skipif(not os.path.exists("/usr/bin/chromium"), reason="Debian chromium not installed")
def test_screenshot(setup, tmp_path):
    """Headless Chromium renders the page: no console error, the DOM it built holds the tables and images."""
    qm, calib, rows = setup
    page = write_html_report(qm.report, tmp_path / "shot.html", qm=qm, stats=rows, inputs=calib)
    shot = tmp_path / "shot.png"
    flags = CHROMIUM_FLAGS + [f"--user-data-dir={tmp_path / 'profile'}"]
    run = subprocess.run(
        ["/usr/bin/chromium", *flags, f"--screenshot={shot}", "--window-size=1200,2400", f"file://{page}"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert shot.exists() and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "CONSOLE" not in run.stderr and "Uncaught" not in run.stderr, run.stderr[-2000:]
    dom = subprocess.run(
        ["/usr/bin/chromium", *flags, "--dump-dom", f"file://{page}"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    ).stdout
    for marker in ('id="passes"', 'id="worst"', 'id="worst-propagated"', 'id="first-drop"', "<svg"):
        assert marker in dom, marker
    assert dom.count("<svg") >= 1 + 5  # the QSNR plot and the histograms survive rendering
    if os.environ.get("FXQ_KEEP_SCREENSHOT"):
        shutil.copy(shot, os.environ["FXQ_KEEP_SCREENSHOT"])
