"""Bad input to every fxquant command: one ``fxquant: error:`` line naming the path or
option and what to do, exit status 2, no traceback; unreadable images are skipped with one
warning. Tiny models, 32x32 images, two random calibration images."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
import torch.fx as fx

import fxquant
from fxquant.cli.app import main
from tests.test_cli import MODEL, TINY, assert_one_line_error, tiny_timm_models  # noqa: F401 (autouse fixture)

BASE = [
    "compile",
    "--model",
    MODEL,
    "--img-size",
    "32",
    "--num-classes",
    "10",
    "--quiet",
    "--no-diff",
    "--calib",
    "random:2",
]


@pytest.fixture
def no_compile(monkeypatch):
    """The checks must refuse before the (long) compile starts."""

    def compile_must_not_run(*args, **kwargs):
        raise AssertionError("fxquant.compile ran before the bad input was refused")

    monkeypatch.setattr(fxquant, "compile", compile_must_not_run)


def _tiny_compiled(model_name):
    torch.manual_seed(0)
    model = timm.create_model(MODEL, img_size=32, num_classes=10, **TINY).eval()
    return fxquant.compile(
        model, "w8a8", calib_data=[torch.randn(2, 3, 32, 32)], progress=False, numeric_diff=False, model_name=model_name
    )


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A .fxq written by compile with model_name, and one saved from Python without it."""
    folder = tmp_path_factory.mktemp("saved")
    named, unnamed = folder / "named.fxq", folder / "unnamed.fxq"
    fxquant.save(_tiny_compiled(MODEL), named)
    fxquant.save(_tiny_compiled(None), unnamed)
    return named, unnamed


def _png(path, size=(40, 48)):
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, size=(*size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def _mixed_folder(tmp_path):
    """good.png, and four image names that cannot be read: corrupt, empty, truncated, a folder."""
    folder = tmp_path / "images"
    folder.mkdir()
    _png(folder / "good.png")
    (folder / "corrupt.jpg").write_bytes(os.urandom(600))
    (folder / "empty.png").write_bytes(b"")
    _png(tmp_path / "whole.png", size=(64, 64))
    data = (tmp_path / "whole.png").read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    (folder / "x.png").mkdir()
    return folder


UNREADABLE = ("corrupt.jpg", "empty.png", "truncated.png", "x.png")


# ------------------------------------------------------------------------ image folders
def test_calib_skips_unreadable_images_with_one_warning(tmp_path, capsys, monkeypatch):
    seen = []
    real = fxquant.compile
    monkeypatch.setattr(fxquant, "compile", lambda m, q, **kw: seen.append(kw["calib_data"]) or real(m, q, **kw))
    folder = _mixed_folder(tmp_path)
    rc = main(BASE[:-1] + [str(folder)])
    err = capsys.readouterr().err
    assert rc == 0, err
    (warning,) = err.strip().splitlines()
    assert warning.startswith(f"fxquant: warning: --calib {folder}: skipped 4 of 5")
    assert all(name in warning for name in UNREADABLE) and "good.png" not in warning
    assert [tuple(b.shape) for b in seen[0]] == [(1, 3, 32, 32)]
    assert "Traceback" not in err


def test_calib_folder_without_a_readable_image_is_refused(tmp_path, capsys, no_compile):
    folder = _mixed_folder(tmp_path)
    (folder / "good.png").unlink()
    rc = main(BASE[:-1] + [str(folder)])
    line = assert_one_line_error(rc, capsys, f"--calib {folder}", "none of its 4 image files could be read")
    assert all(name in line for name in UNREADABLE)


def test_run_skips_unreadable_images_and_refuses_a_folder_of_them(tmp_path, capsys, saved):
    folder = _mixed_folder(tmp_path)
    rc = main(["run", str(saved[0]), "--images", str(folder), "--batch-size", "2"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert [line.split(":")[0] for line in out.strip().splitlines()] == ["good.png"]
    (warning,) = err.strip().splitlines()
    assert warning.startswith(f"fxquant: warning: --images {folder}: skipped 4 of 5")
    (folder / "good.png").unlink()
    rc = main(["run", str(saved[0]), "--images", str(folder)])
    assert_one_line_error(rc, capsys, f"--images {folder}", "none of its 4 image files")


# ------------------------------------------------------------------------- bad numbers
@pytest.mark.parametrize(
    "argv, option",
    [
        (BASE + ["--batch-size", "0"], "--batch-size"),
        (BASE + ["--batch-size", "-3"], "--batch-size"),
        (BASE + ["--batch-size", "two"], "--batch-size"),
        (BASE + ["--worst", "-1"], "--worst"),
        (BASE + ["--img-size", "0"], "--img-size"),
        (BASE + ["--num-classes", "-1"], "--num-classes"),
        (["diff", "--model", MODEL, "--top", "-1"], "--top"),
        (["run", "m.fxq", "--images", ".", "--batch-size", "0"], "--batch-size"),
        (["run", "m.fxq", "--images", ".", "--img-size", "-32"], "--img-size"),
        (["export", "m.fxq", "--onnx", "m.onnx", "--img-size", "0"], "--img-size"),
        (["export", "m.fxq", "--onnx", "m.onnx", "--opset", "0"], "--opset"),
        (["report", ".", "--images", "0"], "--images"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else v,
)
def test_bad_numbers_are_refused_by_the_parser(argv, option, capsys, no_compile):
    line = assert_one_line_error(
        main(argv), capsys, f"argument {option}", "must be an integer" if argv[-1] != "two" else "expected an integer"
    )
    assert "--help" in line


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["compile", "--model", MODEL, "--bogus"], "unrecognized arguments: --bogus"),
        (["compile"], "one of the arguments --model --hf-config is required"),
        ([], "required: command"),
    ],
)
def test_parser_errors_are_one_line(argv, fragment, capsys):
    assert_one_line_error(main(argv), capsys, fragment)


# --------------------------------------------------------------------------- checkpoints
class _RunsCode:
    """A pickle that would create a directory when unpickled without weights_only."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.mark.parametrize("protocol", [2, 4])
def test_checkpoint_pickle_that_needs_code_is_refused_not_run(tmp_path, capsys, no_compile, protocol):
    marker, path = tmp_path / "pwned", tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps(_RunsCode(marker), protocol=protocol))
    line = assert_one_line_error(
        main(BASE + ["--checkpoint", str(path)]),
        capsys,
        f"--checkpoint {path}",
        "needs code to load",
        "mkdir",
        "state_dict()",
    )
    assert "weights_only=True" in line
    assert not marker.exists()


def _write(path, kind):
    if kind == "random bytes":
        path.write_bytes(np.random.default_rng(1).bytes(2000))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "a module":
        torch.save(torch.nn.Linear(2, 2), path)
    elif kind == "a list":
        torch.save([torch.zeros(2)], path)
    elif kind == "a training dict":
        torch.save({"epoch": 3, "weights": {"w": torch.zeros(2)}}, path)
    elif kind == "corrupt safetensors":
        path.write_bytes(np.random.default_rng(2).bytes(300))
    elif kind == "foreign safetensors":
        from safetensors.torch import save_file

        save_file({"encoder.weight": torch.zeros(3)}, str(path))
    return path


@pytest.mark.parametrize(
    "kind, name, fragments",
    [
        ("random bytes", "w.pth", ["not a PyTorch checkpoint", "weights_only=True"]),
        ("empty", "w.pth", ["not a PyTorch checkpoint", "ends early"]),
        ("a module", "w.pth", ["needs code to load", "torch.nn.modules.linear.Linear"]),
        ("a list", "w.pth", ["holds a list, not a state dict"]),
        ("a training dict", "w.pth", ["entry 'epoch' is of type int, not a tensor", "state_dict"]),
        ("corrupt safetensors", "w.safetensors", ["not a readable safetensors file"]),
        (
            "foreign safetensors",
            "w.safetensors",
            ["does not fit the model", "none of the model's", "'encoder.weight'", "another model"],
        ),
    ],
)
def test_bad_checkpoint_files(tmp_path, capsys, no_compile, kind, name, fragments):
    path = _write(tmp_path / name, kind)
    assert_one_line_error(main(BASE + ["--checkpoint", str(path)]), capsys, f"--checkpoint {path}", *fragments)


def test_checkpoint_with_a_wrong_shape_names_the_key(tmp_path, capsys, no_compile):
    torch.manual_seed(0)
    path = tmp_path / "five.pth"
    torch.save(timm.create_model(MODEL, img_size=32, num_classes=5, **TINY).state_dict(), path)
    assert_one_line_error(
        main(BASE + ["--checkpoint", str(path)]),
        capsys,
        "does not fit the model",
        "'head.weight' is [5, 64] in the file but [10, 64]",
        "--num-classes",
    )


def test_checkpoint_that_is_a_directory(tmp_path, capsys, no_compile):
    assert_one_line_error(
        main(BASE + ["--checkpoint", str(tmp_path)]), capsys, f"--checkpoint {tmp_path}", "is a directory"
    )


# -------------------------------------------------------------------------- output paths
@pytest.mark.parametrize(
    "option, under_file",
    [
        ("--save", True),
        ("--save", False),
        ("--report", True),
        ("--report", False),
        ("--html", True),
        ("--html", False),
        ("--dump-dir", True),
        ("--dump-dir", False),
    ],
)
def test_compile_outputs_are_checked_before_the_compile(tmp_path, capsys, no_compile, option, under_file):
    blocker = tmp_path / "somefile"
    blocker.write_text("a file")
    folder = tmp_path / "folder"
    folder.mkdir()
    if option == "--dump-dir":  # a directory expected: an existing file, or one under a file
        path, fragment = (blocker / "dumps", f"{blocker} is a file") if under_file else (blocker, "is a file")
    else:
        path, fragment = (blocker / "x.out", f"{blocker} is a file") if under_file else (folder, "is a directory")
    assert_one_line_error(main(BASE + [option, str(path)]), capsys, f"{option} {path}", fragment)


def test_html_statistics_path_that_is_a_directory(tmp_path, capsys, no_compile):
    (tmp_path / "page_stats.json").mkdir()
    page = tmp_path / "page.html"
    assert_one_line_error(
        main(BASE + ["--html", str(page)]), capsys, f"--html {page}", "page_stats.json, which is a directory"
    )


def test_diff_json_and_report_out_paths(tmp_path, capsys, no_compile):
    assert_one_line_error(
        main(["diff", "--model", MODEL, "--json", str(tmp_path)]), capsys, f"--json {tmp_path}", "is a directory"
    )
    (tmp_path / "report.json").write_text("{}")
    (tmp_path / "blocker").write_text("a file")
    out = tmp_path / "blocker" / "page.html"
    assert_one_line_error(main(["report", str(tmp_path), "--out", str(out)]), capsys, f"--out {out}", "is a file")


def test_export_onnx_path(tmp_path, capsys, saved):
    (tmp_path / "blocker").write_text("a file")
    under = tmp_path / "blocker" / "m.onnx"
    assert_one_line_error(main(["export", str(saved[0]), "--onnx", str(under)]), capsys, f"--onnx {under}", "is a file")
    assert_one_line_error(
        main(["export", str(saved[0]), "--onnx", str(tmp_path)]), capsys, f"--onnx {tmp_path}", "is a directory"
    )


def test_model_file_that_is_a_directory(tmp_path, capsys):
    assert_one_line_error(
        main(["run", str(tmp_path), "--images", str(tmp_path)]), capsys, str(tmp_path), "is a directory", "--save"
    )


# ---------------------------------------------------------------- export / run: the model
@pytest.mark.parametrize("command", ["run", "export"])
def test_img_size_the_model_does_not_take(tmp_path, capsys, saved, command):
    folder = tmp_path / "photos"
    folder.mkdir()
    _png(folder / "p.png")
    target = ["--images", str(folder)] if command == "run" else ["--onnx", str(tmp_path / "m.onnx")]
    rc = main([command, str(saved[0]), *target, "--img-size", "64"])
    assert_one_line_error(rc, capsys, "--img-size 64", "takes 32x32 images", "not 64x64", "--img-size 32")


class _FlatLinear(torch.nn.Module):
    """A graph that does not check its input size but takes only 3x32x32 images."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3 * 32 * 32, 10)

    def forward(self, x):
        return self.fc(x.flatten(1))


def test_run_names_the_input_shape_a_model_refuses(tmp_path, capsys, monkeypatch):
    model_file, folder = tmp_path / "m.fxq", tmp_path / "photos"
    model_file.write_bytes(b"stands in for a saved model")
    folder.mkdir()
    _png(folder / "p.png")
    monkeypatch.setattr(fxquant, "load", lambda path: fx.symbolic_trace(_FlatLinear()))
    rc = main(["run", str(model_file), "--images", str(folder), "--img-size", "64", "--model", MODEL])
    assert_one_line_error(
        rc, capsys, str(model_file), "failed on images of shape (3, 64, 64)", "--img-size it was compiled for"
    )


def test_run_on_a_file_saved_without_model_name(tmp_path, capsys, saved):
    folder = tmp_path / "photos"
    folder.mkdir()
    _png(folder / "p.png")
    unnamed = saved[1]
    assert_one_line_error(
        main(["run", str(unnamed), "--images", str(folder)]),
        capsys,
        str(unnamed),
        "'VisionTransformer', not a timm model",
        "pass --model NAME",
        "model_name=",
    )
    assert main(["run", str(unnamed), "--images", str(folder), "--model", MODEL]) == 0
    assert capsys.readouterr().out.startswith("p.png: class ")
    assert_one_line_error(
        main(["run", str(unnamed), "--images", str(folder), "--model", "vit_nope"]),
        capsys,
        "--model vit_nope",
        "unknown timm model",
    )


# ------------------------------------------------------------------------ ONNX failures
class _Unexportable(torch.nn.Module):
    def forward(self, x):
        return torch.linalg.eigh(x @ x.transpose(-1, -2))[0]


def test_export_failure_is_one_line_and_keeps_the_ir_off_the_console(tmp_path, capfd, monkeypatch):
    pytest.importorskip("onnx")
    model_file, onnx_file = tmp_path / "m.fxq", tmp_path / "m.onnx"
    model_file.write_bytes(b"stands in for a saved model")
    monkeypatch.setattr(fxquant, "load", lambda path: fx.symbolic_trace(_Unexportable()))
    rc = main(["export", str(model_file), "--onnx", str(onnx_file), "--img-size", "4"])
    out, err = capfd.readouterr()  # the file descriptors: torch's C++ logger writes there
    assert rc == 2 and out == ""
    (line,) = err.strip().splitlines()
    assert line.startswith(f"fxquant: error: torch.onnx.export failed for {onnx_file}: UnsupportedOperatorError")
    assert "aten::linalg_eigh" in line and f"{onnx_file}.log" in line
    assert "graph(" in (tmp_path / "m.onnx.log").read_text()


def test_export_onnx_refuses_opsets_the_exporter_does_not_write(tmp_path, capsys, saved):
    rc = main(["export", str(saved[0]), "--onnx", str(tmp_path / "m.onnx"), "--opset", "99"])
    assert_one_line_error(rc, capsys, "opset 99", "use an opset from 13 to")


# ------------------------------------------------------------- a real process: no traceback
@pytest.mark.parametrize("extra", [["--batch-size", "0"], ["--checkpoint", "RANDOM"]], ids=["batch", "checkpoint"])
def test_no_traceback_from_the_command(tmp_path, extra):
    if "RANDOM" in extra:
        (tmp_path / "w.pth").write_bytes(np.random.default_rng(3).bytes(1000))
        extra = ["--checkpoint", str(tmp_path / "w.pth")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "fxquant", *BASE, *extra],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("fxquant: error: ") and extra[0] in line
