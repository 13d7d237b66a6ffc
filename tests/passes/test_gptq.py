"""gptq: the pass, its qconfig key and the sequential runner it gathers H with.

Before: the seeded tiny ViT (tests/tiny.py) compiled with ``w4a8`` (4-bit per-channel
weights). Expected: with ``gptq: true`` the pipeline ends in a ``gptq`` pass that re-rounds
every QuantLinear and the patch-embedding QuantConv2d; each layer's H-weighted weight error
(its notes in the pass record) drops, and the output on held-out images is closer to FP32
than without it, on both backends; group-wise scales run on the fake backend and are refused
by the integer one. The sequential runner reproduces a plain forward exactly when its hooks
change nothing, and a hook's change reaches the later nodes.
"""

from __future__ import annotations

import re

import pytest
import timm
import torch

import fxquant
from fxquant.errors import PassError, QConfigError
from fxquant.io.serial_values import SerializeError
from fxquant.ir.sequential import run_sequential
from fxquant.pipeline import default_passes
from fxquant.quant.qconfig import load_qconfig, qconfig_from_dict
from fxquant.quant.quantizers import dequantize, qsnr_db
from fxquant.quant.recovery_config import GptqConfig
from fxquant.runtime.fake_quant import QuantConv2d, QuantLinear
from tests import tiny

# w4a8 as it shipped before the recovery passes (round-to-nearest, SmoothQuant), and with gptq alone
W4A8_RTN = {"extends": "w4a8", "gptq": False, "rotate": False, "bias_correction": False, "smooth_alpha": 0.5}
W4A8_GPTQ = {**W4A8_RTN, "gptq": True}


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", **tiny.TINY_VIT).eval()
    calib, held_out = tiny.images(16, 32), tiny.images(8, 32, seed=5)
    with torch.no_grad():
        ref = model(held_out)
    return model, calib, held_out, ref


def _compile(model, calib, qconfig, **kw):
    return fxquant.compile(model, qconfig, calib_data=calib, progress=False, **kw)


# ------------------------------------------------------------------------------ qconfig
def test_gptq_key_true_mapping_false_and_round_trip():
    assert qconfig_from_dict(W4A8_RTN).recovery == {}
    assert load_qconfig("w4a8").recovery["gptq"] == GptqConfig()  # the preset ships with it
    assert qconfig_from_dict(W4A8_GPTQ).recovery["gptq"] == GptqConfig()
    custom = qconfig_from_dict({"extends": "w4a8", "gptq": {"group_size": 64, "act_order": False}})
    assert custom.recovery["gptq"] == GptqConfig(damp=0.01, act_order=False, group_size=64, block_size=128)
    assert qconfig_from_dict(custom.to_dict()).recovery == custom.recovery
    off = qconfig_from_dict({**custom.to_dict(), "gptq": False})
    assert "gptq" not in off.recovery


def test_gptq_is_inherited_through_extends(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("extends: w4a8\ngptq: {damp: 0.05}\n")
    child = qconfig_from_dict({"extends": str(base)})
    assert child.recovery["gptq"].damp == 0.05
    assert "gptq" not in qconfig_from_dict({"extends": str(base), "gptq": None}).recovery


@pytest.mark.parametrize(
    "value,message",
    [
        ({"dmp": 0.1}, "gptq.dmp: unknown key; allowed keys: damp, act_order, group_size, block_size"),
        ({"damp": 2}, "gptq.damp: expected a number in \\[0, 1\\]"),
        ({"group_size": 0}, "gptq.group_size: expected a positive integer or null"),
        ({"act_order": "yes"}, "gptq.act_order: expected true or false"),
        ({"block_size": True}, "gptq.block_size: expected a positive integer"),
        ("on", "gptq: expected true, false or a mapping"),
    ],
)
def test_bad_gptq_values_name_the_key(value, message):
    with pytest.raises(QConfigError, match=message):
        qconfig_from_dict({"extends": "w4a8", "gptq": value})


def test_default_passes_add_gptq_only_when_asked():
    names = [p.name for p in default_passes("int", qconfig=qconfig_from_dict(W4A8_GPTQ))]
    assert names.index("gptq") == names.index("lower_log_int_softmax") + 1 < names.index("lower_integer")
    assert "gptq" not in [p.name for p in default_passes("int", qconfig=qconfig_from_dict(W4A8_RTN))]
    assert "gptq" not in [p.name for p in default_passes("fake")]


# ------------------------------------------------------------------------ sequential runner
def test_sequential_runner_equals_a_plain_forward(setup):
    model, calib, held_out, _ = setup
    qm = _compile(model, calib, "w4a8")
    batches = [(held_out[:3],), (held_out[3:],)]
    seen = {}

    def hook(node, per_batch):
        seen[node.name] = [args[0].shape[0] for args, _ in per_batch]

    linears = [n.name for n in qm.graph.nodes if n.op == "call_module" and n.target == "head"]
    outs = run_sequential(qm, batches, {name: hook for name in linears})
    for out, (x,) in zip(outs, batches):
        assert torch.equal(out, qm(x))
    assert seen == {"head": [3, 5]}


def test_sequential_runner_hook_changes_reach_the_later_nodes(setup):
    model, calib, held_out, _ = setup
    qm = _compile(model, calib, "w4a8")

    def zero_head(node, per_batch):
        qm.get_submodule(str(node.target)).weight.zero_()
        qm.get_submodule(str(node.target)).bias.fill_(2.0)

    (out,) = run_sequential(qm, [(held_out,)], {"head": zero_head})
    assert torch.equal(out, torch.full_like(out, 2.0))
    with pytest.raises(Exception, match="hook for a node the graph does not have"):
        run_sequential(qm, [(held_out,)], {"no_such_node": zero_head})


# -------------------------------------------------------------------------------- the pass
def test_gptq_lowers_every_layers_error_and_raises_the_output_qsnr(setup):
    model, calib, held_out, ref = setup
    rtn = _compile(model, calib, W4A8_RTN)
    gptq = _compile(model, calib, W4A8_GPTQ)
    assert [p.name for p in gptq.report.passes][-1] == "gptq"
    layers = {n.target for n in gptq.graph.nodes if n.op == "call_module"} & {
        name for name, m in gptq.named_modules() if isinstance(m, (QuantLinear, QuantConv2d))
    }
    notes = [n for n in gptq.report.notes if n.startswith("gptq ")]
    assert len(notes) == len(layers) and any(n.startswith("gptq patch_embed_proj:") for n in notes)
    for note in notes:  # "gptq <node>: H-weighted weight error <before> -> <after> (...)"
        before, after = (float(v) for v in re.search(r"error (\S+) -> (\S+) ", note).groups())
        assert after < 0.85 * before, note  # random weights, Gaussian inputs: 0.66-0.78 on the wide layers
    for name in layers:
        module = gptq.get_submodule(name)
        assert torch.equal(module.weight, dequantize(module.weight_codes.float(), module.weight_qparams))
        assert not torch.equal(module.weight, rtn.get_submodule(name).weight)
    with torch.no_grad():
        before, after = qsnr_db(ref, rtn(held_out)), qsnr_db(ref, gptq(held_out))
    assert after > before + 1.0, (before, after)


def test_gptq_records_and_integer_backend(setup):
    model, calib, held_out, ref = setup
    fake = _compile(model, calib, W4A8_GPTQ)
    integer = _compile(model, calib, W4A8_GPTQ, backend="int")
    rtn_int = _compile(model, calib, W4A8_RTN, backend="int")
    with torch.no_grad():
        assert qsnr_db(fake(held_out), integer(held_out)) > 25.0
        assert qsnr_db(ref, integer(held_out)) > qsnr_db(ref, rtn_int(held_out)) + 1.0


def test_group_size_runs_on_fake_and_is_refused_by_int_and_save(setup, tmp_path):
    model, calib, held_out, ref = setup
    grouped = {"extends": "w4a8", "gptq": {"group_size": 16}}
    qm = _compile(model, calib, grouped)
    fc1 = qm.get_submodule("blocks.0.mlp.fc1")
    assert fc1.weight_group_size == 16 and len(fc1.weight_group_qparams) == 64 // 16
    with torch.no_grad():
        assert qsnr_db(ref, qm(held_out)) > qsnr_db(ref, _compile(model, calib, W4A8_GPTQ)(held_out))
    with pytest.raises(PassError, match="pass 'gptq' failed: gptq.group_size 16: .*backend='fake' only"):
        _compile(model, calib, grouped, backend="int")
    with pytest.raises(SerializeError, match=r"group-wise weight scales \(gptq.group_size 16\)"):
        fxquant.save(qm, tmp_path / "grouped.fxq")


def test_gptq_before_lower_fake_quant_fails_at_construction(setup):
    model, calib, _, _ = setup
    passes = default_passes("fake", qconfig=qconfig_from_dict(W4A8_GPTQ))
    order = [p.name for p in passes]
    early = passes[: order.index("calibrate") + 1] + [passes[order.index("gptq")]]
    with pytest.raises(PassError, match="pass 'gptq' requires 'fake_quant', which 'lower_fake_quant' provides"):
        _compile(model, calib, W4A8_GPTQ, passes=early)
