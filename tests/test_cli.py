"""The command line: fxquant.cli.app.main([...]) on a tiny ViT; errors are one line on stderr, exit 2."""

from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch

import fxquant
from fxquant.cli.app import main

MODEL = "vit_tiny_patch16_224"
TINY = dict(patch_size=8, depth=2, embed_dim=64, num_heads=2)  # what --img-size/--num-classes cannot set
BASE = ["compile", "--model", MODEL, "--img-size", "32", "--num-classes", "10", "--quiet"]
PASSES = [
    "trace",
    "decompose_attention",
    "linear_modules",
    "annotate",
    "split_qkv",
    "smooth",
    "insert_observers",
    "calibrate",
    "fuse_scales",
    "lower_fake_quant",
    "lower_log_int_softmax",
]


@pytest.fixture(autouse=True)
def tiny_timm_models(monkeypatch):
    """The CLI builds vit_tiny_patch16_224 (12 blocks of width 192); shrink it to 2 blocks of 64."""
    real = timm.create_model

    def create_model(name, *args, **kwargs):
        if name == MODEL:
            kwargs = {**TINY, **kwargs}
        return real(name, *args, **kwargs)

    monkeypatch.setattr(timm, "create_model", create_model)


@pytest.fixture
def spy(monkeypatch):
    """Records what the CLI hands to fxquant.compile, then compiles for real."""
    calls = []
    real = fxquant.compile

    def compile_spy(model, qconfig, **kwargs):
        calls.append({"model": model, "qconfig": qconfig, **kwargs})
        return real(model, qconfig, **kwargs)

    monkeypatch.setattr(fxquant, "compile", compile_spy)
    return calls


def tiny_model(seed: int, num_classes: int = 10) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(MODEL, img_size=32, num_classes=num_classes, **TINY)


def assert_one_line_error(rc, capsys, *fragments):
    out, err = capsys.readouterr()
    assert rc == 2
    assert "Traceback" not in err and "Traceback" not in out
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("fxquant: error: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def test_compile_prints_table_and_writes_report(tmp_path, capsys):
    report_path, dump_dir = tmp_path / "report.json", tmp_path / "d"
    rc = main(BASE + ["--calib", "random:8", "--report", str(report_path), "--dump-dir", str(dump_dir)])
    out, err = capsys.readouterr()
    assert rc == 0
    assert err == ""  # --quiet: no progress bar
    assert f"fxquant report: model={MODEL} qconfig=w8a8 backend=fake" in out
    for name in PASSES:
        assert f" {name} " in out
    assert "worst quantization points" in out
    assert str(report_path) in out and str(dump_dir) in out
    data = json.loads(report_path.read_text(), parse_constant=lambda c: pytest.fail(f"JSON constant {c}"))
    assert (data["model"], data["qconfig"], data["backend"]) == (MODEL, "w8a8", "fake")
    assert [p["name"] for p in data["passes"]] == PASSES
    assert data["passes"][-1]["nodes"]
    stems = sorted({p.stem for p in dump_dir.iterdir() if p.suffix in (".py", ".dot", ".json")})
    assert stems == [f"{i:02d}_{name}" for i, name in enumerate(PASSES)]


def test_unknown_model(capsys):
    rc = main(["compile", "--model", "vit_nonexistent_patch3", "--calib", "random:2"])
    assert_one_line_error(rc, capsys, "unknown timm model 'vit_nonexistent_patch3'")


def test_missing_checkpoint(tmp_path, capsys):
    missing = tmp_path / "nope.pth"
    rc = main(BASE + ["--checkpoint", str(missing), "--calib", "random:2"])
    assert_one_line_error(rc, capsys, str(missing), "no such file")


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("random:abc", "expected random:N with an integer N"),
        ("random:0", "N >= 1"),
        ("no/such/folder", "expected random:N or a directory of images"),
    ],
)
def test_bad_calib_spec(spec, fragment, capsys):
    rc = main(BASE + ["--calib", spec])
    assert_one_line_error(rc, capsys, f"{fragment}")


def test_calib_directory_without_images(tmp_path, capsys):
    (tmp_path / "readme.txt").write_text("no images here")
    rc = main(BASE + ["--calib", str(tmp_path)])
    assert_one_line_error(rc, capsys, "no images")


@pytest.mark.parametrize("qconfig, fragment", [("w3a3", "neither a preset"), ("bad.yaml", "norm1.observer_type")])
def test_unknown_or_bad_qconfig(tmp_path, monkeypatch, capsys, qconfig, fragment):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.yaml").write_text("norm1:\n  observer_type: FooObserver\n")
    rc = main(BASE + ["--calib", "random:2", "--qconfig", qconfig])
    assert_one_line_error(rc, capsys, fragment)


@pytest.mark.parametrize("wrapped", [False, True], ids=["state_dict", "wrapped_state_dict"])
def test_checkpoint_is_loaded(tmp_path, capsys, spy, wrapped):
    saved = tiny_model(seed=5)  # not the CLI's --seed 0 weights: loading must matter
    state = saved.state_dict()
    path = tmp_path / "tiny.pth"
    torch.save({"state_dict": state} if wrapped else state, path)
    rc = main(BASE + ["--checkpoint", str(path), "--calib", "random:4", "--qconfig", "seed_attn"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "qconfig=seed_attn" in out
    (call,) = spy
    loaded = call["model"].state_dict()
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    assert not call["model"].training


def test_checkpoint_that_does_not_fit(tmp_path, capsys):
    path = tmp_path / "other.pth"
    torch.save(tiny_model(seed=0, num_classes=5).state_dict(), path)
    rc = main(BASE + ["--checkpoint", str(path), "--calib", "random:2"])
    assert_one_line_error(rc, capsys, "does not fit the model")


def test_calibration_directory_of_png_images(tmp_path, capsys, spy):
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, size in enumerate([(40, 40), (48, 36), (64, 64)]):
        pixels = rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img_{i}.png")
    Image.fromarray(rng.integers(0, 256, size=(40, 40), dtype=np.uint8)).save(folder / "gray.png")  # mode L
    (folder / "labels.txt").write_text("ignored")
    rc = main(BASE + ["--calib", str(folder), "--qconfig", "seed_attn", "--batch-size", "3"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "lower_fake_quant" in out
    (call,) = spy
    batches = call["calib_data"]
    assert [tuple(b.shape) for b in batches] == [(3, 3, 32, 32), (1, 3, 32, 32)]
    assert all(torch.isfinite(b).all() for b in batches)


def test_compile_html_writes_page_and_statistics(tmp_path, capsys):
    page = tmp_path / "out" / "report.html"
    rc = main(
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
            "--html",
            str(page),
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0 and f"HTML report written to {page}" in out
    text = page.read_text()
    assert "<svg" in text and "lower_fake_quant" in text
    stats = json.loads((tmp_path / "out" / "report_stats.json").read_text())
    assert stats["rows"] and len(set(stats["columns"])) == len(stats["columns"])
    assert (tmp_path / "out" / "report_stats.csv").read_text().startswith("node,")


def test_compile_save_writes_a_loadable_model(tmp_path, capsys):
    path = tmp_path / "m.fxq"
    rc = main(
        [
            "compile",
            "--model",
            "vit_tiny_patch16_224",
            "--img-size",
            "32",
            "--num-classes",
            "10",
            "--qconfig",
            "seed_attn",
            "--calib",
            "random:4",
            "--quiet",
            "--save",
            str(path),
        ]
    )
    assert rc == 0 and f"quantized model saved to {path}" in capsys.readouterr().out
    qm = fxquant.load(path)
    x = torch.randn(2, 3, 32, 32)
    assert qm(x).shape == (2, 10) and qm.report.qconfig == "seed_attn"


# ------------------------------------------------------------------ export / run (a saved .fxq)
def _saved(tmp_path, num_classes=10, qconfig="w8a8"):
    path = tmp_path / f"m{num_classes}.fxq"
    rc = main(
        [
            "compile",
            "--model",
            MODEL,
            "--img-size",
            "32",
            "--num-classes",
            str(num_classes),
            "--qconfig",
            qconfig,
            "--calib",
            "random:4",
            "--quiet",
            "--no-diff",
            "--save",
            str(path),
        ]
    )
    assert rc == 0
    return path


def _image_folder(tmp_path, count=2):
    from PIL import Image

    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8)).save(folder / f"p{i}.png")
    (folder / "notes.txt").write_text("ignored")
    return folder


def test_export_writes_onnx_that_onnxruntime_runs(tmp_path, capsys):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from fxquant.quant.quantizers import qsnr_db

    path = _saved(tmp_path)
    capsys.readouterr()
    out_file = tmp_path / "m.onnx"
    rc = main(["export", str(path), "--onnx", str(out_file)])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert f"ONNX written to {out_file}" in out and "(batch, 3, 32, 32)" in out  # size read from the graph
    onnx.checker.check_model(str(out_file))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(out_file), options, providers=["CPUExecutionProvider"])
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = fxquant.load(path)(x)
    assert qsnr_db(expected, torch.from_numpy(session.run(None, {"images": x.numpy()})[0])) >= 40.0


def test_run_prints_imagenet_top5_for_a_1000_class_head(tmp_path, capsys):
    from timm.data import ImageNetInfo

    path = _saved(tmp_path, num_classes=1000)
    folder = _image_folder(tmp_path)
    capsys.readouterr()
    rc = main(["run", str(path), "--images", str(folder)])
    out, err = capsys.readouterr()
    assert rc == 0, err
    lines = out.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["p0.png", "p1.png"]
    names = {ImageNetInfo().index_to_description(i) for i in range(1000)}
    for line in lines:
        entries = line.split(": ", 1)[1].split("; ")
        assert len(entries) == 5
        assert all(e.rsplit(" (", 1)[0] in names and e.endswith("%)") for e in entries), line


def test_run_prints_class_indices_or_features(tmp_path, capsys):
    folder = _image_folder(tmp_path, count=1)
    rc = main(["run", str(_saved(tmp_path, num_classes=10)), "--images", str(folder)])
    out = capsys.readouterr().out
    assert rc == 0 and out.strip().splitlines()[-1].startswith("p0.png: class ")
    assert out.strip().splitlines()[-1].count("; ") == 4
    rc = main(["run", str(_saved(tmp_path, num_classes=0)), "--images", str(folder)])
    out = capsys.readouterr().out
    assert rc == 0 and "p0.png: features of shape (64,)" in out and "no classifier head" in out


def test_export_and_run_errors_are_one_line(tmp_path, capsys):
    missing = tmp_path / "missing.fxq"
    assert_one_line_error(
        main(["export", str(missing), "--onnx", str(tmp_path / "m.onnx")]), capsys, str(missing), "no such file"
    )
    not_fxq = tmp_path / "bad.fxq"
    not_fxq.write_bytes(b"not a safetensors file")
    assert_one_line_error(main(["run", str(not_fxq), "--images", str(tmp_path)]), capsys, str(not_fxq))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(main(["run", str(_saved(tmp_path)), "--images", str(empty)]), capsys, "no images")


# ------------------------------------------------------------------ report DIR
def test_report_dir_writes_the_page_from_a_dump(tmp_path, capsys):
    dump, model = tmp_path / "d", tmp_path / "m.fxq"
    rc = main(
        BASE
        + ["--calib", "random:4", "--dump-dir", str(dump), "--report", str(dump / "report.json"), "--save", str(model)]
    )
    assert rc == 0
    capsys.readouterr()
    assert main(["report", str(dump)]) == 0
    page = dump / "report.html"
    assert f"HTML report written to {page}" in capsys.readouterr().out
    text = page.read_text()
    assert "lower_fake_quant" in text and "<svg" in text
    from fxquant.infra.records import Report

    again = Report.from_json(dump / "report.json")
    assert again.to_dict() == json.loads((dump / "report.json").read_text())
    # with the saved model: histograms and statistics too
    assert main(["report", str(dump), "--model", str(model), "--out", str(tmp_path / "full.html")]) == 0
    full = (tmp_path / "full.html").read_text()
    assert "histogram" in full.lower() and (tmp_path / "full_stats.csv").is_file()


def test_report_dir_errors_are_one_line(tmp_path, capsys):
    assert_one_line_error(main(["report", str(tmp_path / "nope")]), capsys, "not a directory")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(main(["report", str(tmp_path / "empty")]), capsys, "report.json", "--report")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "report.json").write_text("{}")
    assert_one_line_error(main(["report", str(tmp_path / "bad")]), capsys, "not an fxquant report")


@pytest.mark.skipif(
    not __import__("fxquant.runtime.onednn", fromlist=["x"]).onednn_available(),
    reason="oneDNN int8 ops need an x86 torch build",
)
def test_compile_int_with_onednn_kernels(capsys, spy):
    rc = main(BASE + ["--calib", "random:8", "--backend", "int", "--int-kernels", "onednn", "--no-diff"])
    out, _ = capsys.readouterr()
    assert rc == 0
    assert spy[-1]["backend"] == "int" and spy[-1]["int_kernels"] == "onednn"
    assert " use_onednn_kernels " in out  # the pass is in the table
    assert "use_onednn_kernels: 13 of 13 Linears on oneDNN's int8 kernel" in out


def test_int_kernels_without_int_backend_is_one_line_error(capsys):
    rc = main(BASE + ["--calib", "random:8", "--int-kernels", "onednn"])
    assert_one_line_error(rc, capsys, "needs backend='int'")
