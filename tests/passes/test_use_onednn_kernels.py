"""use_onednn_kernels: the integer graph's Linears on oneDNN's fused int8 kernel.

Before: the tiny ViT / Swin compiled with ``backend="int"`` (portable kernels). Expected
with ``int_kernels="onednn"``: every Linear whose codes can travel as uint8 is an
``OnednnLinear``; fc1 -> GELU -> mlp_gelu is one kernel; the codes at every point still
equal the fake-quant graph's or differ by 1 LSB on a small fraction; the output matches the
portable integer graph; a Linear whose input codes another integer op reads as int8 stays
portable and the report says why; under torch.compile (inductor freezing) the result equals
eager. Skipped where oneDNN's int8 ops are not available (non-x86 builds).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fxquant
from fxquant.analysis.code_agreement import code_agreement
from fxquant.analysis.numeric_diff import output_qsnr
from fxquant.errors import FxqError
from fxquant.infra.contracts import Prop
from fxquant.infra.pass_manager import PassContext, PassManager
from fxquant.ir.meta import CODES_OF
from fxquant.runtime.int_attention import IntAttention, load_kernel
from fxquant.runtime.int_layernorm import IntLayerNorm
from fxquant.runtime.int_lis_attention import IntLisAttention
from fxquant.runtime.int_modules import IntLinear, IntMatmul, QuantizeCodes
from fxquant.runtime.log_int_softmax import LisShiftMatmul
from fxquant.runtime.onednn import OnednnLinear, onednn_available

pytestmark = pytest.mark.skipif(not onednn_available(), reason="oneDNN int8 ops need an x86 torch build")

MAX_OFF_BY_ONE_SHARE = 1e-3  # as for the portable kernels (test_lower_integer)


@pytest.fixture(scope="module")
def graphs():
    """name -> (tiny model, fake graph, portable int graph, oneDNN int graph)."""
    from tests.passes.conftest import tiny_model

    out = {}
    for name, qconfig in (("vit", "w8a8"), ("swin", "w8a8"), ("vit", "fqvit_w8a8"), ("vit", "w6a6")):
        tiny = tiny_model(name)
        kwargs = dict(calib_data=tiny.calib(batches=2, batch_size=4), diff_inputs=tiny.inputs(), progress=False)
        fake = fxquant.compile(tiny.model, qconfig, **kwargs)
        portable = fxquant.compile(tiny.model, qconfig, backend="int", int_kernels="portable", **kwargs)
        onednn = fxquant.compile(tiny.model, qconfig, backend="int", int_kernels="onednn", **kwargs)
        out[(name, qconfig)] = (tiny, fake, portable, onednn)
    return out


def _modules(gm, cls):
    return {name: m for name, m in gm.named_modules() if isinstance(m, cls)}


@pytest.mark.parametrize("key", [("vit", "w8a8"), ("swin", "w8a8")], ids=lambda k: "-".join(k))
def test_every_linear_runs_on_onednn_under_w8a8(graphs, key):
    tiny, _, portable, onednn = graphs[key]
    linears = _modules(onednn, OnednnLinear)
    assert not _modules(onednn, IntLinear)
    assert len(linears) == len(_modules(portable, IntLinear))
    assert all(m.weight_codes.dtype == torch.int8 for m in linears.values())
    gelu = [name for name, m in linears.items() if m.post_op == "gelu"]
    assert len(gelu) == tiny.depth and all(name.endswith("mlp.fc1") for name in gelu)
    # the GELU and its point are gone from the graph: fc1 gives mlp_gelu's codes itself
    assert not any(isinstance(m, torch.nn.GELU) for m in onednn.modules())
    assert not any(n.target is F.gelu for n in onednn.graph.nodes)
    codes_modules = _modules(onednn, QuantizeCodes)
    assert not any(m.label == "mlp_gelu" for m in codes_modules.values())
    assert all(m.codes_dtype == "uint8" for m in codes_modules.values() if m.label in ("norm1", "norm2"))
    matmuls = [m for m in onednn.modules() if isinstance(m, IntMatmul) and m.requantizes]
    if key[0] == "vit" and load_kernel():  # q @ kT, softmax and attn@V: one fused kernel per block (fuse_int_attention)
        assert not matmuls and len(_modules(onednn, IntAttention)) == tiny.depth
    else:  # Swin's biased scores stay unfused (and every attention without a C++ compiler): float32 scales
        assert matmuls and all(m.float_requant for m in matmuls)
    note = next(n for n in onednn.report.notes if n.startswith("use_onednn_kernels"))
    assert f"{len(linears)} of {len(linears)} Linears" in note


@pytest.mark.parametrize("key", [("vit", "w8a8"), ("swin", "w8a8"), ("vit", "fqvit_w8a8")], ids=lambda k: "-".join(k))
def test_codes_match_the_fake_quant_graph(graphs, key):
    tiny, fake, portable, onednn = graphs[key]
    rows = code_agreement(fake, onednn, tiny.inputs(), isolated=True)
    fused = len(_modules(onednn, IntAttention)) + len(_modules(onednn, IntLisAttention))  # score codes stay inside
    assert len(rows) == len(code_agreement(fake, portable, tiny.inputs(), isolated=True)) - fused
    assert max(r.worst for r in rows) <= 1
    assert sum(r.off_by_one for r in rows) <= MAX_OFF_BY_ONE_SHARE * sum(r.codes for r in rows)
    # the uint8 groups are described to the diff with their new offset (-128 + 128 = 0 for unsigned points)
    shifts = {n.meta[CODES_OF][1] for n in onednn.graph.nodes if n.meta.get(CODES_OF)}
    assert shifts <= {0, 128, -128}


@pytest.mark.parametrize("key", [("vit", "w8a8"), ("swin", "w8a8"), ("vit", "fqvit_w8a8")], ids=lambda k: "-".join(k))
def test_output_matches_the_portable_integer_graph(graphs, key):
    tiny, fake, portable, onednn = graphs[key]
    x = tiny.image(2, seed=5)
    with torch.no_grad():
        reference, fake_out, ported, fused = tiny.model(x), fake(x), portable(x), onednn(x)
    assert output_qsnr(ported, fused) > 35.0
    assert abs(output_qsnr(reference, fused) - output_qsnr(reference, fake_out)) < 0.5


def test_fqvit_graph_runs_every_linear_on_onednn(graphs):
    """FQ-ViT: the IntLayerNorms emit uint8 codes for Q/K/V and fc1, LisShiftMatmul reads V as uint8."""
    _, _, portable, onednn = graphs[("vit", "fqvit_w8a8")]
    assert not _modules(onednn, IntLinear)
    assert len(_modules(onednn, OnednnLinear)) == len(_modules(portable, IntLinear))
    norms = _modules(onednn, IntLayerNorm)
    assert norms and all(m.codes_dtype == "uint8" for name, m in norms.items() if "norm1" in name or "norm2" in name)
    assert all(m.v_uint8 for m in _modules(onednn, LisShiftMatmul).values())
    assert all(m.v_zero_point.min() >= 0 for m in _modules(onednn, IntLisAttention).values())  # fused: uint8 V


def test_linears_on_narrow_points_stay_portable_with_a_reason(graphs):
    _, _, portable, onednn = graphs[("vit", "w6a6")]  # 6-bit activation points: not oneDNN's uint8
    kept = [n for n in onednn.report.notes if n.startswith("portable Linear")]
    remaining = _modules(onednn, IntLinear)
    assert remaining and len(kept) == len(remaining)
    assert all("narrower than 8 bits" in n or "stays portable" in n for n in kept)
    for module in remaining.values():  # released as after lower_integer alone
        assert module.weight_scale is None and module.bias is None
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(onednn(x), portable(x))


def test_kernel_matches_its_definition_on_hand_made_tensors():
    torch.manual_seed(0)
    weight = torch.randint(-127, 128, (24, 40), dtype=torch.int8)
    w_scale, bias = torch.rand(24) * 0.01 + 1e-3, torch.randn(24)
    codes = torch.randint(0, 256, (3, 5, 40), dtype=torch.uint8)
    acc = (codes.double() - 131) @ weight.double().t()
    real = acc * 0.02 * w_scale.double() + bias.double()
    for output, post_op in (("float32", "none"), ("uint8", "none"), ("uint8", "gelu"), ("int8", "none")):
        codes_out = output != "float32"
        layer = OnednnLinear(
            weight,
            w_scale,
            bias,
            0.02,
            131,
            output=output,
            output_scale=0.05 if codes_out else 1.0,
            output_zero_point=(7 if output == "uint8" else -3) if codes_out else 0,
            post_op=post_op,
        )
        y = real if post_op == "none" else F.gelu(real)
        got = layer(codes)
        assert got.shape == (3, 5, 24)
        if output == "float32":
            torch.testing.assert_close(got.double(), y, rtol=1e-5, atol=1e-4)
            continue
        low, high = (0, 255) if output == "uint8" else (-128, 127)
        want = torch.clamp(torch.round(y / 0.05) + layer.output_zero_point, low, high)
        assert got.dtype == (torch.uint8 if output == "uint8" else torch.int8)
        assert (got.double() - want).abs().max() <= 1
        assert (got.double() != want).float().mean() < 0.01
        # the fallback (no oneDNN, or compiled without freezing) computes the same
        assert (layer._portable(codes.reshape(-1, 40)).double().reshape(got.shape) - got.double()).abs().max() <= 1


def test_kernel_refuses_int8_codes_and_a_scaled_float_output():
    layer = OnednnLinear(torch.zeros(4, 8, dtype=torch.int8), torch.ones(4), None, 1.0, 128)
    with pytest.raises(TypeError, match="uint8"):
        layer(torch.zeros(2, 8, dtype=torch.int8))
    with pytest.raises(ValueError, match="float output"):
        OnednnLinear(torch.zeros(4, 8, dtype=torch.int8), torch.ones(4), None, 1.0, 128, output_scale=0.5)


def test_compiled_with_freezing_equals_eager(graphs):
    import torch._inductor.config as inductor_config

    tiny, _, _, onednn = graphs[("vit", "w8a8")]
    x = tiny.image(2, seed=3)
    before = inductor_config.freezing
    inductor_config.freezing = True
    try:
        with torch.no_grad():
            eager = onednn(x)
            compiled = torch.compile(onednn)(x)
    finally:
        inductor_config.freezing = before
        torch._dynamo.reset()
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def test_saved_onednn_graph_loads_and_runs(graphs, tmp_path):
    tiny, _, _, onednn = graphs[("vit", "w8a8")]
    path = tmp_path / "onednn.safetensors"
    fxquant.save(onednn, path)
    loaded = fxquant.load(path)
    x = tiny.image(1, seed=9)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), onednn(x), rtol=0, atol=0)
    assert _modules(loaded, OnednnLinear)


def test_bad_int_kernels_arguments_are_refused():
    from tests.passes.conftest import tiny_model

    tiny = tiny_model("vit")
    with pytest.raises(FxqError, match="needs backend='int'"):
        fxquant.compile(tiny.model, "w8a8", calib_data=tiny.calib(), int_kernels="onednn", progress=False)
    with pytest.raises(FxqError, match="int_kernels 'fast'"):
        fxquant.compile(tiny.model, "w8a8", calib_data=tiny.calib(), backend="int", int_kernels="fast", progress=False)


def test_preset_without_linear_points_passes_through():
    """seed_attn quantizes attention only: no Linear to move, the pass says so and the graph runs."""
    from tests.passes.conftest import tiny_model

    tiny = tiny_model("vit")
    kwargs = dict(calib_data=tiny.calib(), diff_inputs=tiny.inputs(), progress=False, backend="int")
    portable = fxquant.compile(tiny.model, "seed_attn", int_kernels="portable", **kwargs)
    onednn = fxquant.compile(tiny.model, "seed_attn", int_kernels="onednn", **kwargs)
    assert not _modules(onednn, OnednnLinear)
    assert any(n.startswith("use_onednn_kernels: 0 of 0 Linears") for n in onednn.report.notes)
    x = tiny.image(2, seed=6)
    with torch.no_grad():
        assert output_qsnr(portable(x), onednn(x)) > 35.0


def test_compiled_without_freezing_falls_back_to_the_same_arithmetic(graphs):
    """Without inductor freezing the packed weight cannot be a constant: the kernel runs the
    same float32 arithmetic on torch._int_mm instead of failing inside inductor."""
    import torch._inductor.config as inductor_config

    tiny, _, _, onednn = graphs[("vit", "w8a8")]
    x = tiny.image(2, seed=3)
    assert not inductor_config.freezing
    try:
        with torch.no_grad():
            eager = onednn(x)
            compiled = torch.compile(onednn)(x)
    finally:
        torch._dynamo.reset()
    assert output_qsnr(eager, compiled) > 40.0


def test_equivalence_notes_describe_the_returned_graph(graphs):
    """compile measures the graph the last integer pass returns (here: the oneDNN graph), once."""
    tiny, fake, _, onednn = graphs[("vit", "w8a8")]
    notes = onednn.report.notes
    assert sum(n.startswith("output QSNR on the diff inputs") for n in notes) == 1
    assert sum(n.startswith("integer vs fake-quant codes") for n in notes) == 2  # isolated, propagated
    line = next(n for n in notes if n.startswith("output QSNR on the diff inputs"))
    with torch.no_grad():
        measured = output_qsnr(fake(*tiny.inputs()), onednn(*tiny.inputs()))
    assert f"integer vs fake-quant {measured:.2f} dB" in line


def test_int_kernels_with_a_custom_pipeline_is_refused():
    from tests.passes.conftest import tiny_model

    tiny = tiny_model("vit")
    with pytest.raises(FxqError, match="custom passes"):
        fxquant.compile(
            tiny.model,
            "w8a8",
            calib_data=tiny.calib(),
            backend="int",
            int_kernels="onednn",
            passes=fxquant.pipeline.default_passes("int"),
            progress=False,
        )


def test_compile_releases_the_setup_tensors_at_the_end(graphs):
    """Every integer pass saw the IntLinears' scales; compile drops them once the pipeline ran."""
    _, _, portable, onednn = graphs[("vit", "w8a8")]
    linears = _modules(portable, IntLinear).values()
    assert linears and all(m.weight_scale is None and m.bias is None for m in linears)
    assert _modules(onednn, OnednnLinear)


def test_graph_lowered_without_release_still_saves(tmp_path):
    """lower_integer run by hand keeps the IntLinears' scales as buffers: the graph saves and loads."""
    from fxquant.passes import LowerInteger
    from tests.passes.conftest import tiny_model

    tiny = tiny_model("vit")
    qm = fxquant.compile(tiny.model, "w8a8", calib_data=tiny.calib(), progress=False)
    ctx = PassContext(qconfig=qm.qconfig, reference=qm, diff_inputs=tiny.inputs(), progress=False)
    qm = PassManager([LowerInteger()], holds=[Prop.CALIBRATED, Prop.FAKE_QUANT]).run(qm, ctx)
    linears = _modules(qm, IntLinear).values()
    assert linears and all(m.weight_scale is not None for m in linears)
    fxquant.save(qm, tmp_path / "q.safetensors")
    loaded = fxquant.load(tmp_path / "q.safetensors")
    x = tiny.image(1, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), qm(x), rtol=0, atol=0)
