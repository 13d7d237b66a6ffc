"""log_sqrt2 and the adaptive log base for the attention probabilities, through both backends.

lower_log_int_softmax turns softmax + a ``log_sqrt2`` / ``log_adaptive`` intSoft point into a
``LogBaseSoftmax`` (integer exp, codes of base 2**(p/k) by integer comparisons); lower_integer
turns it and attn@V into a ``LogBaseShiftMatmul`` (k shift accumulators, the k constants in the
requantization). Expected: the codes equal the rounding of log2(T/e)/step, the shift matmul
equals the fake-quant values times the dequantized V, and on the tiny ViT the integer graph
gives what the fake-quant graph gives.
"""

from __future__ import annotations

import copy
from fractions import Fraction

import pytest
import torch

import fxquant
from fxquant.analysis.code_agreement import code_agreement
from fxquant.analysis.numeric_diff import capture_values
from fxquant.passes import LowerLogIntSoftmax
from fxquant.passes.lower_integer import lower_to_integer
from fxquant.runtime.fake_quant import FakeQuantize
from fxquant.runtime.log_base_softmax import (
    LogBaseShiftMatmul,
    LogBaseSoftmax,
    attention_output_errors,
    base_code_of_ratio,
    base_codes,
    base_values,
)
from fxquant.runtime.log_int_softmax import LogIntSoftmax, lis_codes
from tests.passes.test_lower_log_int_softmax import LOG2, lowered, modules_of


@pytest.mark.parametrize("step", [Fraction(1, 2), Fraction(2, 3), Fraction(3, 4), Fraction(1), Fraction(3, 2)])
def test_integer_code_is_the_rounded_log_ratio(step):
    """m = round(log2(T/e) / step) from integer comparisons, except within 2**-20 of a tie."""
    g = torch.Generator().manual_seed(0)
    e = torch.randint(1, 2**30, (20000,), generator=g, dtype=torch.int64).double()
    total = e * torch.randint(1, 2**12, (20000,), generator=g).double() + torch.randint(0, 2**20, (20000,), generator=g)
    m = base_code_of_ratio(total, e, step)
    exact = torch.log2(total / e) / float(step)
    away = (exact - exact.floor() - 0.5).abs() > 2**-20
    assert torch.equal(m[away], torch.round(exact[away]))


def test_step_one_gives_log_int_softmax_codes():
    g = torch.Generator().manual_seed(1)
    scale = torch.tensor([0.05, 0.2]).reshape(1, 2, 1, 1)
    scores = torch.randint(-100, 100, (3, 2, 40, 40), generator=g).double() * scale
    ours = base_codes(scores, scale, 8, Fraction(1))
    assert (ours == lis_codes(scores, scale, 8)).double().mean() > 0.999


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("step", [Fraction(1, 2), Fraction(2, 3), Fraction(5, 4)])
@pytest.mark.parametrize("renormalize", [True, False])
def test_shift_matmul_equals_fake_values_times_dequantized_v(bits, step, renormalize):
    g = torch.Generator().manual_seed(3)
    heads, tokens, dim = 3, 50, 8
    score_scale = torch.tensor([0.05, 0.11, 0.3]).reshape(1, heads, 1, 1)
    scores = torch.randint(-120, 120, (2, heads, tokens, tokens), generator=g).float() * score_scale
    v_codes = torch.randint(-128, 128, (2, heads, tokens, dim), generator=g, dtype=torch.int8)
    v_scale = torch.tensor([0.02, 0.07, 0.01]).reshape(1, heads, 1, 1)
    v_zero = torch.tensor([-5.0, 0.0, 12.0]).reshape(1, heads, 1, 1)
    softmax = LogBaseSoftmax(score_scale, bits, step, renormalize=renormalize)
    expected = softmax(scores) @ ((v_codes.float() - v_zero) * v_scale)
    shift = min(softmax.max_exponent, 30)
    got = softmax.shift_matmul(v_scale, v_zero, shift)(scores, v_codes)
    assert isinstance(softmax.shift_matmul(v_scale, v_zero, shift), LogBaseShiftMatmul)
    torch.testing.assert_close(got, expected, rtol=2e-5, atol=1e-6)


def test_values_are_shifts_times_k_constants():
    codes = torch.arange(0, 16).double()
    values = base_values(codes, 4, Fraction(2, 3))
    assert values[-1] == 0
    constants = {round(float(v / 2.0 ** torch.floor(torch.log2(v))), 12) for v in values[:-1]}
    assert constants == {1.0, round(2 ** (1 / 3), 12), round(2 ** (2 / 3), 12)}  # k = 3 mantissas


@pytest.mark.parametrize("method", ["log_sqrt2", "log_adaptive"])
def test_lower_log_int_softmax_makes_a_log_base_softmax(vit, trace, make_ctx, run, qconfigs, method):
    gm, ctx = lowered(
        vit, trace, make_ctx, run, {**qconfigs.gemm_inputs(), "intSoft": {**LOG2, "quantization_method": method}}
    )
    gm = run(gm, ctx, LowerLogIntSoftmax())
    found = modules_of(gm, LogBaseSoftmax) + modules_of(gm, LogIntSoftmax)
    assert len(found) == len(vit.heads)
    assert not [m for _, m in modules_of(gm, FakeQuantize) if m.point.group == "intSoft"]
    values = capture_values(gm, vit.inputs())
    for node, module in modules_of(gm, LogBaseSoftmax):
        if method == "log_sqrt2":
            assert module.step == Fraction(1, 2)
        expected = base_values(base_codes(values[node.args[0].name], module.scale, 8, module.step), 8, module.step)
        assert torch.equal(values[node.name], (expected / expected.sum(-1, keepdim=True)).float())
    if method == "log_adaptive":
        notes = ctx.report.pass_record("lower_fake_quant").notes
        assert len([n for n in notes if "log_adaptive chose" in n]) == len(vit.heads)


def test_without_quantized_scores_the_log_sqrt2_quantizer_stays(vit, trace, make_ctx, run, qconfigs):
    config = {**qconfigs.gemm_inputs(), "intSoft": {**LOG2, "quantization_method": "log_sqrt2"}}
    del config["attn_kv_out"]
    gm, ctx = lowered(vit, trace, make_ctx, run, config)
    gm = run(gm, ctx, LowerLogIntSoftmax())
    kept = [m for _, m in modules_of(gm, FakeQuantize) if m.point.group == "intSoft"]
    assert len(kept) == len(vit.heads) and all(m.method == "log_sqrt2" for m in kept)
    notes = ctx.report.pass_record("lower_log_int_softmax").notes
    assert len([n for n in notes if "log_sqrt2 quantizer kept" in n]) == len(vit.heads)


@pytest.mark.parametrize("method, bits", [("log_sqrt2", 8), ("log_adaptive", 4)])
def test_integer_graph_equals_the_fake_quant_graph(method, bits):
    """fqvit_w8a8 with the new probability quantizer: attn@V becomes a LogBaseShiftMatmul in
    every block, nothing is left as a float matmul, and the integer graph's codes and output
    are the fake-quant graph's."""
    from tests.passes.conftest import tiny_model

    tiny = tiny_model("vit")
    config = {"extends": "fqvit_w8a8", "intSoft": {"bits": bits, "quantization_method": method}}
    fake = fxquant.compile(
        tiny.model, config, calib_data=tiny.calib(batches=2, batch_size=4), diff_inputs=tiny.inputs(), progress=False
    )
    softmaxes = [m for m in fake.modules() if isinstance(m, (LogBaseSoftmax, LogIntSoftmax))]
    assert len(softmaxes) == tiny.depth and all(m.bits == bits for m in softmaxes)
    integer = copy.deepcopy(fake)
    lowering = lower_to_integer(integer, tiny.inputs())
    shift_matmuls = [m for m in integer.modules() if isinstance(m, LogBaseShiftMatmul)]
    if method == "log_sqrt2":
        assert len(shift_matmuls) == tiny.depth
    assert len(lowering.shift_matmuls) == tiny.depth
    assert not any("float matmul" in line for line in lowering.float_points)
    rows = code_agreement(fake, integer, (tiny.image(2, seed=4),), isolated=True)
    assert max(r.worst for r in rows) <= 1
    x = tiny.image(3, seed=7)
    with torch.no_grad():
        torch.testing.assert_close(integer(x), fake(x), rtol=1e-4, atol=1e-4)


def test_onednn_kernels_feed_v_as_uint8_codes():
    """int_kernels="onednn": the shift matmul reads V as uint8 codes like LisShiftMatmul, so
    every Linear moves onto oneDNN, and the result is still the fake-quant graph's."""
    from fxquant.runtime.onednn import onednn_available
    from tests.passes.conftest import tiny_model

    if not onednn_available():
        pytest.skip("oneDNN int8 kernels are not available on this CPU")
    tiny = tiny_model("vit")
    config = {"extends": "fqvit_w8a8", "intSoft": {"quantization_method": "log_sqrt2"}}
    kw = dict(calib_data=tiny.calib(batches=2, batch_size=4), diff_inputs=tiny.inputs(), progress=False)
    fake = fxquant.compile(tiny.model, config, **kw)
    onednn = fxquant.compile(tiny.model, config, backend="int", int_kernels="onednn", **kw)
    shift = [m for m in onednn.modules() if isinstance(m, LogBaseShiftMatmul)]
    assert len(shift) == tiny.depth and all(m.v_uint8 for m in shift)
    assert not [n for n in onednn.report.pass_record("use_onednn_kernels").notes if "needs int8" in n]
    x = tiny.image(3, seed=9)
    with torch.no_grad():
        torch.testing.assert_close(onednn(x), fake(x), rtol=1e-4, atol=1e-4)


def test_adaptive_base_is_the_least_attn_v_output_error(vit, trace, make_ctx, run, qconfigs):
    """lower_log_int_softmax chooses each log_adaptive base by the attn@V output it gives on
    the calibration data: the chosen step is the argmin of the errors computed directly."""
    from fxquant.ir.capture import capture_values
    from fxquant.passes.lower_log_int_softmax import _attention_values, _scores_point, _scores_scale
    from fxquant.quant.calib_data import as_batches, iter_batches
    from fxquant.quant.log_quantizers import CANDIDATE_STEPS

    config = {**qconfigs.gemm_inputs(), "intSoft": {**LOG2, "bits": 4, "quantization_method": "log_adaptive"}}
    gm, ctx = lowered(vit, trace, make_ctx, run, config)
    points = [n for n, m in modules_of(gm, FakeQuantize) if m.point.group == "intSoft"]
    captured = [capture_values(gm, (b,)) for b in iter_batches(as_batches(ctx.calib_data))]
    expected = {}
    for node in points:
        scores, v = node.args[0].args[0], _attention_values(gm, node)
        scale = _scores_scale(_scores_point(gm, scores))
        errors = dict.fromkeys(CANDIDATE_STEPS, 0.0)
        for values in captured:
            got = attention_output_errors(values[scores.name], values[v.name], scale, 4, True, CANDIDATE_STEPS)
            errors = {k: errors[k] + got[k] for k in errors}
        expected[str(node.target)] = min(CANDIDATE_STEPS, key=lambda s: (errors[s], -s))
    gm = run(gm, ctx, LowerLogIntSoftmax())
    for target, step in expected.items():
        module = gm.get_submodule(target)
        assert (module.step if isinstance(module, LogBaseSoftmax) else Fraction(1)) == step
    notes = ctx.report.pass_record("lower_log_int_softmax").notes
    assert len([n for n in notes if "on attn@V's output" in n]) == len(points)
