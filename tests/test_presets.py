"""Every preset compiles the tiny ViT and Swin, and quantizes every op it says it does.

The graph walk: for each op a preset's header names as quantized, the op's inputs (for a
GEMM or LayerNorm) or its output (for the residual adds and the GELU input) must come from
or go into a quantization point; float ops may only sit between points where the preset
says so.
"""

from __future__ import annotations

import operator
import re

import pytest
import torch
import torch.fx as fx
from torch import nn

import fxquant
from fxquant.ir.patterns import is_matmul, is_scale_transparent, is_softmax
from fxquant.quant.qconfig import load_qconfig
from fxquant.runtime.fake_quant import FakeQuantize, QuantConv2d, QuantLinear
from fxquant.runtime.log_int_softmax import LogIntSoftmax
from tests.passes.conftest import tiny_model
from tests.tiny import images

BLOCK_NORM = re.compile(r"(^|\.)norm[12]$")


def _module(gm, node):
    return gm.get_submodule(str(node.target)) if node.op == "call_module" else None


def _point_before(gm: fx.GraphModule, node: fx.Node):
    """The quantization point (FakeQuantize / LogIntSoftmax) ``node``'s value comes from,
    through views only; None when a float op lies between."""
    while isinstance(node, fx.Node):
        module = _module(gm, node)
        if isinstance(module, (FakeQuantize, LogIntSoftmax)):
            return module
        if not is_scale_transparent(gm, node):
            return None
        node = node.args[0]
    return None


def _point_after(gm: fx.GraphModule, node: fx.Node):
    """The point ``node``'s value goes into, through views only (fuse_scales keeps one point
    where two were joined by views)."""
    while len(node.users) == 1:
        user = next(iter(node.users))
        if isinstance(_module(gm, user), FakeQuantize):
            return _module(gm, user)
        if not is_scale_transparent(gm, user):
            return None
        node = user
    return None


def compiled(name: str, preset: str):
    tiny = tiny_model(name)
    return fxquant.compile(tiny.model, preset, calib_data=images(4, tiny.image_size), progress=False)


@pytest.mark.parametrize("name", ["vit", "swin"])
@pytest.mark.parametrize("preset", fxquant.preset_names())
def test_every_preset_compiles_both_families(name, preset):
    qm = compiled(name, preset)
    out = qm(images(2, tiny_model(name).image_size, seed=5))
    assert torch.isfinite(out).all()
    assert qm.report.passes[-1].output_qsnr_db > 5  # quantized, not broken


def _check_fqvit_block_ops(qm: fx.GraphModule) -> list[str]:
    missing = []
    for node in qm.graph.nodes:
        module = _module(qm, node)
        path = node.meta.get("fxq.module", "")
        if isinstance(module, nn.LayerNorm) and BLOCK_NORM.search(path):
            if _point_before(qm, node.args[0]) is None:
                missing.append(f"{node.name}: LayerNorm input")
            if _point_after(qm, node) is None:
                missing.append(f"{node.name}: LayerNorm output")
        if isinstance(module, (QuantLinear, QuantConv2d)) and ".blocks." in f".{path}":
            if _point_before(qm, node.args[0]) is None:
                missing.append(f"{node.name}: Linear input")
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            missing.append(f"{node.name}: float weight")
        if is_softmax(qm, node):
            missing.append(f"{node.name}: softmax not lowered to LIS")
        if is_matmul(node):
            for arg in node.args[:2]:
                if _point_before(qm, arg) is None:
                    missing.append(f"{node.name}: matmul input {arg.name}")
            if _point_after(qm, node) is None:
                missing.append(f"{node.name}: matmul output")
    return missing


@pytest.mark.parametrize("name", ["vit", "swin"])
@pytest.mark.parametrize("preset", ["fqvit_w8a8", "fqvit_w8a8_attn4", "int8_all"])
def test_fqvit_presets_quantize_every_block_op(name, preset):
    qm = compiled(name, preset)
    assert _check_fqvit_block_ops(qm) == []
    lis = [m for m in qm.modules() if isinstance(m, LogIntSoftmax)]
    assert len(lis) == len(tiny_model(name).heads)
    assert {m.bits for m in lis} == {4 if preset.endswith("attn4") else 8}
    groups = {e["group"] for e in qm.report.passes[-1].nodes if e.get("group")}
    assert {"norm1.input", "norm1", "attn_q_out", "attn_kv_out", "intSoft", "attn_v_out", "mlp_gelu"} <= groups


@pytest.mark.parametrize("name", ["vit", "swin"])
def test_int8_all_also_quantizes_residuals_and_gelu_input(name):
    qm = compiled(name, "int8_all")
    for node in qm.graph.nodes:
        path = node.meta.get("fxq.module", "")
        if (
            node.op == "call_function"
            and node.target in (operator.add, torch.add)
            and re.search(r"(^|\.)blocks\.\d+$", path)
            and all(isinstance(a, fx.Node) for a in node.args[:2])
        ):
            assert _point_after(qm, node) is not None, f"{node.name}: residual add output"
        if isinstance(_module(qm, node), nn.GELU):
            assert _point_before(qm, node.args[0]) is not None, f"{node.name}: GELU input"


def test_a_point_left_float_is_caught_by_the_walk():
    config = load_qconfig("fqvit_w8a8").to_dict()
    del config["mlp_gelu"]
    tiny = tiny_model("vit")
    qm = fxquant.compile(tiny.model, config, calib_data=images(4, tiny.image_size), progress=False)
    missing = _check_fqvit_block_ops(qm)
    assert missing and all("fc2" in m for m in missing)


def test_presets_name_what_they_keep_in_float():
    for preset in ("fqvit_w8a8", "int8_all"):
        from importlib import resources

        header = (resources.files("fxquant.qconfigs") / f"{preset}.yaml").read_text()
        assert "float" in header.split("name:")[0]
