"""bias_correction: each quantized layer's mean output restored to the float weight's, on the
calibration data, folded into its bias.

Before: the tiny ViT lowered to fake quant with 4-bit weights (a visible rounding shift),
traced -> annotate -> split_qkv -> insert_observers -> calibrate -> lower_fake_quant.
Expected: no key, no change; with ``bias_correction: true`` only biases change (patch
embedding conv included), and for every QuantLinear/QuantConv2d the mean over all
calibration tokens of its output equals the mean of ``x @ W_float^T + b_before`` on the very
inputs it receives in the corrected graph.
"""

from __future__ import annotations

import pytest
import torch

import fxquant
from fxquant.analysis.fallback import keep_in_float
from fxquant.analysis.isolated import only_enabled, quant_point_nodes
from fxquant.errors import QConfigError
from fxquant.infra.contracts import PipelineOrderError
from fxquant.infra.neutrality import output_qsnr
from fxquant.infra.pass_manager import PassManager
from fxquant.passes import (
    Annotate,
    BiasCorrection,
    Calibrate,
    Gptq,
    InsertObservers,
    LowerFakeQuant,
    SplitQkv,
)
from fxquant.quant.qconfig import load_qconfig
from fxquant.runtime.fake_quant import QUANTIZED_WEIGHT_TYPES, weight_input_columns

# float64 means of float32 products over ~100 tokens: a few float32 roundings
MEAN_ATOL = 2e-5


def config(qconfigs, on=True):
    base = qconfigs.gemm_inputs()
    for group in ("patch_embed", "attn_qkv", "attn_proj", "mlp_fc1", "mlp_fc2", "head"):
        base[group] = {"weight": qconfigs.weight(4)}
    return {**base, "bias_correction": on}


def fake_quant(vit, trace, make_ctx, run, qconfig):
    gm = trace(vit.model)
    ctx = make_ctx(gm, qconfig, vit.inputs(), vit.calib())
    gm = run(gm, ctx, Annotate(), SplitQkv(), InsertObservers(), Calibrate(), LowerFakeQuant())
    return gm, ctx


def quantized_layers(gm):
    return {name: m for name, m in gm.named_modules() if isinstance(m, QUANTIZED_WEIGHT_TYPES)}


def test_without_the_key_nothing_changes(vit, trace, make_ctx, run, qconfigs):
    gm, ctx = fake_quant(vit, trace, make_ctx, run, config(qconfigs, False))
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    gm = run(gm, ctx, BiasCorrection())
    assert all(torch.equal(before[k], v) for k, v in gm.state_dict().items())


def test_mean_output_equals_the_float_weights(vit, trace, make_ctx, run, qconfigs):
    gm, ctx = fake_quant(vit, trace, make_ctx, run, config(qconfigs))
    layers = quantized_layers(gm)
    biases = {name: m.bias.detach().clone() for name, m in layers.items()}
    others = {k: v.clone() for k, v in gm.state_dict().items() if not k.endswith(".bias")}
    gm = run(gm, ctx, BiasCorrection())
    assert all(torch.equal(others[k], v) for k, v in gm.state_dict().items() if not k.endswith(".bias"))
    assert any("patch_embed" in name for name in layers)
    inputs = {name: [] for name in layers}
    handles = [
        m.register_forward_pre_hook(lambda mod, args, name=name: inputs[name].append(args[0]))
        for name, m in layers.items()
    ]
    with torch.no_grad():
        for batch in vit.calib():
            gm(batch)
    for h in handles:
        h.remove()
    changed = 0
    for name, module in layers.items():
        cols = torch.cat([weight_input_columns(module, x) for x in inputs[name]]).double()
        out = module.weight.shape[0]
        quantized = cols @ module.weight.reshape(out, -1).double().T + module.bias.double()
        float_ = cols @ module.float_weight.reshape(out, -1).double().T + biases[name].double()
        torch.testing.assert_close(quantized.mean(0), float_.mean(0), rtol=0, atol=MEAN_ATOL)
        changed += not torch.equal(module.bias, biases[name])
    assert changed == len(layers)
    assert sum("bias_correction" in n for n in ctx.report.passes[-1].notes) == len(layers)


def test_must_run_before_gptq():
    with pytest.raises(PipelineOrderError, match="gptq"):
        PassManager(
            [Annotate(), SplitQkv(), InsertObservers(), Calibrate(), LowerFakeQuant(), BiasCorrection(), Gptq()]
        )


@pytest.mark.parametrize("value", [1, "yes", {"on": True}])
def test_bad_value_fails_naming_the_key(value):
    with pytest.raises(QConfigError, match="bias_correction: expected true or false"):
        load_qconfig({"extends": "w8a8", "bias_correction": value})


@pytest.mark.parametrize("backend", ["fake", "int"])
def test_compile_runs_it_after_gptq_on_both_backends(vit, backend):
    qconfig = {"extends": "w4a8", "gptq": True, "bias_correction": True}
    qm = fxquant.compile(vit.model, qconfig, calib_data=vit.calib(), backend=backend)
    names = [p.name for p in qm.report.passes]
    assert names.index("gptq") + 1 == names.index("bias_correction")
    with torch.no_grad():
        assert torch.isfinite(qm(vit.image(2))).all()


def test_points_turned_off_restore_the_uncorrected_bias(vit):
    """fxquant.debug's float stand-ins and toggles undo the correction with the rounding."""
    qconfig = {"extends": "w4a8", "gptq": False, "rotate": False, "bias_correction": True}
    qm = fxquant.compile(vit.model, qconfig, calib_data=vit.calib())
    x = vit.image(2, seed=7)
    with torch.no_grad():
        expected, before = vit.model(x), qm(x)
        with only_enabled(qm, ()):
            assert output_qsnr(expected, qm(x)) >= 100.0
        assert torch.equal(before, qm(x))
        names = [n.name for n in quant_point_nodes(qm)]
        assert output_qsnr(expected, keep_in_float(qm, names)(x)) >= 100.0
