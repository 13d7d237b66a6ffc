"""The numeric diff's cost (issue 18): ``numeric_diff="final"``, the per-node QSNR cache, the
diff's and the dumps' own seconds in the report.

A tiny seeded ViT compiled with w8a8 (smooth, OMSE, the integer backend). Expected:
``"final"`` diffs the last pass only (its record equals the default's last record) and
builds the same graph; the QSNRs ``compare_graph`` reuses from its cache are the numbers it
computes without one, also after a parameter was changed in place; the report times the
diff and the dumps apart from the passes.
"""

from __future__ import annotations

import math

import pytest
import timm
import torch

import fxquant
from fxquant.analysis.numeric_diff import capture_values, compare_graph, fast_qsnr_db
from fxquant.errors import FxqError
from fxquant.quant.quantizers import qsnr_db


def tiny():
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=2, num_classes=10
    ).eval()


def images(n, seed=1):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def compiled():
    torch.set_num_threads(1)
    model, calib = tiny(), images(6)
    every = fxquant.compile(model, "w8a8", calib_data=calib, backend="int", progress=False)
    final = fxquant.compile(model, "w8a8", calib_data=calib, backend="int", progress=False, numeric_diff="final")
    return every, final


def test_final_diffs_only_the_last_pass_and_builds_the_same_graph(compiled):
    every, final = compiled
    names = [r.name for r in final.report.passes]
    # the integer pipeline's last pass: lower_integer, or fuse_int_attention with the default oneDNN kernels
    assert names == [r.name for r in every.report.passes] and names[-1] in ("lower_integer", "fuse_int_attention")
    for record in final.report.passes[1:-1]:
        assert record.nodes == [] and record.output_qsnr_db is None, record.name
    # one run on the diff inputs after a neutral pass that made new origins (split_qkv, smooth): they join
    # the reference as in the default mode, so the final diff pairs the same nodes
    ran = [r.name for r in final.report.passes if r.diff_seconds > 0]
    assert "smooth" in ran and ran[-1] == names[-1] and len(ran) <= 4, ran
    last, reference = final.report.final, every.report.final
    assert last.diff_seconds > 0 and last.nodes == reference.nodes
    assert last.output_qsnr_db == reference.output_qsnr_db and last.first_drop == reference.first_drop
    assert final.code == every.code
    state, other = final.state_dict(), every.state_dict()
    assert state.keys() == other.keys() and all(torch.equal(state[k], other[k]) for k in state)
    x = images(2, seed=7)
    assert torch.equal(final(x), every(x))


def test_report_times_the_diff_apart(compiled, tmp_path):
    every, _ = compiled
    diffed = [r for r in every.report.passes[1:] if r.diff_seconds > 0]
    assert len(diffed) == len(every.report.passes) - 1  # every pass after the trace
    data = every.report.to_dict()
    assert all({"diff_seconds", "dump_seconds"} <= set(p) for p in data["passes"])
    assert "numeric diff" in every.report.table()
    dumped = fxquant.compile(tiny(), "w8a8", calib_data=images(2), progress=False, dump_dir=tmp_path)
    assert all(r.dump_seconds > 0 for r in dumped.report.passes)


@pytest.mark.parametrize("mode", ["last", 2, None])
def test_unknown_mode_is_refused(mode):
    with pytest.raises(FxqError, match="numeric_diff must be True, False, 'all' or 'final'"):
        fxquant.compile(tiny(), "w8a8", calib_data=images(2), progress=False, numeric_diff=mode)


def test_cached_qsnr_is_the_uncached_one_even_after_an_in_place_change():
    gm = fxquant.trace(tiny())
    reference = fxquant.trace(tiny())
    inputs = (images(1, seed=3),)
    ref_values = capture_values(reference, inputs)
    ref_output = ref_values[next(n for n in reference.graph.nodes if n.op == "output").name]
    cache: dict = {}
    first = compare_graph(gm, inputs, ref_values, ref_output, cache=cache)
    assert first == compare_graph(gm, inputs, ref_values, ref_output) and cache
    with torch.no_grad():
        gm.get_submodule("blocks.1.mlp.fc1").weight.mul_(1.5)  # in place: the same tensor objects, new values
        gm.cls_token.add_(0.25)  # a parameter read by a get_attr node: its value *is* the cached tensor
    cached = compare_graph(gm, inputs, ref_values, ref_output, cache=cache)
    uncached = compare_graph(gm, inputs, ref_values, ref_output)
    assert cached == uncached and cached[1] < first[1]


@pytest.mark.parametrize(
    "ref, x",
    [
        (torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0])),
        (torch.tensor([0.0, 0.0]), torch.tensor([0.0, 1e-3])),
        (torch.tensor([1.0, 2.0]), torch.tensor([1.0, math.nan])),
        (torch.tensor([math.inf, 2.0]), torch.tensor([1.0, 2.0])),
        (torch.tensor([1e300, 1e300], dtype=torch.float64), torch.tensor([0.0, 1e300], dtype=torch.float64)),
        (torch.randn(50, generator=torch.Generator().manual_seed(0)), torch.randn(50)),
    ],
)
def test_fast_qsnr_is_qsnr_db(ref, x):
    db, signal = fast_qsnr_db(ref, x)
    assert db == qsnr_db(ref, x)
    if signal is not None:  # the same number again from the known signal
        assert fast_qsnr_db(ref, x, signal)[0] == db
