"""Report: the JSON format of ARCHITECTURE.md (inf as 999.0, never NaN) and the text table."""

from __future__ import annotations

import json
import math

import pytest
import timm
import torch

import fxquant
from fxquant.analysis.numeric_diff import first_drop
from fxquant.infra.records import INF_DB, PassRecord, Report, db_for_json

NODE_KEYS = {"node", "origin", "module", "group", "qsnr_db"}


def strict_json(text: str):
    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant!r}")

    return json.loads(text, parse_constant=refuse)


def node(name, db, group="", module="blocks.0.attn", origin=None, input_db=None):
    return {
        "node": name,
        "origin": origin or name,
        "module": module,
        "group": group,
        "op": "call_module",
        "qsnr_db": db,
        "input_qsnr_db": input_db,
    }


def handmade() -> Report:
    report = Report(model="Tiny", qconfig="w8a8", backend="fake")
    report.passes.append(PassRecord("trace", seconds=0.01, output_qsnr_db=127.5))
    neutral = PassRecord(
        "annotate",
        seconds=0.02,
        output_qsnr_db=math.inf,
        nodes=[node("x", math.inf, module=""), node("qkv", math.inf, "attn_qkv.weight", input_db=math.inf)],
    )
    nodes = [
        node("x", math.inf, module=""),
        node("fxq_norm1", 39.7, "norm1", module="blocks.0.norm1", input_db=math.inf),
        node("qkv", -13.8, "attn_qkv.weight", module="blocks.0.attn.qkv_q", input_db=39.7),
        node("broken", -math.inf, "attn_q_out", input_db=-13.8),
        node("softmax", 12.0, input_db=-math.inf),
    ]
    lowered = PassRecord(
        "lower_fake_quant", seconds=1.5, output_qsnr_db=-math.inf, nodes=nodes, first_drop=first_drop(nodes)
    )
    report.passes += [neutral, lowered]
    return report


def test_db_for_json():
    assert db_for_json(math.inf) == INF_DB == 999.0
    assert db_for_json(-math.inf) == -999.0
    assert db_for_json(None) is None
    assert db_for_json(12.34567) == 12.346
    with pytest.raises(ValueError, match="NaN"):
        db_for_json(math.nan)


def test_json_format_and_infinities(tmp_path):
    report = handmade()
    path = report.to_json(tmp_path / "sub" / "report.json")
    data = strict_json(path.read_text())
    assert {"model", "qconfig", "backend", "passes"} <= set(data)
    assert (data["model"], data["qconfig"], data["backend"]) == ("Tiny", "w8a8", "fake")
    assert [p["name"] for p in data["passes"]] == ["trace", "annotate", "lower_fake_quant"]
    for record in data["passes"]:
        assert {"name", "seconds", "output_qsnr_db", "nodes"} <= set(record)
        assert isinstance(record["seconds"], float)
        for entry in record["nodes"]:
            assert NODE_KEYS <= set(entry)
            assert isinstance(entry["qsnr_db"], float)
    annotate = data["passes"][1]
    assert annotate["output_qsnr_db"] == 999.0 and annotate["nodes"][1]["qsnr_db"] == 999.0
    lowered = data["passes"][2]
    assert lowered["output_qsnr_db"] == -999.0
    assert [n["qsnr_db"] for n in lowered["nodes"]] == [999.0, 39.7, -13.8, -999.0, 12.0]
    assert lowered["nodes"][2]["module"] == "blocks.0.attn.qkv_q" and lowered["nodes"][2]["group"] == "attn_qkv.weight"
    assert lowered["first_drop"]["node"] == "qkv"


def test_first_drop_at_minus_infinity_is_written(tmp_path):
    """A broken path (inf/NaN activations) gives -inf QSNR: the report must still be valid JSON."""
    nodes = [
        node("x", math.inf, module=""),
        node("a", 35.0, input_db=math.inf),
        node("b", -math.inf, "attn_q_out", input_db=35.0),
    ]
    record = PassRecord("lower_fake_quant", output_qsnr_db=-math.inf, nodes=nodes, first_drop=first_drop(nodes))
    assert record.first_drop["node"] == "b"
    report = Report(model="M", qconfig="q", backend="fake", passes=[record])
    data = strict_json(report.to_json(tmp_path / "r.json").read_text())
    drop = data["passes"][0]["first_drop"]
    assert drop["qsnr_db"] == -999.0 and drop["drop_db"] == 999.0
    assert "first large drop: b" in report.table()


def test_nan_never_reaches_json(tmp_path):
    report = Report(
        model="M",
        qconfig="q",
        backend="fake",
        passes=[PassRecord("p", output_qsnr_db=0.0, nodes=[node("x", math.nan)])],
    )
    with pytest.raises(ValueError, match="NaN"):
        report.to_json(tmp_path / "r.json")


def test_table_mentions_every_pass_and_the_first_drop():
    report = handmade()
    table = report.table()
    for record in report.passes:
        assert record.name in table
    assert "model=Tiny" in table and "qconfig=w8a8" in table
    assert "first large drop: qkv (attn_qkv.weight)" in table
    lines = table.splitlines()
    annotate_line = next(line for line in lines if " annotate " in line)
    assert "inf" in annotate_line
    assert "-13.80 dB" in table  # the worst points are listed
    assert str(report) == table


def test_worst_and_quant_points():
    report = handmade()
    worst = report.worst_nodes(2)
    assert [n["node"] for n in worst] == ["broken", "qkv"]
    assert all(n["group"] for n in report.quant_points())
    assert [n["node"] for n in report.quant_points("annotate")] == ["qkv"]
    assert report.final.name == "lower_fake_quant"
    with pytest.raises(KeyError, match="calibrate"):
        report.pass_record("calibrate")
    with pytest.raises(KeyError, match="nope"):
        report.final.node("nope")


@pytest.fixture(scope="module")
def compiled_report() -> Report:
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=2, num_classes=10
    ).eval()
    calib = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return fxquant.compile(model, "seed_attn", calib_data=calib, progress=False, model_name="tiny_vit").report


def test_compiled_report_json(compiled_report, tmp_path):
    data = strict_json(compiled_report.to_json(tmp_path / "report.json").read_text())
    assert (data["model"], data["qconfig"], data["backend"]) == ("tiny_vit", "seed_attn", "fake")
    names = [p["name"] for p in data["passes"]]
    assert names == [p.name for p in compiled_report.passes] and names[0] == "trace"
    for record in data["passes"]:
        assert isinstance(record["name"], str) and isinstance(record["seconds"], float)
        assert isinstance(record["output_qsnr_db"], float)
        assert record["output_qsnr_db"] <= 999.0
        for entry in record["nodes"]:
            assert NODE_KEYS <= set(entry)
            assert all(isinstance(entry[k], str) for k in ("node", "origin", "module", "group"))
            assert isinstance(entry["qsnr_db"], float) and -999.0 <= entry["qsnr_db"] <= 999.0
    neutral = next(p for p in data["passes"] if p["name"] == "annotate")
    assert neutral["output_qsnr_db"] == 999.0
    final = data["passes"][-1]
    points = {n["group"] for n in final["nodes"] if n["group"]}
    assert points == {"attn_qkv.weight", "attn_q_out", "attn_k_out", "attn_v_input"}
    q = next(n for n in final["nodes"] if n["node"] == "blocks_0_attn_qkv_q")
    assert q["module"] == "blocks.0.attn.qkv_q" and q["origin"] == "blocks_0_attn_qkv"


def test_compiled_report_table(compiled_report):
    table = compiled_report.table(worst=3)
    for record in compiled_report.passes:
        assert f" {record.name} " in table
    assert f"worst quantization points after '{compiled_report.final.name}'" in table
    assert len(table.splitlines()) == 2 + len(compiled_report.passes) + 2 + 3 + (
        1 if compiled_report.final.first_drop else 0
    )
    diff = sum(r.diff_seconds for r in compiled_report.passes)
    assert diff > 0 and f"numeric diff {diff:.2f} s, graph dumps 0.00 s" in table


def test_first_drop_names_the_pass_that_introduced_it(tmp_path):
    """A drop that appears in lower_fake_quant and is carried by a later pass is attributed to lower_fake_quant."""
    report = handmade()
    carried = PassRecord(
        "lower_log_int_softmax",
        seconds=0.1,
        output_qsnr_db=-math.inf,
        nodes=list(report.final.nodes),
        first_drop=dict(report.final.first_drop),
    )
    report.passes.append(carried)
    drop = report.first_drop()
    assert drop["node"] == "qkv" and drop["pass"] == "lower_fake_quant"
    lines = report.table().splitlines()
    assert lines[1].startswith("first large drop: qkv") and "introduced by pass 'lower_fake_quant'" in lines[1]
    data = strict_json(report.to_json(tmp_path / "r.json").read_text())
    assert data["first_drop"]["node"] == "qkv" and data["first_drop"]["pass"] == "lower_fake_quant"


def test_no_first_drop_line_when_nothing_drops():
    report = Report(
        model="M",
        qconfig="q",
        backend="fake",
        passes=[PassRecord("annotate", output_qsnr_db=math.inf, nodes=[node("x", math.inf, module="")])],
    )
    assert report.first_drop() is None
    assert "first large drop" not in report.table() and "first_drop" not in report.to_dict()
