"""fxquant.compile refuses calibration data and diff inputs it cannot use, naming the batch,
and leaves the global torch RNG as it found it."""

from __future__ import annotations

import pytest
import timm
import torch
from torch.utils.data import DataLoader

import fxquant
from fxquant.errors import FxqError
from fxquant.ir.trace import image_input
from fxquant.quant.calib_data import iter_batches
from tests.tiny import TINY_VIT, images


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", **TINY_VIT).eval()


def compile_error(model, calib, **kw) -> str:
    with pytest.raises(FxqError) as info:
        fxquant.compile(model, kw.pop("qconfig", "w8a8"), calib_data=calib, progress=False, **kw)
    return str(info.value)


# ------------------------------------------------------------------------- dtypes
PIXELS = (images(4, 32) * 50 + 128).clamp(0, 255)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64, torch.bool])
@pytest.mark.parametrize("form", ["tensor", "list", "pairs"])
def test_integer_and_bool_batches_are_refused_by_name(vit, dtype, form):
    x = PIXELS.to(dtype)
    calib = {"tensor": x, "list": [images(4, 32), x], "pairs": [(images(4, 32), 0), (x, 1)]}[form]
    message = compile_error(vit, calib)
    where = "calib_data is a" if form == "tensor" else "calib_data batch 1 is a"
    assert f"{where} {dtype} tensor of shape (4, 3, 32, 32)" in message
    assert "x.float() / 255" in message and "normalize" in message  # what to do
    assert "normal_kernel" not in message


def test_integer_diff_inputs_are_refused(vit):
    message = compile_error(vit, images(2, 32), diff_inputs=PIXELS[:1].to(torch.uint8))
    assert "diff_inputs 0 is a torch.uint8 tensor" in message


def test_float64_calibration_still_works(vit):
    """Floating dtypes pass as given (only integer and bool are refused)."""
    model = timm.create_model("vit_tiny_patch16_224", **TINY_VIT).eval().double()
    qm = fxquant.compile(model, "w8a8", calib_data=images(2, 32).double(), progress=False, numeric_diff=False)
    assert qm(images(1, 32).double()).dtype == torch.float64


# -------------------------------------------------------------- empty and shapes
@pytest.mark.parametrize("form", ["list", "generator", "dataloader"])
def test_empty_batch_is_refused_naming_its_index(vit, form):
    empty = torch.empty(0, 3, 32, 32)
    batches = [images(2, 32), images(2, 32, seed=2), empty]
    calib = {
        "list": lambda: batches,
        "generator": lambda: (b for b in batches),
        "dataloader": lambda: DataLoader([(b, 0) for b in batches], batch_size=None),
    }[form]()
    message = compile_error(vit, calib)
    assert "calib_data batch 2 holds no images (shape (0, 3, 32, 32))" in message
    assert "IndexError" not in message


@pytest.mark.parametrize(
    "calib, expected",
    [
        ([], "calib_data is empty"),
        ("images/", "calib_data is a str"),
        ({"image": images(2, 32)}, "calib_data is a dict"),
        ([[1, 2]], "calib_data item 0 is a list whose first element is an int"),
        ([(None, 0)], "calib_data item 0 is a tuple whose first element is a NoneType"),
        ([{"label": 1}], "calib_data item 0 is a dict without an 'image'"),
        ([images(2, 32), "x"], "calib_data item 1 is str"),
        ([torch.ones(3)], r"calib_data batch 0 has shape (3,); expected a batch of images"),
    ],
)
def test_calib_data_that_is_not_image_batches(vit, calib, expected):
    assert expected in compile_error(vit, calib)


def test_batches_of_different_image_shapes_are_refused_before_tracing(vit):
    message = compile_error(vit, [images(2, 32), images(2, 32, seed=2), images(2, 48)])
    assert "calib_data batch 2 holds images of shape (3, 48, 48) but batch 0 holds (3, 32, 32)" in message
    assert "Proxy" not in message and "pass '" not in message  # refused before any pass ran


def test_batches_of_different_sizes_but_one_image_shape_are_fine(vit):
    qm = fxquant.compile(vit, "w8a8", calib_data=[images(3, 32), images(1, 32, seed=2)], progress=False)
    assert qm.report.passes


def test_dataloader_batch_of_another_shape_is_refused_as_it_is_read(vit):
    loader = DataLoader([images(2, 32), images(2, 40)], batch_size=None)
    message = compile_error(vit, loader)
    assert "calib_data batch 1 holds images of shape (3, 40, 40) but batch 0 holds (3, 32, 32)" in message


def test_iter_batches_checks_every_batch():
    with pytest.raises(FxqError, match="calib_data batch 1 holds no images"):
        list(iter_batches([images(1, 8), torch.empty(0, 3, 8, 8)]))


# ------------------------------------------------------------------- image size
def test_wrong_image_size_names_expected_and_given(vit):
    message = compile_error(vit, images(2, 64))
    assert "calib_data batch 0 holds images of size 64x64" in message
    assert "model expects 32x32" in message and "img_size=(64, 64)" in message
    assert "Proxy" not in message


def test_wrong_channel_count_is_named(vit):
    message = compile_error(vit, torch.randn(2, 1, 32, 32))
    assert "1-channel images" in message and "expects 3 channels" in message


def test_wrong_diff_input_size_is_named_even_when_calibration_fits(vit):
    message = compile_error(vit, images(2, 32), diff_inputs=images(1, 48))
    assert "diff_inputs 0 holds images of size 48x48" in message and "expects 32x32" in message


def test_non_strict_patch_embedding_needs_a_multiple_of_the_patch():
    model = timm.create_model("vit_tiny_patch16_224", **TINY_VIT, dynamic_img_size=True).eval()
    spec = image_input(model)
    assert spec.size is None and spec.multiple_of == (8, 8)
    message = compile_error(model, images(2, 36))
    assert "size 36x36" in message and "divisible by the patch size 8x8" in message


def test_traced_size_assertion_names_the_shape_not_a_proxy(vit):
    gm = fxquant.trace(vit)
    with pytest.raises(AssertionError) as info:
        gm(images(1, 48))
    assert "Proxy" not in str(info.value)
    assert "Input height (x.shape[2]) doesn't match model (32)" in str(info.value)


# -------------------------------------------------------------------------- RNG
@pytest.mark.parametrize(
    "kwargs",
    [dict(), dict(backend="int"), dict(keep_float=1), dict(qconfig="fqvit_w8a8")],
    ids=["fake", "int", "keep_float", "fqvit"],
)
def test_compile_leaves_the_global_rng_untouched(vit, kwargs):
    kwargs = dict(kwargs)
    qconfig = kwargs.pop("qconfig", "w8a8")
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    fxquant.compile(vit, qconfig, calib_data=images(4, 32), progress=False, **kwargs)
    assert torch.equal(torch.get_rng_state(), before)


def test_compile_does_not_depend_on_the_global_rng(vit):
    torch.manual_seed(1)
    first = fxquant.compile(vit, "w8a8", calib_data=images(4, 32), progress=False)
    torch.manual_seed(2)
    second = fxquant.compile(vit, "w8a8", calib_data=images(4, 32), progress=False)
    x = images(2, 32, seed=5)
    with torch.no_grad():
        assert torch.equal(first(x), second(x))
