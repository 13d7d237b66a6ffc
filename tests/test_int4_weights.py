"""Packed 4-bit weights: two codes per byte, low nibble first, in memory and in a saved .fxq.

The packing round-trips for every shape (odd ``in_features`` included); a ``w4a8`` integer
graph holds every Linear packed, computes exactly what the same graph with int8 weights
computes (portable and oneDNN kernels), saves and loads packed; a crafted file whose packed
weight does not fit its layer is refused naming the module.
"""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from serialize_craft import craft, read

import fxquant
from fxquant.analysis.weight_bytes import weight_bytes
from fxquant.io.serialize import SerializeError
from fxquant.pipeline import default_passes, has_int4_weights
from fxquant.quant.qconfig import load_qconfig
from fxquant.runtime.int4_weights import PackedWeight, pack_int4, packed_columns, unpack_int4, unpack_weights
from fxquant.runtime.int_modules import IntLinear
from fxquant.runtime.onednn import OnednnLinear, onednn_available

timm = pytest.importorskip("timm")

W4A8_RTN = {"extends": "w4a8", "gptq": False, "rotate": False, "bias_correction": False}
TINY_VIT = dict(img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=2, num_classes=10)
KERNELS = ["portable"] + (["onednn"] if onednn_available() else [])


# ------------------------------------------------------------------------------- the layout
@settings(max_examples=60, deadline=None)
@given(rows=st.integers(0, 9), cols=st.integers(0, 17), seed=st.integers(0, 2**16))
def test_pack_unpack_round_trip(rows, cols, seed):
    codes = torch.randint(-8, 8, (rows, cols), dtype=torch.int8, generator=torch.Generator().manual_seed(seed))
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8 and tuple(packed.shape) == (rows, packed_columns(cols)) == (
        rows,
        (cols + 1) // 2,
    )
    unpacked = unpack_int4(packed, cols)
    assert unpacked.dtype == torch.int8 and unpacked.is_contiguous() and torch.equal(unpacked, codes)


def test_low_nibble_first_and_zero_padding():
    packed = pack_int4(torch.tensor([[-8, 7, -1, 0, 3]], dtype=torch.int8))
    assert packed.tolist() == [[0x78, 0x0F, 0x03]]  # (-8 -> 0x8, 7 -> 0x7), (-1 -> 0xF, 0), (3, padding 0)


def test_pack_refuses_codes_outside_four_bits_and_wrong_shapes():
    with pytest.raises(ValueError, match=r"\[-9, 7\], outside the 4-bit range"):
        pack_int4(torch.tensor([[-9, 7]], dtype=torch.int8))
    with pytest.raises(ValueError, match="2-d int8"):
        pack_int4(torch.zeros(4, dtype=torch.int8))
    with pytest.raises(ValueError, match=r"\(out, 3\) for in_features 5"):
        unpack_int4(torch.zeros(2, 2, dtype=torch.uint8), 5)


def test_only_four_bit_weight_grids_get_the_pass():
    assert has_int4_weights(load_qconfig("w4a8")) and has_int4_weights(load_qconfig("w4a4"))
    assert not has_int4_weights(load_qconfig("w8a8")) and not has_int4_weights(load_qconfig("int8_all"))
    over = load_qconfig({"extends": "w8a8", "overrides": {"blocks.0.*": {"mlp_fc1": {"weight": {"bits": 4}}}}})
    assert has_int4_weights(over)
    names = [p.name for p in default_passes("int", "portable", load_qconfig("w8a8"))]
    assert "pack_int4_weights" not in names
    assert [p.name for p in default_passes("int", "portable", load_qconfig("w4a8"))][-1] == "pack_int4_weights"


# ------------------------------------------------------------------------- compiled graphs
@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", **TINY_VIT).eval()
    generator = torch.Generator().manual_seed(1)
    return model, torch.randn(4, 3, 32, 32, generator=generator), torch.randn(3, 3, 32, 32, generator=generator)


@pytest.fixture(scope="module", params=KERNELS)
def packed_graph(request, tiny):
    model, calib, _ = tiny
    qm = fxquant.compile(model, W4A8_RTN, calib_data=calib, backend="int", int_kernels=request.param, progress=False)
    return request.param, qm


def _unpacked(gm):
    out = copy.deepcopy(gm)
    assert unpack_weights(out) == sum(isinstance(m, PackedWeight) for m in gm.modules())
    assert not any(m.packed for m in out.modules() if isinstance(m, PackedWeight))
    return out


def test_every_integer_linear_is_packed_and_exactly_the_int8_graph(packed_graph, tiny):
    kernels, qm = packed_graph
    linears = [m for m in qm.modules() if isinstance(m, PackedWeight)]
    assert linears and all(m.packed and m.weight_codes is None for m in linears)
    assert isinstance(linears[0], OnednnLinear if kernels == "onednn" else IntLinear)
    for m in linears:
        assert m.weight_packed.dtype == torch.uint8
        assert tuple(m.weight_packed.shape) == (m.out_features, (m.in_features + 1) // 2)
    x = tiny[2]
    with torch.no_grad():
        assert torch.equal(qm(x), _unpacked(qm)(x))
    assert qm.report.pass_record("pack_int4_weights").notes[0].startswith(f"pack_int4_weights: {len(linears)} of")


def test_packed_equals_a_pipeline_without_the_pass(tiny):
    """The pass changes nothing but the storage: the same compile without it gives the same output."""
    model, calib, x = tiny
    config = load_qconfig(W4A8_RTN)
    without = [p for p in default_passes("int", "portable", config) if p.name != "pack_int4_weights"]
    plain = fxquant.compile(model, config, calib_data=calib, backend="int", passes=without, progress=False)
    packed = fxquant.compile(model, config, calib_data=calib, backend="int", int_kernels="portable", progress=False)
    assert not any(m.packed for m in plain.modules() if isinstance(m, PackedWeight))
    with torch.no_grad():
        assert torch.equal(plain(x), packed(x))


def test_weight_bytes_in_the_report(packed_graph):
    _, qm = packed_graph
    measured = weight_bytes(qm)
    linears = [m for m in qm.modules() if isinstance(m, PackedWeight)]
    assert measured.integer == sum(m.out_features * ((m.in_features + 1) // 2) for m in linears)
    assert measured.integer_fp32 == sum(4 * m.out_features * m.in_features for m in linears)
    assert measured.integer_fp32 == 8 * measured.integer  # every in_features of the tiny ViT is even
    assert measured.packed_layers == len(linears) and measured.int8_layers == 0
    assert measured.float_layers == 1  # the patch embedding conv stays a fake-quant layer
    assert qm.report.weight_bytes == measured.to_dict()
    assert any(n.startswith("weight bytes: ") and f"{100 * measured.integer_share:.1f}%" in n for n in qm.report.notes)
    assert fxquant.Report.from_dict(qm.report.to_dict()).weight_bytes == qm.report.weight_bytes


def test_save_and_load_keep_the_weights_packed(packed_graph, tiny, tmp_path):
    _, qm = packed_graph
    path = fxquant.save(qm, tmp_path / "w4a8.fxq")
    document, tensors = read(path)
    linears = [name for name, m in qm.named_modules() if isinstance(m, PackedWeight)]
    for name in linears:
        entry = document["modules"][name]
        assert "weight_codes" not in entry["tensors"] and "weight_codes" in entry["config"]["none_buffers"]
        assert tensors[f"module:{name}:weight_packed"].dtype == torch.uint8
    back = fxquant.load(path)
    assert sorted(name for name, m in back.named_modules() if isinstance(m, PackedWeight) and m.packed) == sorted(
        linears
    )
    with torch.no_grad():
        assert torch.equal(back(tiny[2]), qm(tiny[2]))


@pytest.mark.parametrize("change", ["column", "row", "both", "neither"])
def test_a_packed_weight_that_does_not_fit_its_layer_is_refused(packed_graph, tmp_path, change):
    _, qm = packed_graph
    path = fxquant.save(qm, tmp_path / "w4a8.fxq")
    module = "blocks.1.mlp.fc1"
    key = f"module:{module}:weight_packed"

    def edit_tensors(ts):
        packed = ts[key]
        if change == "column":  # one byte short of ceil(in_features / 2)
            ts[key] = packed[:, :-1]
        elif change == "row":
            ts[key] = packed[:-1]
        elif change == "both":  # an int8 weight beside the packed one
            ts[key.replace(":weight_packed", ":weight_codes")] = unpack_int4(packed, 2 * packed.shape[1])
        else:
            del ts[key]

    def edit(doc):  # the module's own listing of its tensors and empty buffers, consistent with the edit
        entry = doc["modules"][module]
        if change == "both":
            entry["config"]["none_buffers"].remove("weight_codes")
            entry["tensors"]["weight_codes"] = {"key": key.replace(":weight_packed", ":weight_codes"), "kind": "buffer"}
        elif change == "neither":
            del entry["tensors"]["weight_packed"]

    match = {
        "column": rf"{module}.*'weight_packed'.*ceil\(in_features / 2\) = 32 columns \(in_features = 64\)",
        "row": rf"{module}.*'weight_packed'.*dimension 0 must equal out_features",
        "both": rf"{module}.*exactly one of the tensors \['weight_codes', 'weight_packed'\]",
        "neither": rf"{module}.*exactly one of the tensors .*the file has \[\]",
    }[change]
    with pytest.raises(SerializeError, match=match):
        fxquant.load(craft(path, tmp_path / f"{change}.fxq", edit, edit_tensors=edit_tensors))
