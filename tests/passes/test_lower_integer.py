"""lower_integer: the fake-quant graph -> int8 codes, integer GEMMs, dyadic requantization.

Before: the tiny ViT / Swin compiled with ``w8a8`` (the fake-quant graph). Expected: every
Linear fed by a per-tensor 8-bit point is an IntLinear with an int8 weight and no float
copy; q @ kT is an IntMatmul; Q/K/V and the scores are requantized straight to their
head-wise points; the integer graph's codes at every point equal the fake-quant graph's or
differ by 1 LSB on a small fraction; what cannot be lowered stays float and is listed.
"""

from __future__ import annotations

import copy

import pytest
import torch

import fxquant
from fxquant.analysis.code_agreement import agreement_summary, code_agreement
from fxquant.analysis.numeric_diff import output_qsnr
from fxquant.errors import FxqError
from fxquant.ir.meta import CODES_OF
from fxquant.ir.patterns import submodule
from fxquant.passes.lower_integer import lower_to_integer
from fxquant.runtime.fake_quant import FakeQuantize, QuantLinear
from fxquant.runtime.int_layernorm import IntLayerNorm
from fxquant.runtime.int_modules import (
    DequantizeCodes,
    IntLinear,
    IntMatmul,
    QuantizeCodes,
)
from fxquant.runtime.log_int_softmax import LisShiftMatmul, LogIntSoftmax

# Codes may differ where the two graphs round a value sitting on a rounding boundary
# differently (float32 sums in another order, bias rounded to int32, ties): rare.
MAX_OFF_BY_ONE_SHARE = 1e-3


@pytest.fixture(scope="module")
def compiled():
    """name -> (tiny model, fake-quant graph, integer graph lowered from a copy of it)."""
    from tests.passes.conftest import tiny_model

    out = {}
    for name in ("vit", "swin"):
        tiny = tiny_model(name)
        fake = fxquant.compile(
            tiny.model,
            "w8a8",
            calib_data=tiny.calib(batches=2, batch_size=4),
            diff_inputs=tiny.inputs(),
            progress=False,
        )
        integer = copy.deepcopy(fake)
        lowering = lower_to_integer(integer, tiny.inputs())
        out[name] = (tiny, fake, integer, lowering)
    return out


@pytest.mark.parametrize("isolated", [True, False], ids=["isolated", "propagated"])
@pytest.mark.parametrize("name", ["vit", "swin"])
def test_integer_codes_match_the_fake_quant_codes(compiled, name, isolated):
    tiny, fake, integer, _ = compiled[name]
    held_out = (tiny.image(4, seed=11),)
    rows = code_agreement(fake, integer, held_out, isolated=isolated)
    labels = {r.label for r in rows}
    assert {"norm1", "attn_q_out", "attn_k_out", "attn_v_input", "attn_kv_out", "mlp_gelu"} <= labels
    assert len(rows) == sum(isinstance(m, FakeQuantize) for m in fake.modules())  # every point compared
    codes, off = sum(r.codes for r in rows), sum(r.off_by_one for r in rows)
    print(f"\n{name} ({'isolated' if isolated else 'propagated'}): {agreement_summary(rows)}")
    assert max(r.worst for r in rows) <= 1
    assert off / codes <= MAX_OFF_BY_ONE_SHARE


@pytest.mark.parametrize("name", ["vit", "swin"])
def test_integer_output_is_as_close_to_fp32_as_the_fake_quant_output(compiled, name):
    tiny, fake, integer, _ = compiled[name]
    held_out = tiny.image(4, seed=12)
    with torch.no_grad():
        reference, fake_out, int_out = tiny.model(held_out), fake(held_out), integer(held_out)
    fake_db, int_db = output_qsnr(reference, fake_out), output_qsnr(reference, int_out)
    assert abs(int_db - fake_db) <= 0.5  # the acceptance: within 0.5 dB
    assert output_qsnr(fake_out, int_out) >= fake_db + 20  # int vs fake far closer than either vs FP32


@pytest.mark.parametrize("name", ["vit", "swin"])
def test_linears_become_integer_with_int8_weights_only(compiled, name):
    _, fake, integer, lowering = compiled[name]
    int_linears = {n: m for n, m in integer.named_modules() if isinstance(m, IntLinear)}
    fake_linears = {n for n, m in fake.named_modules() if isinstance(m, QuantLinear)}
    assert int_linears and set(int_linears) <= fake_linears
    for path, module in int_linears.items():
        assert module.weight_codes.dtype == torch.int8
        assert not any(b.is_floating_point() and b.shape == module.weight_codes.shape for b in module.buffers())
        assert module.weight_codes.equal(fake.get_submodule(path).weight_codes)  # quantized once, reused
    # what stays a float Linear is listed with the reason (Swin's head sits behind a mean pool)
    for path in fake_linears - set(int_linears):
        node = path.replace(".", "_")
        assert any(line.startswith(node) and "float Linear" in line for line in lowering.float_points)


@pytest.mark.parametrize("name", ["vit", "swin"])
def test_attention_scores_and_qkv_are_requantized_straight_to_their_points(compiled, name):
    tiny, _, integer, lowering = compiled[name]
    matmuls = [m for m in integer.modules() if isinstance(m, IntMatmul)]
    assert len(matmuls) == tiny.depth and all(m.requantizes for m in matmuls)  # one q @ kT per block
    groups = [r.split("(")[-1].rstrip(")") for r in lowering.requantized]
    for group in ("attn_q_out", "attn_k_out", "attn_v_input", "attn_kv_out"):
        assert groups.count(group) == tiny.depth
    # every codes-producing node is an int8 tensor in the graph
    with torch.no_grad():
        from fxquant.analysis.numeric_diff import capture_values

        values = capture_values(integer, tiny.inputs())
    for node in integer.graph.nodes:
        if CODES_OF in node.meta:
            assert values[node.name].dtype == torch.int8


def test_per_channel_linear_input_stays_float_and_is_listed(vit):
    """norm2 with one scale per channel cannot feed an int8 GEMM: fc1 stays a float Linear
    on its dequantized weight, between explicit codes -> float nodes; never a wrong answer."""
    qconfig = {
        "extends": "w8a8",
        "norm2": {"bits": 8, "signed": False, "calibration_mode": "channel_wise", "observer_type": "MinmaxObserver"},
    }
    fake = fxquant.compile(vit.model, qconfig, calib_data=vit.calib(), diff_inputs=vit.inputs(), progress=False)
    integer = copy.deepcopy(fake)
    lowering = lower_to_integer(integer, vit.inputs())
    for block in range(vit.depth):
        assert isinstance(integer.get_submodule(f"blocks.{block}.mlp.fc1"), QuantLinear)
        assert isinstance(integer.get_submodule(f"blocks.{block}.mlp.fc2"), IntLinear)
        assert any(
            line.startswith(f"blocks_{block}_mlp_fc1") and "one scale per channel" in line
            for line in lowering.float_points
        )
    assert any(isinstance(m, DequantizeCodes) for m in integer.modules())
    rows = code_agreement(fake, integer, (vit.image(2, seed=3),))
    assert max(r.worst for r in rows) <= 1


def test_compile_backend_int_runs_the_pass_and_reports_equivalence(vit):
    qm = fxquant.compile(
        vit.model,
        "w8a8",
        calib_data=vit.calib(),
        diff_inputs=vit.inputs(),
        backend="int",
        int_kernels="portable",  # the portable graph's passes and notes
        progress=False,
    )
    assert qm.report.backend == "int"
    names = [p.name for p in qm.report.passes]
    assert names[-1] == "lower_integer" and "lower_fake_quant" in names
    assert any(isinstance(m, QuantizeCodes) for m in qm.modules())
    assert not any(isinstance(m, FakeQuantize) for m in qm.modules())
    notes = "\n".join(qm.report.notes)
    assert "integer vs fake-quant codes at" in notes and "integer vs FP32" in notes
    assert any(
        "GELU, residual adds and LayerNorms without a PTF input point" in line for line in qm.report.float_points
    )
    final = qm.report.final
    assert final.output_qsnr_db == pytest.approx(qm.report.pass_record("lower_fake_quant").output_qsnr_db, abs=0.5)
    with torch.no_grad():
        assert qm(vit.image(3, seed=2)).shape == (3, 10)  # another batch size than the diff inputs


def test_backend_int_keep_float_refuses_a_custom_pipeline(vit):
    """keep_float with backend='int' splits the default pipeline before lower_integer (tests/test_debug.py
    checks the result); with a custom passes= list there is no such split point."""
    with pytest.raises(FxqError, match="keep_float with backend='int'"):
        fxquant.compile(
            vit.model,
            "w8a8",
            calib_data=vit.calib(),
            backend="int",
            keep_float=2,
            progress=False,
            passes=fxquant.pipeline.default_passes("int"),
        )


@pytest.mark.parametrize(
    "config",
    [
        {
            "name": "weights_only",
            "attn_qkv": {
                "weight": {
                    "bits": 8,
                    "signed": True,
                    "calibration_mode": "channel_wise",
                    "observer_type": "MinmaxObserver",
                }
            },
        },
        {"name": "nothing"},
    ],
    ids=["weights only", "nothing quantized"],
)
def test_backend_int_without_activation_points_says_so(vit, config):
    """Without an activation point there are no codes to compute on: the error says that and
    names the qconfig, instead of asking for a pass that did run."""
    with pytest.raises(FxqError) as caught:
        fxquant.compile(vit.model, config, calib_data=vit.calib(), backend="int", progress=False)
    message = str(caught.value)
    assert f"qconfig '{config['name']}' quantizes no activation" in message and "backend='fake'" in message
    assert ("only weights" in message) == (config["name"] == "weights_only")
    assert "run lower_fake_quant first" not in message


def test_lower_integer_before_lower_fake_quant_asks_for_it(vit):
    from fxquant.passes import Annotate, Calibrate, InsertObservers, LowerInteger

    passes = [Annotate(), InsertObservers(), Calibrate(), LowerInteger()]
    with pytest.raises(FxqError, match="'lower_integer' requires 'fake_quant', which 'lower_fake_quant' provides"):
        fxquant.compile(vit.model, "w8a8", calib_data=vit.calib(), backend="int", passes=passes, progress=False)


def test_cli_accepts_backend_int():
    from fxquant.cli.app import _parser

    args = _parser().parse_args(["compile", "--model", "vit_tiny_patch16_224", "--backend", "int"])
    assert args.backend == "int"


@pytest.mark.parametrize("name", ["vit", "swin"])
def test_fqvit_preset_lowers_and_agrees(name):
    """FQ-ViT's preset: every LayerNorm with a PTF input point becomes an IntLayerNorm (codes
    in, codes out, no float LayerNorm left on them); Log-Int-Softmax and attn@V become one
    LisShiftMatmul on the V codes; every uniform point still agrees with the fake-quant graph."""
    from tests.passes.conftest import tiny_model

    tiny = tiny_model(name)
    fake = fxquant.compile(
        tiny.model,
        "fqvit_w8a8",
        calib_data=tiny.calib(batches=2, batch_size=4),
        diff_inputs=tiny.inputs(),
        progress=False,
    )
    integer = copy.deepcopy(fake)
    lowering = lower_to_integer(integer, tiny.inputs())
    assert len(lowering.int_matmuls) == tiny.depth
    assert len(lowering.shift_matmuls) == tiny.depth  # Log-Int-Softmax + attn@V by shifts
    assert not any("float matmul" in line for line in lowering.float_points)
    assert not any(isinstance(m, LogIntSoftmax) for m in integer.modules())
    ptf_inputs = [
        n
        for n in fake.graph.nodes
        if n.op == "call_module" and n.target.endswith("_in") and isinstance(fake.get_submodule(n.target), FakeQuantize)
    ]
    assert ptf_inputs and len(lowering.int_layernorms) == len(ptf_inputs)
    int_norms = [m for m in integer.modules() if isinstance(m, IntLayerNorm)]
    assert len(int_norms) == len(ptf_inputs) and all(m.sigma_bits == 8 for m in int_norms)
    float_norms = [n for n in integer.graph.nodes if isinstance(submodule(integer, n), torch.nn.LayerNorm)]
    assert all(
        not (
            n.args[0].op == "call_module"
            and isinstance(submodule(integer, n.args[0]), DequantizeCodes)
            and "_in_" in n.args[0].target
        )
        for n in float_norms
    )
    rows = code_agreement(fake, integer, (tiny.image(2, seed=4),), isolated=True)
    assert max(r.worst for r in rows) <= 1
    assert sum(r.off_by_one for r in rows) / sum(r.codes for r in rows) <= MAX_OFF_BY_ONE_SHARE


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("renormalize", [True, False])
def test_lis_shift_matmul_equals_log_int_softmax_then_float_matmul(bits, renormalize):
    """attn@V by shifts of the V codes gives what the fake-quant graph computes in float:
    LogIntSoftmax's values times the dequantized V, up to float32 rounding."""
    g = torch.Generator().manual_seed(3)
    heads, tokens, dim = 3, 50, 8
    score_scale = torch.tensor([0.05, 0.11, 0.3]).reshape(1, heads, 1, 1)
    scores = torch.randint(-120, 120, (2, heads, tokens, tokens), generator=g).float() * score_scale
    v_codes = torch.randint(-128, 128, (2, heads, tokens, dim), generator=g, dtype=torch.int8)
    v_scale = torch.tensor([0.02, 0.07, 0.01]).reshape(1, heads, 1, 1)
    v_zero = torch.tensor([-5.0, 0.0, 12.0]).reshape(1, heads, 1, 1)
    lis = LogIntSoftmax(score_scale, bits, renormalize=renormalize)
    expected = lis(scores) @ ((v_codes.float() - v_zero) * v_scale)
    shifts = 2**bits - 2 if bits == 4 else 30
    got = LisShiftMatmul(score_scale, bits, renormalize, v_scale, v_zero, shifts)(scores, v_codes)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["vit", "swin"])
def test_scores_read_only_by_softmax_dequantize_in_one_multiply_add(compiled, name):
    """The attention scores' DequantizeCodes, read only by the softmax (through bias/mask
    adds), is fused to codes * m + b: within one float32 rounding of (codes - zp) * s;
    no other point is fused."""
    tiny, fake, integer, lowering = compiled[name]
    fused = [m for m in integer.modules() if isinstance(m, DequantizeCodes) and getattr(m, "fused_affine", False)]
    assert len(fused) == len(lowering.fused_dequantize)
    if name == "vit":
        assert len(fused) == tiny.depth
    else:  # Swin adds its relative-position bias on the way (fused); a shifted window's mask goes through views
        assert 1 <= len(fused) <= len(lowering.int_matmuls)
    assert {m.label for m in fused} == {"attn_kv_out"}
    codes = torch.randint(-128, 128, (2, fused[0].scale.numel(), 6, 6), dtype=torch.int8)
    plain = (codes.float() - fused[0].zero_point) * fused[0].scale * fused[0].post_scale
    torch.testing.assert_close(fused[0](codes), plain, rtol=2**-22, atol=1e-7)
