"""fxquant.analysis.stats: per-point layer statistics of a compiled fake-quant graph."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from fxquant.analysis.stats import COLUMNS, layer_statistics, outlier_ratio, write_statistics
from tests.tiny import compiled_tiny_vit


@pytest.fixture(scope="module")
def setup():
    _, calib, qm = compiled_tiny_vit()
    return qm, calib


@pytest.fixture(scope="module")
def calib_rows(setup):
    qm, calib = setup
    return layer_statistics(qm, [calib])


def test_keys_unique_and_present(setup, calib_rows):
    assert len(COLUMNS) == len(set(COLUMNS))
    assert calib_rows
    for row in calib_rows:
        assert list(row) == list(COLUMNS)
        assert row["min"] <= row["p0.1"] <= row["p1"] <= row["p50"] <= row["p99"] <= row["p99.9"] <= row["max"]
        assert 0.0 <= row["outlier_ratio"] <= 1.0 and 0.0 <= row["clipping_ratio"] <= 1.0
    names = [r["node"] for r in calib_rows]
    assert len(names) == len(set(names))  # one batch: one row per point
    assert {"attn_q_out", "norm1"} <= {r["group"] for r in calib_rows}


def _minmax_rows(rows):
    return [r for r in rows if r["group"] in ("norm1", "norm2", "attn_q_out", "attn_k_out", "attn_v_input")]


def test_clipping_zero_on_calibration_data_for_minmax_points(calib_rows):
    rows = _minmax_rows(calib_rows)
    assert rows
    assert all(r["clipping_ratio"] == 0.0 for r in rows), [(r["node"], r["clipping_ratio"]) for r in rows]


def test_clipping_positive_when_batch_scaled(setup):
    qm, calib = setup
    rows = _minmax_rows(layer_statistics(qm, calib * 10.0))
    assert rows and any(r["clipping_ratio"] > 0.0 for r in rows)
    assert all(r["clipping_ratio"] > 0.0 for r in rows if r["group"] == "attn_q_out")


def test_error_columns_consistent(calib_rows):
    for r in calib_rows:
        assert r["mse"] >= 0.0 and -1.0 <= r["cosine"] <= 1.0 + 1e-9
        assert r["qsnr_db"] > 10.0  # 8-bit isolated error on the calibration data itself


def test_batches_as_list_of_pairs(setup):
    qm, calib = setup
    rows = layer_statistics(qm, [(calib[:8], torch.zeros(8)), (calib[8:], torch.zeros(8))])
    assert {r["batch"] for r in rows} == {0, 1}


def test_outlier_ratio_gaussian_vs_planted():
    g = torch.randn(100_000, generator=torch.Generator().manual_seed(0))
    assert outlier_ratio(g) < 1e-4
    planted = g.clone()
    planted[:500] = 50.0
    assert outlier_ratio(planted) == pytest.approx(500 / 100_000, rel=0.05)


def test_outlier_ratio_zero_mad_falls_back_to_std():
    x = torch.zeros(10_000)
    assert outlier_ratio(x) == 0.0
    x[:3] = 1000.0
    assert outlier_ratio(x) > 0.0


def test_write_statistics_csv_json(calib_rows, tmp_path):
    rows = [dict(calib_rows[0], qsnr_db=float("inf"))] + calib_rows[1:]
    csv_path, json_path = write_statistics(rows, tmp_path / "sub" / "stats")
    assert csv_path.name == "stats.csv" and json_path.name == "stats.json"
    data = json.loads(json_path.read_text())
    assert data["rows"][0]["qsnr_db"] == 999.0 and len(data["rows"]) == len(rows)
    assert "NaN" not in json_path.read_text()
    with csv_path.open() as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == len(rows) and list(table[0]) == list(COLUMNS)
    assert float(table[0]["qsnr_db"]) == 999.0
