"""``int_kernels="auto"``, the default of ``compile(..., backend="int")`` and of the CLI: oneDNN's
kernels and the fused attention on an x86 CPU with oneDNN's int8 kernels, portable elsewhere
(other CPUs, CUDA), with the choice and its reason in the report's notes."""

import platform

import pytest
import torch

import fxquant
from fxquant.cli.app import _parser
from fxquant.errors import FxqError
from fxquant.pipeline import default_passes, resolve_int_kernels
from fxquant.runtime.int_modules import IntLinear
from fxquant.runtime.onednn import OnednnLinear, onednn_available

timm = pytest.importorskip("timm")

TINY_VIT = dict(img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=2, num_classes=10)
needs_onednn = pytest.mark.skipif(not onednn_available(), reason="oneDNN int8 ops need an x86 torch build")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", **TINY_VIT).eval()
    return model, torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _compile(tiny, **kwargs):
    model, calib = tiny
    return fxquant.compile(model, "w8a8", calib_data=calib, progress=False, numeric_diff=False, **kwargs)


def _kinds(gm) -> set:
    return {type(m) for m in gm.modules()} & {IntLinear, OnednnLinear}


def test_resolution():
    chosen, why = resolve_int_kernels("auto")
    assert chosen == ("onednn" if onednn_available() else "portable") and why
    assert resolve_int_kernels("auto", torch.device("cuda")) == (
        "portable",
        "cuda tensors (oneDNN's int8 kernels are CPU-only)",
    )
    assert resolve_int_kernels("portable") == ("portable", "chosen explicitly")
    assert resolve_int_kernels("onednn", torch.device("cuda"))[0] == "onednn"  # explicit: compile's own checks
    with pytest.raises(ValueError, match="int_kernels 'fast' is not one of"):
        resolve_int_kernels("fast")


def test_resolution_without_onednn(monkeypatch):
    monkeypatch.setattr("fxquant.pipeline.onednn_available", lambda: False)
    chosen, why = resolve_int_kernels("auto")
    assert chosen == "portable" and why.startswith("no oneDNN int8 Linear kernels on this")
    names = [p.name for p in default_passes("int")]
    assert names[-1] == "lower_integer" and "use_onednn_kernels" not in names


@needs_onednn
def test_default_is_onednn_on_x86_with_the_reason_in_the_report(tiny):
    qm = _compile(tiny, backend="int")
    assert _kinds(qm) == {OnednnLinear}
    assert [p.name for p in qm.report.passes][-3:] == ["use_onednn_kernels", "fuse_residual_adds", "fuse_int_attention"]
    assert qm.report.notes[0] == f"int_kernels=auto -> onednn: {platform.machine()} CPU with oneDNN int8 kernels"
    explicit = _compile(tiny, backend="int", int_kernels="onednn")
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(qm(x), explicit(x))  # auto is exactly the explicit choice
    assert explicit.report.notes[0] == "int_kernels=onednn -> onednn: chosen explicitly"


def test_portable_when_onednn_is_unavailable(tiny, monkeypatch):
    monkeypatch.setattr("fxquant.pipeline.onednn_available", lambda: False)
    qm = _compile(tiny, backend="int")
    assert _kinds(qm) == {IntLinear}
    assert qm.report.passes[-1].name == "lower_integer"
    note = qm.report.notes[0]
    assert note.startswith("int_kernels=auto -> portable: no oneDNN int8 Linear kernels on this")
    # the explicit choice keeps its error
    monkeypatch.setattr("fxquant.api.onednn_available", lambda: False)
    with pytest.raises(FxqError, match="int_kernels='onednn' needs oneDNN's int8 Linear kernels"):
        _compile(tiny, backend="int", int_kernels="onednn")


def test_explicit_portable_and_the_fake_backend_are_unaffected(tiny):
    portable = _compile(tiny, backend="int", int_kernels="portable")
    assert _kinds(portable) == {IntLinear}
    assert portable.report.notes[0] == "int_kernels=portable -> portable: chosen explicitly"
    fake = _compile(tiny)  # backend="fake" with the default int_kernels="auto": nothing to choose
    assert not _kinds(fake) and not any(n.startswith("int_kernels") for n in fake.report.notes)
    with pytest.raises(FxqError, match="needs backend='int'"):
        _compile(tiny, int_kernels="onednn")


def test_custom_passes_with_auto_are_taken_as_they_are(tiny):
    passes = default_passes("int", "portable")
    qm = _compile(tiny, backend="int", passes=passes)
    assert _kinds(qm) == {IntLinear}
    assert qm.report.notes[0].startswith("int_kernels=auto: a custom passes= list")
    with pytest.raises(FxqError, match="custom passes"):
        _compile(tiny, backend="int", int_kernels="onednn", passes=passes)


@needs_onednn
def test_auto_skips_the_onednn_passes_when_nothing_was_lowered():
    """keep_float=1 leaves a LayerNorm -> Linear model's only point float: lower_integer lowers
    nothing, which explicit oneDNN kernels refuse but auto takes as a portable graph."""

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.head = torch.nn.LayerNorm(16), torch.nn.Linear(16, 4)

        def forward(self, x):
            return self.head(self.norm(x))

    torch.manual_seed(0)
    calib = [torch.randn(8, 5, 16) for _ in range(2)]
    qm = fxquant.compile(Tiny().eval(), "w8a8", calib_data=calib, progress=False, keep_float=1, backend="int")
    assert qm.report.passes[-1].name == "lower_integer"
    assert qm.report.notes[0].endswith(
        "lower_integer left no integer op, so the oneDNN passes are skipped (portable graph)"
    )


def test_cli_default_is_auto():
    args = _parser().parse_args(["compile", "--model", "vit_tiny_patch16_224", "--backend", "int"])
    assert args.int_kernels == "auto"
    explicit = _parser().parse_args(["compile", "--model", "m", "--backend", "int", "--int-kernels", "portable"])
    assert explicit.int_kernels == "portable"
