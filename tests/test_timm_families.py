"""timm's vision-transformer families beyond ViT/DeiT/Swin (issue 17): small random-init models
under ``w8a8``, one per pattern fxquant must handle.

- BEiT/EVA: qkv computed as ``F.linear(x, qkv.weight, cat(q_bias, k_bias, v_bias))``, no k bias;
- Swin-V2: cosine attention with a learned logit scale and a continuous position-bias MLP;
- LeViT: Linear + BatchNorm projections under non-timm-ViT names (``qkv.linear``, ``proj.ln.linear``);
- XCiT: cross-covariance attention, which crashed the ``smooth`` pass;
- DeiT-III: LayerScale at random init, whose class token the head reads is ~1000x smaller than
  the patch tokens (output QSNR was 0 dB);
- a model whose weights mostly stay float is told so first, by the report and by ``fxquant compile``.
"""

from __future__ import annotations

import operator

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import fxquant
from fxquant.cli import main as cli_main
from fxquant.errors import TraceError
from fxquant.infra.pass_manager import Pass
from fxquant.infra.records import Report
from fxquant.ir.meta import POINT
from fxquant.pipeline import default_passes
from fxquant.quant.quantizers import qsnr_db
from fxquant.runtime.fake_quant import FakeQuantize, QuantConv2d, QuantLinear

MIN_DB = 20.0
MODELS = {
    "beit": ("beit_base_patch16_224", dict(depth=1, img_size=32, embed_dim=64, num_heads=2)),
    "eva": ("eva02_tiny_patch14_224", dict(depth=1, img_size=28, embed_dim=64, num_heads=2)),
    "swinv2": ("swinv2_tiny_window8_256", dict(depths=(1,), num_heads=(2,), embed_dim=32, img_size=32, window_size=4)),
    "levit": ("levit_128s", dict(img_size=32, depth=(1, 1, 1))),
    "levit_conv": ("levit_conv_128s", dict(img_size=32, depth=(1, 1, 1))),
    "xcit": ("xcit_nano_12_p16_224", dict(depth=1, img_size=32, embed_dim=64, num_heads=2)),
    "deit3": ("deit3_small_patch16_224", dict(depth=1, img_size=32, embed_dim=64, num_heads=2)),
}


def _compile(key: str, **kwargs):
    name, config = MODELS[key]
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, **config).eval()
    size = config["img_size"]
    calib = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(1))
    diff = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(2))
    qm = fxquant.compile(model, "w8a8", calib_data=calib, diff_inputs=diff, progress=False, model_name=name, **kwargs)
    return model, qm


@pytest.fixture(scope="module")
def compiled():
    cache: dict = {}

    def get(key: str):
        if key not in cache:
            cache[key] = _compile(key)
        return cache[key]

    return get


def _fully_quantized(qm) -> None:
    coverage = qm.report.weight_coverage
    assert coverage["total"] > 0 and coverage["quantized"] == coverage["total"], coverage["float_weights"]
    assert qm.report.final.output_qsnr_db > MIN_DB, qm.report.table()


@pytest.mark.parametrize("key", ["beit", "eva"])
def test_qkv_with_run_time_q_and_v_biases_is_split_and_quantized(compiled, key):
    model, qm = compiled(key)
    _fully_quantized(qm)
    assert qm.report.warnings == []
    assert not any(n.op == "call_function" and n.target in (F.linear, torch._C._nn.linear) for n in qm.graph.nodes)
    parts = {letter: qm.get_submodule(f"blocks.0.attn.qkv_{letter}") for letter in "qkv"}
    assert all(isinstance(part, QuantLinear) for part in parts.values())
    attn = model.blocks[0].attn
    assert parts["k"].bias.eq(0).all()  # no k bias: the zero buffer's rows
    assert parts["q"].bias.equal(attn.q_bias.detach()) and parts["v"].bias.equal(attn.v_bias.detach())


def test_cosine_attention_with_position_bias_mlp(compiled):
    model, qm = compiled("swinv2")
    _fully_quantized(qm)
    roles = {n.meta.get("fxq.role") for n in qm.graph.nodes}
    assert {"attn_q", "attn_k", "attn_scores", "attn_out"} <= roles  # found past the logit-scale multiply
    cpb = [n for n in qm.graph.nodes if n.op == "call_module" and ".cpb_mlp." in str(n.target)]
    linears = [n for n in cpb if isinstance(qm.get_submodule(str(n.target)), QuantLinear)]
    assert linears and all(qm.get_submodule(str(n.target)).point.group == "linear" for n in linears)


@pytest.mark.parametrize("key", ["levit", "levit_conv"])
def test_batchnorm_projections_are_quantized(compiled, key):
    """LeViT's Linear + BatchNorm (and 1x1 Conv + BatchNorm) projections carry none of the
    timm ViT names; each gets the generic ``linear`` weight group."""
    model, qm = compiled(key)
    _fully_quantized(qm)
    layers = (nn.Linear, nn.Conv2d)
    assert qm.report.weight_coverage["quantized"] == sum(
        m.weight.numel() for m in model.modules() if isinstance(m, layers)
    )
    groups = {m.point.group for m in qm.modules() if isinstance(m, (QuantLinear, QuantConv2d))}
    assert "linear" in groups


@pytest.mark.parametrize("key", ["levit", "levit_conv"])
def test_attention_with_a_key_already_d_by_n_is_found(compiled, key):
    """LeViT: ``k = kv.permute(0, 2, 3, 1)`` is already (B, H, D, N), ``q @ k`` then scaled;
    LeViT-conv: ``q.transpose(-2, -1) @ k`` and ``v @ attn.transpose(-2, -1)``. Both are still
    softmax(q @ kT) @ v: Q, K, V, the scores and the attention output are quantized."""
    _, qm = compiled(key)
    roles = [n.meta.get("fxq.role") for n in qm.graph.nodes]
    assert {"attn_q", "attn_k", "attn_scores", "attn_out"} <= set(roles)
    assert qm.report.warnings == []


def test_cross_covariance_attention_compiles_and_skips_the_wrong_smoothing(compiled):
    _, qm = compiled("xcit")
    _fully_quantized(qm)
    notes = qm.report.pass_record("smooth").notes
    assert any("not smoothed" in note and "qkv" in note for note in notes), notes
    assert any("smoothed into" in note for note in notes)  # the norms still are


def test_layerscale_class_token_is_calibrated_on_what_the_head_reads(compiled):
    model, qm = compiled("deit3")
    assert qm.report.final.output_qsnr_db > MIN_DB, qm.report.table()
    (point,) = [
        n
        for n in qm.graph.nodes
        if n.op == "call_module"
        and isinstance(qm.get_submodule(str(n.target)), FakeQuantize)
        and qm.get_submodule(str(n.target)).point.group == "final_norm"
    ]
    selected = point.args[0]
    assert selected.target is operator.getitem and selected.args[0].target == "norm"  # x[:, 0] of the norm
    assert qm.report.first_drop() is None or qm.report.first_drop()["group"] != "head.weight"


def test_first_large_drop_names_the_zero_db_class_token_not_an_earlier_attention_point():
    """The old layout (the final norm's point on every token, put back by a custom pass): the
    class token rounds to zero and the output is 0 dB. An attention point earlier in the graph
    also drops (to ~28 dB, more than 10 dB below its inputs), but the report's first large drop
    is the class token's fall to 0 dB, the drop that the output shows."""
    name, config = MODELS["deit3"]
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, **{**config, "depth": 2}).eval()
    qm = _compile_with_point_on_norm(model)
    assert qm.report.final.output_qsnr_db < 5.0
    drop = qm.report.first_drop()
    nodes = {n.name: n for n in qm.graph.nodes}
    selected = nodes[drop["node"]]
    assert selected.target is operator.getitem and drop["qsnr_db"] < 5.0, drop
    earlier = [r for r in qm.report.final.nodes if r["group"] in ("norm1", "attn_v_input", "attn_v_out", "attn_kv_out")]
    assert any(r["input_qsnr_db"] and min(r["input_qsnr_db"], 40.0) - r["qsnr_db"] > 10.0 for r in earlier)


class _PointOnNorm(Pass):
    """Moves the final_norm point from the class token back onto the norm (the old layout)."""

    name = "point_on_norm"
    neutral = True

    def run(self, gm, ctx):
        for node in gm.graph.nodes:
            point = node.meta.get(POINT)
            if point is not None and point.group == "final_norm" and node.op != "call_module":
                node.args[0].meta[POINT] = node.meta.pop(POINT)
        return gm


def _compile_with_point_on_norm(model):
    passes = default_passes("fake")
    passes.insert([p.name for p in passes].index("annotate") + 1, _PointOnNorm())
    size = MODELS["deit3"][1]["img_size"]
    calib = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(1))
    diff = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(2))
    return fxquant.compile(model, "w8a8", calib_data=calib, diff_inputs=diff, progress=False, passes=passes)


class MostlyFloat(nn.Module):
    """A conv patch embedding, then a large mixing Linear whose weight is computed from the input
    (hypernetwork style: fxquant cannot quantize it, it stays an ``F.linear``), then a head."""

    def __init__(self, width: int = 256):
        super().__init__()
        torch.manual_seed(0)
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, width, kernel_size=8, stride=8)
        self.mix = nn.Parameter(torch.randn(width, width) / width**0.5)
        self.head = nn.Linear(width, 10)
        self.eval()

    def forward(self, x):
        tokens = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        tokens = F.linear(tokens, self.mix * tokens.mean().sigmoid())
        return self.head(tokens.mean(dim=1))


def _under_90_lines(text: str) -> list[str]:
    lines = text.splitlines()
    assert lines[1].startswith("WARNING: only "), text
    return lines


def test_mostly_float_model_says_so_first_in_the_report():
    model = MostlyFloat()
    calib = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    qm = fxquant.compile(model, "w8a8", calib_data=calib, progress=False)
    coverage = qm.report.weight_coverage
    expected = model.patch_embed.proj.weight.numel() + model.head.weight.numel()
    assert (coverage["quantized"], coverage["total"]) == (expected, expected + model.mix.numel())
    (row,) = coverage["float_weights"]
    assert row["elements"] == model.mix.numel() and "not as a module" in row["reason"]
    lines = _under_90_lines(qm.report.table())
    share = 100 * expected / (expected + model.mix.numel())
    assert f"only {share:.1f}% of the Linear/Conv weights are quantized" in lines[1]
    assert "linear()" in lines[2] and str(model.mix.numel()) in lines[2]
    assert Report.from_dict(qm.report.to_dict()).warnings == qm.report.warnings  # report.json keeps it


def test_a_preset_that_leaves_weights_float_on_purpose_is_not_warned():
    model = MostlyFloat()
    calib = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    qm = fxquant.compile(
        model, {"extends": "w8a8", "name": "no_head", "skip": ["head"]}, calib_data=calib, progress=False
    )
    assert any("qconfig gives head.weight no spec" in r["reason"] for r in qm.report.weight_coverage["float_weights"])
    assert qm.report.weight_coverage["by_choice"] == model.head.weight.numel()


def test_fxquant_compile_prints_the_warning_first(monkeypatch, capsys):
    monkeypatch.setattr(timm, "create_model", lambda name, *args, **kwargs: MostlyFloat())
    rc = cli_main(["compile", "--model", "vit_tiny_patch16_224", "--img-size", "32", "--calib", "random:4", "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0
    lines = _under_90_lines(out)
    assert lines[0].startswith("fxquant report: model=vit_tiny_patch16_224")
    assert "stayed float" in lines[1] and lines[2].startswith("  mix (65536 weights): called as linear()")


class ConvReluHead(nn.Module):
    """A conv stem, ReLU and a Linear head: no LayerNorm, GELU or attention for w8a8's
    activation groups to find."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, 16, kernel_size=8, stride=8)
        self.head = nn.Linear(16, 10)
        self.eval()

    def forward(self, x):
        return self.head(torch.relu(self.patch_embed.proj(x)).mean(dim=(2, 3)))


def test_a_model_with_no_activation_point_is_warned():
    """Its weights are quantized, and it says first that no activation is."""
    calib = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    qm = fxquant.compile(ConvReluHead(), "w8a8", calib_data=calib, progress=False)
    assert qm.report.weight_coverage["quantized"] == qm.report.weight_coverage["total"] > 0
    assert not any(isinstance(m, FakeQuantize) for m in qm.modules())
    assert qm.report.table().splitlines()[1].startswith("WARNING: no activation is quantized: w8a8 quantizes")


def test_size_branches_trace_with_the_example_sizes():
    """Twins branches on sizes in Python (``if pad_r > 0 or pad_b > 0``): plain symbolic tracing
    fails there, so compile traces again with the calibration images' sizes. The batch stays
    free (sizes that depend on it are read from the tensors at run time), the image size is
    fixed, and the report says so."""
    torch.manual_seed(0)
    model = timm.create_model(
        "twins_svt_small", depths=(1, 1, 1, 1), img_size=32, embed_dims=(16, 32, 48, 64), num_heads=(1, 2, 3, 4)
    ).eval()
    calib = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    qm = fxquant.compile(model, "w8a8", calib_data=calib, progress=False)
    assert qm.meta["fxq.specialized_input"] == (3, 32, 32)
    assert any("accepts inputs of shape (N, 3, 32, 32) only" in note for note in qm.report.pass_record("trace").notes)
    _fully_quantized(qm)
    for batch in (1, 3):
        x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            assert qsnr_db(model(x), qm(x)) > MIN_DB


def test_convit_after_a_forward_compiles():
    """ConViT's GPSA caches its relative indices on the module in the first forward and then
    branches on their size (``if rel_indices.shape[1] != N``) and expands them by the batch:
    a user's model that has run is traced with the input's sizes, the buffer as a node."""
    torch.manual_seed(0)
    model = timm.create_model("convit_tiny", depth=2, img_size=32, embed_dim=48, num_heads=2).eval()
    calib = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(calib)
    qm = fxquant.compile(model, "w8a8", calib_data=calib, progress=False)
    assert qm.meta["fxq.specialized_input"] == (3, 32, 32)
    _fully_quantized(qm)


class ValueBranch(nn.Module):
    """A branch on a tensor's values, which no trace can turn into a graph."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(3, 8, kernel_size=4, stride=4)

    def forward(self, x):
        x = self.proj(x)
        return x * 2 if x.mean() > 0 else x


class ValueBranchModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = ValueBranch()
        self.head = nn.Linear(8, 10)
        self.eval()

    def forward(self, x):
        return self.head(self.stem(x).mean(dim=(2, 3)))


def test_a_model_neither_trace_handles_is_refused_naming_the_module():
    """Refused with a TraceError naming the module; the retry with the input's sizes says why
    it failed too; no raw exception."""
    calib = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with pytest.raises(TraceError, match=r"module 'stem' \(ValueBranch\).*Traced again with the input's sizes: "):
        fxquant.compile(ValueBranchModel(), "w8a8", calib_data=calib, progress=False)
