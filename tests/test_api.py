"""fxquant.compile end to end on tiny models, and the seed's double-quantization bug found by the diff."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import timm
import torch
import torch.fx as fx
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fxquant
from fxquant.analysis.numeric_diff import capture_values, compare_graph, output_qsnr
from fxquant.api import default_diff_inputs
from fxquant.errors import FxqError, NodeError, PassError
from fxquant.infra.contracts import Prop
from fxquant.infra.pass_manager import PassContext, PassManager
from fxquant.infra.records import Report
from fxquant.passes import LowerFakeQuant
from fxquant.passes.lower_fake_quant import quantize_weight_module
from fxquant.pipeline import default_passes
from fxquant.quant.observers import make_observer
from fxquant.quant.quantizers import dequantize
from fxquant.quant.spec import QuantSpec
from fxquant.runtime.fake_quant import QuantLinear
from tests.tiny import images, state_hash

NEUTRAL_PASSES = [p.name for p in default_passes() if p.neutral]
QKV_LINEARS = {"blocks_0_attn_qkv_q", "blocks_0_attn_qkv_k", "blocks_0_attn_qkv_v"}
QKV_GROUPS = {"attn_q_out", "attn_k_out", "attn_v_input", "attn_qkv.weight", "attn_qkv.output"}


def tiny_vit() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=2, num_classes=10
    ).eval()


def tiny_swin() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "swin_tiny_patch4_window7_224",
        img_size=56,
        embed_dim=32,
        depths=(2, 2),
        num_heads=(2, 4),
        window_size=7,
        num_classes=10,
    ).eval()


def fused_flags(model: nn.Module) -> dict:
    return {name: m.fused_attn for name, m in model.named_modules() if hasattr(m, "fused_attn")}


def without_seconds(report: Report) -> dict:
    data = report.to_dict()
    for record in data["passes"]:
        for key in ("seconds", "diff_seconds", "dump_seconds"):
            record.pop(key)
    return data


def strict_json(text: str):
    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


@dataclass
class Compiled:
    model: nn.Module
    hash_before: str
    flags_before: dict
    calib: torch.Tensor
    qm: fx.GraphModule
    dump_dir: Path | None = None


def _compile(build, size: int, dump_dir: Path | None = None) -> Compiled:
    model = build()
    hash_before, flags_before = state_hash(model), fused_flags(model)
    calib = images(4, size)
    qm = fxquant.compile(model, "w8a8", calib_data=calib, progress=False, dump_dir=dump_dir)
    return Compiled(model, hash_before, flags_before, calib, qm, dump_dir)


@pytest.fixture(scope="module")
def vit_w8a8(tmp_path_factory) -> Compiled:
    return _compile(tiny_vit, 32, tmp_path_factory.mktemp("dump"))


@pytest.fixture(scope="module")
def swin_w8a8() -> Compiled:
    return _compile(tiny_swin, 56)


BOTH = ["vit_w8a8", "swin_w8a8"]


# ------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("which", BOTH)
def test_compile_returns_graph_module_with_report(request, which):
    c: Compiled = request.getfixturevalue(which)
    qm = c.qm
    assert isinstance(qm, fx.GraphModule)
    assert isinstance(qm.report, Report) and qm.qconfig.name == "w8a8"
    assert qm.report.qconfig == "w8a8" and qm.report.backend == "fake"
    assert qm.report.model == type(c.model).__name__
    assert [p.name for p in qm.report.passes] == ["trace"] + [p.name for p in default_passes()]
    x = images(3, c.calib.shape[-1], seed=7)
    with torch.no_grad():
        y, expected = qm(x), c.model(x)
    assert y.shape == expected.shape == (3, 10)
    assert torch.isfinite(y).all()
    # 8-bit points keep ~40 dB each; a few dozen of them in series stay well above 20 dB
    assert output_qsnr(expected, y) > 20.0
    assert qm.report.final.output_qsnr_db > 20.0
    assert qm.report.quant_points(), "no quantization point in the final graph"


@pytest.mark.parametrize("which", BOTH)
def test_user_model_is_unchanged(request, which):
    c: Compiled = request.getfixturevalue(which)
    assert state_hash(c.model) == c.hash_before
    assert fused_flags(c.model) == c.flags_before
    assert not any(isinstance(m, QuantLinear) for m in c.model.modules())


@pytest.mark.parametrize("which", BOTH)
def test_neutral_passes_keep_fp32_output(request, which):
    report = request.getfixturevalue(which).qm.report
    assert set(NEUTRAL_PASSES) == {
        "decompose_attention",
        "linear_modules",
        "annotate",
        "split_qkv",
        "smooth",
        "insert_observers",
        "calibrate",
        "fuse_scales",
    }
    assert report.pass_record("trace").output_qsnr_db >= 100.0  # traced graph vs the eager model
    for name in NEUTRAL_PASSES:
        record = report.pass_record(name)
        assert record.output_qsnr_db >= 100.0, (name, record.output_qsnr_db)
        assert record.nodes and min(n["qsnr_db"] for n in record.nodes) >= 100.0, name
        assert record.first_drop is None, (name, record.first_drop)


def test_report_pairs_split_nodes_with_their_parent(vit_w8a8):
    final = vit_w8a8.qm.report.final
    q = final.node("blocks_0_attn_qkv_q")
    assert q["origin"] == "blocks_0_attn_qkv" and q["group"] == "attn_qkv.weight"
    assert q["module"] == "blocks.0.attn.qkv_q"
    groups = {n["group"] for n in final.nodes if n["group"]}
    assert {
        "attn_qkv.weight",
        "attn_q_out",
        "attn_k_out",
        "attn_v_input",
        "attn_kv_out",
        "norm1",
        "mlp_fc1.weight",
    } <= groups


# ------------------------------------------------------------------ calibration data
def _calib_forms():
    x = images(6, 32, seed=3)
    x[:2] *= 3.0  # the first batch holds the extremes: losing it changes every min-max range
    y = torch.arange(6)
    batches = list(torch.split(x, 2))
    return x, {
        "tensor": lambda: x,
        "list_of_tensors": lambda: batches,
        "list_of_pairs": lambda: [(b, y[:2]) for b in batches],
        "generator": lambda: (b for b in batches),
        "dataloader": lambda: DataLoader(TensorDataset(x, y), batch_size=2, shuffle=False),
    }


@pytest.fixture(scope="module")
def calib_reference():
    x, forms = _calib_forms()
    model = tiny_vit()
    qm = fxquant.compile(model, "seed_attn", calib_data=list(torch.split(x, 2)), progress=False)
    without_first = fxquant.compile(model, "seed_attn", calib_data=list(torch.split(x, 2))[1:], progress=False)
    return model, forms, qm, without_first


@pytest.mark.parametrize("form", ["tensor", "list_of_tensors", "list_of_pairs", "generator", "dataloader"])
def test_calib_data_forms(calib_reference, form):
    model, forms, reference, without_first = calib_reference
    calib = forms[form]()
    qm = fxquant.compile(model, "seed_attn", calib_data=calib, progress=False)
    x = images(2, 32, seed=11)
    with torch.no_grad():
        got, want, other = qm(x), reference(x), without_first(x)
    assert not torch.equal(want, other)  # the check below would notice a lost batch
    assert torch.equal(got, want), form
    assert without_seconds(qm.report) == without_seconds(reference.report)


def test_default_diff_inputs_are_seeded():
    model = tiny_vit()
    calib = images(2, 32)
    first = fxquant.compile(model, "seed_attn", calib_data=calib, progress=False)
    second = fxquant.compile(model, "seed_attn", calib_data=calib, progress=False)
    assert without_seconds(first.report) == without_seconds(second.report)
    (a,), (b,) = default_diff_inputs(calib), default_diff_inputs(calib)
    assert torch.equal(a, b) and a.shape == (1, 3, 32, 32)
    assert not torch.equal(a, calib[:1])
    # an explicit diff input is used as given
    explicit = fxquant.compile(model, "seed_attn", calib_data=calib, progress=False, diff_inputs=a)
    assert without_seconds(explicit.report) == without_seconds(first.report)


# ---------------------------------------------------------------------------- errors
def test_bad_backend():
    with pytest.raises(FxqError, match=r"backend 'tensorrt'.*fake"):
        fxquant.compile(tiny_vit(), "w8a8", calib_data=images(2, 32), backend="tensorrt")


@pytest.mark.parametrize("empty", ["list", "tuple", "generator", "tensor"])
def test_empty_calib_data(empty):
    calib = {"list": [], "tuple": (), "generator": (x for x in []), "tensor": torch.empty(0, 3, 32, 32)}[empty]
    with pytest.raises(FxqError, match="calib_data is empty"):
        fxquant.compile(tiny_vit(), "w8a8", calib_data=calib, progress=False)


@pytest.mark.parametrize(
    "calib, message", [(None, "calib_data must be"), (3, "calib_data must be"), (["not a tensor"], "calib_data item 0")]
)
def test_bad_calib_data(calib, message):
    with pytest.raises(FxqError, match=message):
        fxquant.compile(tiny_vit(), "seed_attn", calib_data=calib, progress=False)


def test_calib_images_of_wrong_shape():
    # checked before tracing, against the patch embedding's img_size: both sizes named
    with pytest.raises(FxqError, match=r"calib_data batch 0 holds images of size 48x48 .* model expects 32x32"):
        fxquant.compile(tiny_vit(), "seed_attn", calib_data=images(2, 48), progress=False)


def test_inputs_a_model_without_patch_embedding_rejects():
    """No img_size to read: the eager run of the model itself names the shapes."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 10)).eval()
    with pytest.raises(FxqError, match=r"rejects inputs of shape \[\(1, 3, 5, 5\)\]"):
        fxquant.compile(model, {}, calib_data=images(2, 5), progress=False)


@pytest.mark.parametrize("model", [lambda x: x, "vit_tiny_patch16_224", None])
def test_model_must_be_a_module(model):
    with pytest.raises(FxqError, match="model must be a torch.nn.Module"):
        fxquant.compile(model, "w8a8", calib_data=images(2, 32))


def test_bad_qconfig_is_fxq_error():
    with pytest.raises(FxqError, match="neither a preset"):
        fxquant.compile(tiny_vit(), "w3a3", calib_data=images(2, 32))


# ------------------------------------------------------------------------------ dumps
def test_dump_dir_has_every_pass(vit_w8a8):
    dump_dir, report = vit_w8a8.dump_dir, vit_w8a8.qm.report
    files = {p.name for p in dump_dir.iterdir()}
    stems = [f"{i:02d}_{record.name}" for i, record in enumerate(report.passes)]
    assert stems[0] == "00_trace"
    assert {f"{stem}{suffix}" for stem in stems for suffix in (".py", ".dot", ".json")} <= files
    assert {p.split(".")[0] for p in files if p[:2].isdigit()} == set(stems)  # no dump of a pass that did not run
    for stem in stems:
        assert "def forward" in (dump_dir / f"{stem}.py").read_text()
        assert (dump_dir / f"{stem}.dot").read_text().startswith("digraph")
        data = strict_json((dump_dir / f"{stem}.json").read_text())
        assert data["pass"] == stem[3:]
        names = {n["id"] for n in data["nodes"]}
        assert data["nodes"] and data["edges"]
        assert all(e["source"] in names and e["target"] in names for e in data["edges"])
    final = strict_json((dump_dir / f"{stems[-1]}.json").read_text())
    assert {n["id"] for n in final["nodes"]} == {n.name for n in vit_w8a8.qm.graph.nodes}
    by_id = {n["id"]: n for n in final["nodes"]}
    assert by_id["blocks_0_attn_qkv_q"]["group"] == "attn_qkv.weight"
    assert by_id["blocks_0_attn_qkv_q"]["origin"] == "blocks_0_attn_qkv"
    assert isinstance(by_id["blocks_0_attn_qkv_q"]["qsnr_db"], float)


# ------------------------------------------------- the seed's bug: weights quantized twice
def _quantize_qkv_weights_again(qm: fx.GraphModule) -> None:
    """What the seed's codebase did: Q/K/V weights go through a second quantizer.

    The stored integer codes (made with per-channel scales) are dequantized with the
    per-tensor scale of a second, coarser quantizer that observed the already quantized
    weight: every weight is multiplied by (second scale / its channel's scale), the range
    explodes and the forward pass is wrong while each quantizer alone looks fine.
    """
    second = QuantSpec(bits=6, signed=True, granularity="layer_wise", observer="minmax")
    for letter in "qkv":
        module = qm.get_submodule(f"blocks.0.attn.qkv_{letter}")
        assert isinstance(module, QuantLinear)
        observer = make_observer(second, name=f"second quantizer of qkv_{letter}")
        observer.update(module.weight)
        module.weight = dequantize(module.weight_codes.float(), observer.compute_qparams())


def test_double_quantized_qkv_is_the_first_drop(vit_w8a8):
    model, calib = vit_w8a8.model, vit_w8a8.calib
    broken = copy.deepcopy(vit_w8a8.qm)
    diff_inputs = default_diff_inputs(calib)  # what compile used
    reference = fxquant.trace(model)
    ref_values = capture_values(reference, diff_inputs)
    ref_output = ref_values[next(n.name for n in reference.graph.nodes if n.op == "output")]

    healthy_nodes, healthy_db, healthy_drop = compare_graph(broken, diff_inputs, ref_values, ref_output)
    assert healthy_db == pytest.approx(vit_w8a8.qm.report.final.output_qsnr_db)
    assert healthy_drop is None or healthy_drop["node"] not in QKV_LINEARS

    _quantize_qkv_weights_again(broken)
    nodes, out_db, drop = compare_graph(broken, diff_inputs, ref_values, ref_output)
    values = capture_values(broken, diff_inputs)
    ratio = values["blocks_0_attn_qkv_q"].abs().max() / ref_values["blocks_0_attn_qkv"].abs().max()
    assert ratio > 3.0  # the seed's range explosion (6x there)
    assert out_db < healthy_db - 10.0

    assert drop is not None
    at_qkv = drop["node"] in QKV_LINEARS or (drop["group"] in QKV_GROUPS and drop["module"].startswith("blocks.0."))
    assert at_qkv, drop
    assert drop["qsnr_db"] < 0.0 and drop["drop_db"] > 10.0
    # every node before it is healthy: nothing upstream is blamed
    first_index = next(i for i, n in enumerate(nodes) if n["node"] == drop["node"])
    assert all(n["qsnr_db"] > 25.0 for n in nodes[:first_index])
    by_name = {n["node"]: n for n in nodes}
    # V feeds the output projection, so w8a8's smoothing rescales it: its FP32 counterpart
    # is the smoothed graph's, which a fresh trace does not have; Q and K pair directly
    paired = [name for name in QKV_LINEARS if name in by_name]
    assert {"blocks_0_attn_qkv_q", "blocks_0_attn_qkv_k"} <= set(paired)
    assert all(by_name[name]["qsnr_db"] < 0.0 for name in paired)


def test_lower_refuses_an_already_quantized_weight(vit_w8a8):
    qm = copy.deepcopy(vit_w8a8.qm)
    ctx = PassContext(
        qconfig=vit_w8a8.qm.qconfig,
        reference=fxquant.trace(vit_w8a8.model),
        diff_inputs=default_diff_inputs(vit_w8a8.calib),
    )
    with pytest.raises(PassError) as info:
        # the contract is met (the graph was calibrated); the pass's own probe finds the quantized weights
        PassManager([LowerFakeQuant()], holds=[Prop.CALIBRATED]).run(qm, ctx)
    message = str(info.value)
    assert "'lower_fake_quant'" in message and "already quantized" in message
    assert info.value.node in {n.name for n in qm.graph.nodes}

    node = next(n for n in qm.graph.nodes if n.name == "blocks_0_attn_qkv_q")
    module = qm.get_submodule(str(node.target))
    weight_before = module.weight.clone()
    with pytest.raises(NodeError, match="already quantized"):
        quantize_weight_module(module, node.meta["fxq.weight"], node.name)
    assert torch.equal(module.weight, weight_before)


def test_numeric_diff_can_be_switched_off():
    from tests.tiny import TINY_VIT

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", **TINY_VIT).eval()
    calib = images(8, 32)
    with_diff = fxquant.compile(model, "w8a8", calib_data=calib, progress=False)
    without = fxquant.compile(model, "w8a8", calib_data=calib, progress=False, numeric_diff=False)
    x = images(2, 32, seed=7)
    assert torch.equal(with_diff(x), without(x))  # the same quantized graph
    assert [p.name for p in without.report.passes] == [p.name for p in with_diff.report.passes]
    assert all(p.output_qsnr_db is None and not p.nodes for p in without.report.passes[1:])
    assert "lower_fake_quant" in without.report.table()
