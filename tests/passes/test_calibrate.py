"""calibrate: run the calibration data through the graph so every observer sees it.

Before: the traced tiny ViT / Swin, annotated, split, with observers. Expected: every observer
updated once per batch with exactly the values the FP32 graph computes there; observers
switched off again; the graph and its output unchanged; bad data refused by name.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import fxquant
from fxquant.analysis.numeric_diff import capture_values
from fxquant.errors import FxqError, PassError
from fxquant.passes import Annotate, Calibrate, DecomposeAttention, InsertObservers, SplitQkv
from fxquant.runtime.fake_quant import observer_nodes

CALIB_QCONFIG = {
    "norm1": {"bits": 8, "observer_type": "MinmaxObserver"},
    "attn_kv_out": {"bits": 8, "observer_type": "MinmaxObserver", "calibration_mode": "head_wise"},
    "head": {"output": {"bits": 8, "observer_type": "MinmaxObserver"}},
}


def observed(tiny, trace, make_ctx, run, qconfig=CALIB_QCONFIG, calib_data=None):
    gm = trace(tiny.model)
    ctx = make_ctx(gm, qconfig, tiny.inputs(), calib_data)
    return run(gm, ctx, Annotate(), SplitQkv(), InsertObservers()), ctx


def updates(gm):
    return [module.observer.num_updates for _, module in observer_nodes(gm)]


def test_fp32_output_unchanged_bit_identical(tiny, trace, make_ctx, run, qconfigs, fp32):
    gm, ctx = observed(tiny, trace, make_ctx, run, qconfigs.all_groups(), tiny.calib(batches=2))
    code, expected = gm.code, fp32.forward(gm, ctx.diff_inputs)

    gm = run(gm, ctx, Calibrate())

    assert gm.code == code
    assert fp32.forward(gm, ctx.diff_inputs).equal(expected)
    assert (
        ctx.report.pass_record("calibrate").output_qsnr_db == ctx.report.pass_record("insert_observers").output_qsnr_db
    )
    assert all(count == 2 for count in updates(gm))
    assert not any(module.observing for _, module in observer_nodes(gm))  # diff inputs are not calibration


def test_observers_hold_the_fp32_range_of_their_op(vit, trace, make_ctx, run):
    batches = vit.calib(batches=3)
    gm, ctx = observed(vit, trace, make_ctx, run, calib_data=batches)
    # what each observed op computes, captured with the observers idle
    per_batch = [capture_values(gm, (batch,)) for batch in batches]
    assert all(count == 0 for count in updates(gm))

    gm = run(gm, ctx, Calibrate())

    for node, module in observer_nodes(gm):
        values = torch.stack([v[node.args[0].name] for v in per_batch])
        if module.point.spec.granularity == "layer_wise":
            assert module.observer.min.item() == values.min().item()
            assert module.observer.max.item() == values.max().item()
        else:  # head_wise: (batches, B, heads, N, N), one range per head
            per_head = values.transpose(0, 2).reshape(module.point.num_groups, -1)
            assert module.observer.min.equal(per_head.amin(1)) and module.observer.max.equal(per_head.amax(1))


def _tensors(images):
    return [images[:4], images[4:7], images[7:]]


def _pairs(images):
    return [(images[:5], torch.zeros(5, dtype=torch.long)), (images[5:], torch.ones(5, dtype=torch.long))]


def _loader(images):
    return DataLoader(TensorDataset(images, torch.arange(len(images))), batch_size=4)


def _image_dicts(images):
    return [{"image": images[:6]}, {"image": images[6:]}]


def _one_tensor(images):  # N images at once: split into batches of 8 as compile() does
    return images


@pytest.mark.parametrize(
    "make_data, batches",
    [(_tensors, 3), (_pairs, 2), (_loader, 3), (_image_dicts, 2), (_one_tensor, math.ceil(10 / 8))],
)
def test_one_update_per_batch(vit, trace, make_ctx, run, make_data, batches):
    gm, ctx = observed(vit, trace, make_ctx, run, calib_data=make_data(vit.image(10, seed=3)))

    gm = run(gm, ctx, Calibrate())

    assert updates(gm) == [batches] * len(observer_nodes(gm)) and len(updates(gm)) == 2 * vit.depth + 1


def test_compile_accepts_a_tensor_and_calibrates_each_batch(vit):
    images = vit.image(20, seed=4)
    passes = [DecomposeAttention(), Annotate(), SplitQkv(), InsertObservers(), Calibrate()]

    gm = fxquant.compile(vit.model, CALIB_QCONFIG, calib_data=images, passes=passes, progress=False)

    assert updates(gm) == [math.ceil(20 / 8)] * (2 * vit.depth + 1)
    assert gm.report.pass_record("calibrate").output_qsnr_db == float("inf")


@pytest.mark.parametrize(
    "calib_data, message",
    [
        ([], "calib_data yielded no batches"),
        (iter(()), "calib_data yielded no batches"),
        (None, "calibration needs calib_data"),
    ],
)
def test_missing_calibration_data_is_an_error(vit, trace, make_ctx, run, calib_data, message):
    gm, ctx = observed(vit, trace, make_ctx, run, calib_data=calib_data)

    with pytest.raises(PassError, match=rf"pass 'calibrate' failed: {message}"):
        run(gm, ctx, Calibrate())
    assert not any(module.observing for _, module in observer_nodes(gm))


@pytest.mark.parametrize("calib_data", [[], torch.zeros(0, 3, 32, 32)])
def test_compile_refuses_empty_calibration_data(vit, calib_data):
    with pytest.raises(FxqError, match="calib_data is empty"):
        fxquant.compile(vit.model, CALIB_QCONFIG, calib_data=calib_data, progress=False)


def test_nan_in_calibration_data_names_the_node(vit, trace, make_ctx, run):
    images = vit.image(4, seed=5)
    images[1, 0, 3, 3] = float("nan")
    gm, ctx = observed(vit, trace, make_ctx, run, calib_data=[vit.image(2), images])
    first_observed = observer_nodes(gm)[0][0].args[0].name  # NaN spreads from the patch embedding on

    with pytest.raises(
        PassError,
        match=rf"pass 'calibrate' failed: node '{first_observed}': "
        rf"observer '{first_observed} \(norm1\)': calibration batch 1 .* non-finite",
    ) as info:
        run(gm, ctx, Calibrate())
    assert first_observed == "blocks_0_norm1" and info.value.pass_name == "calibrate"
    assert info.value.node == first_observed
    assert not any(module.observing for _, module in observer_nodes(gm))


def test_bad_item_is_refused_with_its_index(vit, trace, make_ctx, run):
    gm, ctx = observed(vit, trace, make_ctx, run, calib_data=[vit.image(2), "cat.jpg"])

    with pytest.raises(PassError, match=r"calib_data item 1 is str; expected a tensor"):
        run(gm, ctx, Calibrate())
