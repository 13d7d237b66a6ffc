"""fxquant.debug: isolated vs propagated error per point, sensitivity, keep_float, `fxquant diff`."""

from __future__ import annotations

import copy
import json

import pytest
import timm
import torch

import fxquant
from fxquant.analysis.numeric_diff import output_qsnr
from fxquant.api import default_diff_inputs
from fxquant.debug import (
    choose_float_points,
    compile_keep_float,
    isolated_errors,
    keep_in_float,
    only_enabled,
    quant_point_nodes,
    rank_by_output,
    sensitivity,
)
from fxquant.runtime.fake_quant import QuantLinear
from tests.tiny import compiled_tiny_vit

QKV = {"blocks_0_attn_qkv_q", "blocks_0_attn_qkv_k", "blocks_0_attn_qkv_v"}


@pytest.fixture(scope="module")
def setup():
    model, calib, qm = compiled_tiny_vit()
    return model, calib, qm, default_diff_inputs(calib)


def _plant_double_quantization(qm) -> None:
    """Block 0's Q/K/V codes dequantized again with one per-tensor scale (4x the largest
    per-channel scale): the seed's double quantization, range explosion included."""
    for letter in "qkv":
        module = qm.get_submodule(f"blocks.0.attn.qkv_{letter}")
        assert isinstance(module, QuantLinear)
        qp = module.weight_qparams
        module.weight = module.weight_codes.float() * (qp.scale.max() * 4.0)


def test_all_off_is_fp32_and_toggles_restore(setup):
    model, _, qm, x = setup
    with torch.no_grad():
        expected, before = model(*x), qm(*x)
        with only_enabled(qm, ()):
            assert output_qsnr(expected, qm(*x)) >= 100.0
        after = qm(*x)
    assert torch.equal(before, after)  # every point is back on
    assert not any("forward" in qm.get_submodule(str(n.target)).__dict__ for n in quant_point_nodes(qm))


def test_all_off_turns_log_int_softmax_off_too():
    model, calib, qm = compiled_tiny_vit("fqvit_w8a8")
    x = default_diff_inputs(calib)
    lis = [n for n in quant_point_nodes(qm) if n.target.startswith("fxq_softmax")]
    assert len(lis) == 2
    with torch.no_grad():
        expected, before = model(*x), qm(*x)
        with only_enabled(qm, ()):
            assert output_qsnr(expected, qm(*x)) >= 100.0  # LIS off = the float softmax
        with only_enabled(qm, {lis[0].name}):
            assert output_qsnr(expected, qm(*x)) < 100.0  # LIS alone on changes the output
        assert torch.equal(before, qm(*x))


def test_isolated_vs_propagated(setup):
    _, _, qm, x = setup
    rows = isolated_errors(qm, x)
    assert len(rows) == len(quant_point_nodes(qm)) > 10
    assert {r["kind"] for r in rows} == {"activation", "weight"}
    first = rows[0]  # nothing upstream is quantized: isolated == propagated
    assert first["isolated_qsnr_db"] == pytest.approx(first["propagated_qsnr_db"], abs=0.01)
    # a healthy w8a8 point is fine alone; errors accumulate downstream
    assert all(r["isolated_qsnr_db"] > 15.0 for r in rows)
    assert min(r["propagated_qsnr_db"] for r in rows) < min(r["isolated_qsnr_db"] for r in rows)
    only = isolated_errors(qm, x, points=[rows[3]["node"]])
    assert len(only) == 1 and only[0]["isolated_qsnr_db"] == pytest.approx(rows[3]["isolated_qsnr_db"])
    with pytest.raises(fxquant.FxqError, match="not quantization points"):
        isolated_errors(qm, x, points=["nope"])


def test_planted_double_quantization_is_named_first(setup, tmp_path):
    _, _, qm, x = setup
    healthy = fxquant.diff(qm, diff_inputs=x)
    assert healthy.rows[0]["node"] not in QKV
    broken = copy.deepcopy(qm)
    _plant_double_quantization(broken)
    result = fxquant.diff(broken, diff_inputs=x)
    first_line = result.table().splitlines()[0]
    assert any(name in first_line for name in QKV), first_line
    assert "qconfig=w8a8" in result.table()  # a deepcopy of the compiled graph keeps its names
    assert {r["node"] for r in result.rows[:3]} == QKV  # the lowest isolated QSNR of all points
    assert all(r["isolated_qsnr_db"] < 0.0 for r in result.rows[:3])
    assert result.output_qsnr_db < healthy.output_qsnr_db - 10.0
    data = json.loads(result.to_json(tmp_path / "diff.json").read_text())
    assert [p["node"] for p in data["points"][:3]] == [r["node"] for r in result.rows[:3]]
    assert all(isinstance(p["isolated_qsnr_db"], float) for p in data["points"])


def test_diff_compiles_a_model(setup):
    model, calib, qm, x = setup
    result = fxquant.diff(model, "w8a8", calib_data=(b for b in torch.split(calib, 8)))
    assert len(result.rows) == len(quant_point_nodes(qm))
    keys = [r["isolated_qsnr_db"] for r in result.rows]
    assert keys == sorted(keys)
    with pytest.raises(fxquant.FxqError, match="calib_data"):
        fxquant.diff(model)


def test_sensitivity_and_keep_float_alias(setup):
    model, calib, qm, x = setup
    ranked = sensitivity(qm, diff_inputs=x)
    db = [r["output_qsnr_db_isolated"] for r in ranked]
    assert db == sorted(db)
    # compile(keep_float=K) ranks on the first calibration batch; rank_by_output == sensitivity's order
    first = (calib[:8],)
    assert [r["node"] for r in rank_by_output(qm, first)] == [r["node"] for r in sensitivity(qm, diff_inputs=first)]
    q1 = compile_keep_float(model, "w8a8", calib_data=calib, k=1, progress=False)  # thin alias
    assert q1.keep_float == [choose_float_points(qm, 1, first)[0]["node"]]


def test_compile_keep_float_zero_is_the_normal_compile(setup):
    model, calib, qm, x = setup
    q0 = fxquant.compile(model, "w8a8", calib_data=calib, progress=False, keep_float=0)
    assert q0.keep_float == [] and q0.report.keep_float == [] and q0.report.to_dict()["keep_float"] == []
    assert [n.name for n in quant_point_nodes(q0)] == [n.name for n in quant_point_nodes(qm)]
    with torch.no_grad():
        assert torch.equal(q0(*x), qm(*x))
    assert not any("keep_float" in line for line in q0.report.float_points + q0.report.notes)
    for bad in (-1, 1.5, True):
        with pytest.raises(fxquant.FxqError, match="keep_float"):
            fxquant.compile(model, "w8a8", calib_data=calib, progress=False, keep_float=bad)


def test_compile_keep_float_keeps_points_that_help(setup, tmp_path):
    model, calib, qm, x = setup
    first = (calib[:8],)  # the first calibration batch (CALIB_BATCH 8): what compile ranks on
    ranked = rank_by_output(qm, first)
    chosen = choose_float_points(qm, 2, first)
    candidates = {r["node"] for r in ranked[:6]}  # max(2k, k + 4) most sensitive
    assert chosen and {r["node"] for r in chosen} <= candidates
    with torch.no_grad():
        with only_enabled(qm, ()):
            ref = qm(*first)
        before = output_qsnr(ref, qm(*first))
    kept_db = [r["output_qsnr_db_kept"] for r in chosen]
    assert kept_db[0] > before and kept_db == sorted(kept_db)  # each pick raised it: monotonic
    most = chosen[0]["node"]
    q1 = fxquant.compile(model, "w8a8", calib_data=calib, progress=False, keep_float=1)
    assert q1.keep_float == [most] and q1.report.keep_float == [most]
    assert {n.name for n in quant_point_nodes(qm)} - {n.name for n in quant_point_nodes(q1)} == {most}
    lines = [line for line in q1.report.float_points if "keep_float" in line]
    assert len(lines) == 1 and lines[0].startswith(f"{most}: kept in float") and "pick 1" in lines[0]
    assert any(n.startswith("keep_float 1:") for n in q1.report.notes)
    data = json.loads(q1.report.to_json(tmp_path / "r.json").read_text())
    assert data["keep_float"] == [most] and any(most in line for line in data["float_points"])
    with torch.no_grad():  # only that point changed: it now computes float
        with only_enabled(qm, [n.name for n in quant_point_nodes(qm) if n.name != most]):
            expected = qm(*x)
        assert torch.allclose(q1(*x), expected, atol=1e-5)
    q2 = fxquant.compile(model, "w8a8", calib_data=calib, progress=False, keep_float=2)
    assert q2.keep_float == [r["node"] for r in chosen]  # greedy: k=2 extends k=1


def test_keep_float_stops_when_nothing_helps(setup):
    model, calib, qm, x = setup
    qm_copy = copy.deepcopy(qm)
    names = [n.name for n in quant_point_nodes(qm_copy)]
    keep_in_float(qm_copy, names[1:], why="test")  # one point left quantized
    chosen = choose_float_points(qm_copy, 3, (calib[:8],))
    assert [r["node"] for r in chosen] == [names[0]]  # after it, nothing is left to help: stop at 1


@pytest.fixture
def small_cli_models(monkeypatch):
    """The CLI builds full-width timm models; shrink them to 2 blocks of width 64."""
    real = timm.create_model
    shrink = dict(patch_size=8, depth=2, embed_dim=64, num_heads=2)
    monkeypatch.setattr(timm, "create_model", lambda name, *a, **k: real(name, *a, **{**shrink, **k}))


def test_cli_compile_keep_float(small_cli_models, capsys, tmp_path):
    from fxquant.cli.app import main

    out_json = tmp_path / "r.json"
    code = main(
        [
            "compile",
            "--model",
            "vit_tiny_patch16_224",
            "--img-size",
            "32",
            "--num-classes",
            "10",
            "--calib",
            "random:8",
            "--quiet",
            "--keep-float",
            "2",
            "--report",
            str(out_json),
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    kept = json.loads(out_json.read_text())["keep_float"]
    assert len(kept) == 2
    assert "points kept in float (--keep-float 2): 2" in out
    assert all(f"{name}: kept in float" in out for name in kept)
    code = main(
        [
            "compile",
            "--model",
            "vit_tiny_patch16_224",
            "--img-size",
            "32",
            "--num-classes",
            "10",
            "--calib",
            "random:8",
            "--quiet",
            "--keep-float",
            "-1",
        ]
    )
    assert code == 2 and "keep_float must be" in capsys.readouterr().err


def test_cli_diff(small_cli_models, capsys, tmp_path):
    from fxquant.cli.app import main

    out_json = tmp_path / "d.json"
    code = main(
        [
            "diff",
            "--model",
            "vit_tiny_patch16_224",
            "--img-size",
            "32",
            "--num-classes",
            "10",
            "--calib",
            "random:8",
            "--top",
            "5",
            "--json",
            str(out_json),
        ]
    )
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    points = json.loads(out_json.read_text())["points"]
    assert lines[0].startswith(f"worst point: {points[0]['node']} ")
    assert len(lines) == 3 + 5 + 1  # worst point, summary, header, --top rows, "diff written to"


def test_compile_keep_float_with_the_integer_backend(setup):
    """backend='int': the point is chosen on the fake-quant graph, then lower_integer leaves it in float."""
    from fxquant.runtime.int_modules import QuantizeCodes

    model, calib, qm, x = setup
    most = choose_float_points(qm, 1, (calib[:8],))[0]["node"]
    q_int = fxquant.compile(
        model, "w8a8", calib_data=calib, progress=False, keep_float=1, backend="int", int_kernels="portable"
    )
    assert q_int.keep_float == [most] and q_int.report.keep_float == [most]
    assert any(n.startswith("keep_float 1:") for n in q_int.report.notes)
    assert any(n.startswith("lower_integer:") for n in q_int.report.notes)
    assert [p.name for p in q_int.report.passes][-1] == "lower_integer"
    assert any(line.startswith(f"{most}: kept in float") for line in q_int.report.float_points)
    assert any(isinstance(m, QuantizeCodes) for m in q_int.modules())  # the other points are lowered
    q_fake = fxquant.compile(model, "w8a8", calib_data=calib, progress=False, keep_float=1)
    with torch.no_grad():
        assert output_qsnr(q_fake(*x), q_int(*x)) > 25.0
    with pytest.raises(fxquant.FxqError, match="custom passes"):
        fxquant.compile(
            model,
            "w8a8",
            calib_data=calib,
            progress=False,
            keep_float=1,
            backend="int",
            passes=fxquant.pipeline.default_passes("int"),
        )


def test_keep_float_with_the_integer_backend_when_every_point_stays_float():
    """A LayerNorm -> Linear model has one activation point; keep_float=1 leaves it float and
    lower_integer then has nothing to lower, which is not an error."""
    torch.manual_seed(0)

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.head = torch.nn.LayerNorm(16), torch.nn.Linear(16, 4)

        def forward(self, x):
            return self.head(self.norm(x))

    model = Tiny().eval()
    calib = [torch.randn(8, 5, 16) for _ in range(2)]
    qm = fxquant.compile(model, "w8a8", calib_data=calib, progress=False, keep_float=1, backend="int")
    assert len(qm.keep_float) == 1
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        assert output_qsnr(model(x), qm(x)) > 30.0
