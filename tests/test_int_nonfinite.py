"""NaN and inf through the integer graph (``fxquant.lowering.nonfinite``): NaN exactly where FP32 is NaN.

For each preset (w8a8, fqvit_w8a8, int8_all) and kernel set (portable; oneDNN with the
fused attention where it builds), on the tiny ViT and the tiny Swin: a batch of three
images with a NaN, a +inf or a -inf pixel in one sample gives NaN in exactly the samples
the FP32 model gives NaN in (that one), and the other samples' outputs are bit-identical to
the outputs of the same batch without the bad pixel, and to the graph without its guard.
"""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch
import torch.fx as fx

import fxquant
from fxquant.lowering.nonfinite import GUARD, guard_nodes, guard_nonfinite, strip_nonfinite_guard
from fxquant.runtime.int_modules import DequantizeCodes, QuantizeCodes
from fxquant.runtime.onednn import onednn_available

PRESETS = ("w8a8", "fqvit_w8a8", "int8_all")
KERNELS = ("portable", "onednn")
CASES = {"nan in sample 0": (0, math.nan), "+inf in sample 0": (0, math.inf), "-inf in sample 2": (2, -math.inf)}

_GRAPHS: dict = {}


def _tiny(name: str):
    from tests.passes.conftest import tiny_model

    return tiny_model(name)


def _integer_graph(name: str, preset: str, kernels: str) -> fx.GraphModule:
    key = (name, preset, kernels)
    if key not in _GRAPHS:
        tiny = _tiny(name)
        _GRAPHS[key] = fxquant.compile(
            tiny.model,
            preset,
            calib_data=tiny.calib(batches=1, batch_size=4),
            backend="int",
            int_kernels=kernels,
            progress=False,
            numeric_diff=False,
        )
    return _GRAPHS[key]


def _bad_batch(tiny, sample: int, value: float) -> tuple[torch.Tensor, torch.Tensor]:
    clean = tiny.image(3, seed=7)
    bad = clean.clone()
    bad[sample, 1, 5, 9] = value
    return clean, bad


class _KeepModules(fx.Tracer):
    def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
        return isinstance(m, (QuantizeCodes, DequantizeCodes)) or super().is_leaf_module(m, qualname)


def _trace(module: torch.nn.Module) -> fx.GraphModule:
    return fx.GraphModule(module, _KeepModules().trace(module))


def _nan_samples(out: torch.Tensor) -> list[bool]:
    return torch.isnan(out).reshape(out.shape[0], -1).any(dim=1).tolist()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("name", ["vit", "swin"])
def test_nonfinite_samples_are_nan_where_fp32_is(name, preset, kernels, case):
    if kernels == "onednn" and not onednn_available():
        pytest.skip("oneDNN's int8 kernels are not available on this machine")
    tiny = _tiny(name)
    qm = _integer_graph(name, preset, kernels)
    sample, value = CASES[case]
    clean, bad = _bad_batch(tiny, sample, value)
    with torch.no_grad():
        reference = tiny.model(bad)
        got, before = qm(bad), qm(clean)
        unguarded = copy.deepcopy(qm)
        strip_nonfinite_guard(unguarded)
        unguarded_clean = unguarded(clean)
    expected = [i == sample for i in range(3)]
    assert _nan_samples(reference) == expected  # what FP32 does with one bad pixel
    assert _nan_samples(got) == expected
    assert torch.isnan(got[sample]).all()  # every output of the sample, as in FP32
    finite = [i for i in range(3) if i != sample]
    assert torch.isfinite(got[finite]).all()
    assert torch.equal(got[finite], before[finite])  # the other samples exactly as without the bad pixel
    assert torch.equal(before, unguarded_clean)  # and the guard changes nothing on finite inputs


@pytest.mark.parametrize("kernels", KERNELS)
def test_the_guard_checks_the_float_tensors_that_become_codes(kernels):
    """w8a8: the residual stream is float, so every LayerNorm output is checked before its
    codes; fqvit_w8a8 and int8_all: only the patch embedding's output (everything after it
    is computed from codes)."""
    if kernels == "onednn" and not onednn_available():
        pytest.skip("oneDNN's int8 kernels are not available on this machine")
    notes = {
        preset: next(
            n for n in _integer_graph("vit", preset, kernels).report.notes if n.startswith("non-finite guard:")
        )
        for preset in PRESETS
    }
    # the final norm's point sits on the class token the head reads (x[:, 0] of the norm)
    assert re.search(
        r"in 5 float tensor\(s\) before they become codes \(blocks_0_norm1, blocks_0_norm2, blocks_1_norm1, "
        r"blocks_1_norm2, getitem_\d+\)",
        notes["w8a8"],
    ), notes["w8a8"]
    for preset in ("fqvit_w8a8", "int8_all"):
        assert "in 1 float tensor(s) before they become codes (patch_embed_proj)" in notes[preset]


def test_strip_removes_every_guard_node_and_guarding_again_restores_them():
    tiny = _tiny("vit")
    qm = copy.deepcopy(_integer_graph("vit", "w8a8", "portable"))
    count = len(guard_nodes(qm))
    assert count > 0 and all(n.meta[GUARD] in ("check", "poison") for n in guard_nodes(qm))
    assert strip_nonfinite_guard(qm) == count and not guard_nodes(qm)
    assert len(guard_nonfinite(qm, tiny.inputs())) == 5
    assert len(guard_nodes(qm)) == count
    assert len(guard_nonfinite(qm, tiny.inputs())) == 5 and len(guard_nodes(qm)) == count  # replaced, not doubled


class _Windows(torch.nn.Module):
    """(B, 4, 8) -> two windows per sample, (B * 2, 2, 8), batch-major -> codes -> back -> mean;
    and a tensor without a batch dimension (a (3, 8) slice of a parameter plus the input's
    first row of sample 0) that becomes codes too."""

    def __init__(self):
        super().__init__()
        scale, zero = torch.tensor(0.05), torch.tensor(0.0)
        self.codes, self.dequant = QuantizeCodes("w", scale, zero, -128, 127), DequantizeCodes("w", scale, zero)
        self.other_codes = QuantizeCodes("c", scale, zero, -128, 127)
        self.other_dequant = DequantizeCodes("c", scale, zero)
        self.register_buffer("table", torch.linspace(-1, 1, 24).reshape(3, 8))

    def forward(self, x):
        windows = x.reshape(x.shape[0] * 2, 2, 8)
        back = self.dequant(self.codes(windows)).reshape(x.shape[0], 4, 8)
        shared = self.other_dequant(self.other_codes(self.table + x[0, 0]))
        return back.mean(dim=(1, 2)) + shared.sum()


def test_windows_of_a_sample_flag_that_sample_and_a_shared_tensor_flags_the_batch():
    gm = _trace(_Windows())
    x = torch.randn(3, 4, 8, generator=torch.Generator().manual_seed(0))
    assert len(guard_nonfinite(gm, (x[:1],))) == 2  # shapes learnt at batch 1, run at batch 3
    before = gm(x)
    assert torch.isfinite(before).all()
    bad = x.clone()
    bad[1, 3, 2] = math.inf  # the second window of sample 1
    got = gm(bad)
    assert _nan_samples(got.reshape(3, 1)) == [False, True, False]
    assert torch.equal(got[[0, 2]], before[[0, 2]])
    bad = x.clone()
    bad[0, 0, 4] = math.nan  # reaches the tensor shared by the batch as well
    assert torch.isnan(gm(bad)).all()


def test_a_graph_without_tensors_that_can_be_lost_gets_no_guard():
    class OnlyCodes(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.dequant = DequantizeCodes("p", torch.tensor(0.1), torch.tensor(0.0))

        def forward(self, codes):
            return self.dequant(codes) * 2

    gm = _trace(OnlyCodes())
    assert guard_nonfinite(gm, (torch.zeros(2, 4, dtype=torch.int8),)) == [] and not guard_nodes(gm)


def test_a_guarded_graph_saves_and_loads_with_its_guard(tmp_path):
    tiny = _tiny("vit")
    qm = _integer_graph("vit", "w8a8", "portable")
    path = fxquant.save(qm, tmp_path / "q.safetensors")
    loaded = fxquant.load(path)
    assert len(guard_nodes(loaded)) == len(guard_nodes(qm))
    clean, bad = _bad_batch(tiny, 0, math.nan)
    with torch.no_grad():
        assert _nan_samples(loaded(bad)) == [True, False, False]
        assert torch.equal(loaded(clean), qm(clean))
