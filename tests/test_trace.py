"""fxquant.trace: explicit attention, provenance meta, exact outputs, the user's model untouched."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import fxquant
from fxquant.errors import TraceError
from fxquant.ir.meta import MODULE, ORIGIN
from fxquant.ir.patterns import is_matmul, is_softmax
from tests.tiny import state_hash

VIT_DEPTH = 2
SWIN_BLOCKS = 4  # depths=(2, 2)


def tiny_vit() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=VIT_DEPTH, embed_dim=64, num_heads=2, num_classes=10
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


MODELS = {"vit": (tiny_vit, 32, VIT_DEPTH), "swin": (tiny_swin, 56, SWIN_BLOCKS)}


def image(size: int, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def fused_flags(model: nn.Module) -> dict[str, bool]:
    return {name: m.fused_attn for name, m in model.named_modules() if hasattr(m, "fused_attn")}


def set_fused(model: nn.Module, value: bool) -> None:
    flags = fused_flags(model)
    assert flags, "the model has no timm attention with a fused_attn flag"
    for name in flags:
        model.get_submodule(name).fused_attn = value


def attention_module(path: str) -> str:
    parts = path.split(".")
    return ".".join(parts[: parts.index("attn") + 1])


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("fused", [True, False], ids=["fused_on", "fused_off"])
def test_attention_is_explicit(kind, fused):
    build, size, blocks = MODELS[kind]
    model = build()
    set_fused(model, fused)
    gm = fxquant.trace(model)
    nodes = list(gm.graph.nodes)
    assert not [
        n
        for n in nodes
        if n.target is F.scaled_dot_product_attention
        or getattr(n.target, "__name__", "") == "scaled_dot_product_attention"
        or n.target == "scaled_dot_product_attention"
    ]
    softmaxes = [n for n in nodes if is_softmax(gm, n)]
    matmuls = [n for n in nodes if is_matmul(n)]
    assert len(softmaxes) == blocks
    assert len(matmuls) == 2 * blocks
    # one softmax and its two matmuls per attention module
    per_module: dict[str, list[str]] = {}
    for n in softmaxes + matmuls:  # Swin's softmax is its own nn.Softmax child of the attention
        per_module.setdefault(attention_module(n.meta[MODULE]), []).append(n.name)
    assert len(per_module) == blocks, per_module
    assert all(len(names) == 3 for names in per_module.values()), per_module


def test_keep_fused_attention_keeps_sdpa():
    model = tiny_vit()
    set_fused(model, True)
    gm = fxquant.trace(model, keep_fused_attention=True)
    sdpa = [n for n in gm.graph.nodes if n.target is F.scaled_dot_product_attention]
    assert len(sdpa) == VIT_DEPTH


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_every_node_has_origin_and_module(kind):
    build, _, _ = MODELS[kind]
    gm = fxquant.trace(build())
    for node in gm.graph.nodes:
        assert node.meta.get(ORIGIN) == node.name, node.name  # the traced graph is its own reference
        assert MODULE in node.meta and isinstance(node.meta[MODULE], str), node.name
    by_name = {n.name: n for n in gm.graph.nodes}
    call_modules = [n for n in gm.graph.nodes if n.op == "call_module"]
    assert call_modules and all(n.meta[MODULE] == n.target for n in call_modules)
    # functions called inside a module's forward record that module
    matmul = next(n for n in gm.graph.nodes if is_matmul(n))
    assert matmul.op == "call_function" and matmul.meta[MODULE].endswith("blocks.0.attn"), matmul.meta[MODULE]
    assert by_name["x"].meta[MODULE] == ""


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("fused", [True, False], ids=["fused_on", "fused_off"])
def test_outputs_equal_the_model(kind, fused):
    build, size, _ = MODELS[kind]
    model = build()
    set_fused(model, fused)
    x = image(size)
    gm = fxquant.trace(model)
    with torch.no_grad():
        expected, got = model(x), gm(x)
    if fused:  # SDPA vs explicit softmax: same math, different rounding
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    else:  # the very same ops in the same order
        assert torch.equal(got, expected)


def test_user_model_is_not_modified():
    model = tiny_vit()
    set_fused(model, True)
    model.train()
    before_hash, before_flags = state_hash(model), fused_flags(model)
    modules_before = {name: id(m) for name, m in model.named_modules()}
    gm = fxquant.trace(model)
    assert state_hash(model) == before_hash
    assert fused_flags(model) == before_flags and all(before_flags.values())
    assert model.training  # tracing used eval mode on its own copy
    assert {name: id(m) for name, m in model.named_modules()} == modules_before
    # and the graph owns its own parameters: editing them leaves the model alone
    with torch.no_grad():
        gm.get_submodule("head").weight.add_(1.0)
    assert state_hash(model) == before_hash


class DataDependentGate(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x


class Body(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.gate = DataDependentGate()

    def forward(self, x):
        return self.gate(self.proj(x))


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = Body()
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.body(x))


def test_untraceable_module_is_named():
    with pytest.raises(TraceError) as info:
        fxquant.trace(Untraceable())
    message = str(info.value)
    assert "'body.gate'" in message
    assert "DataDependentGate" in message
    assert "leaf_modules" in message  # says what to do about it


def test_untraceable_module_as_leaf_traces():
    torch.manual_seed(0)
    model = Untraceable().eval()
    gm = fxquant.trace(model, leaf_modules=[DataDependentGate])
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["body.proj", "body.gate", "head"]
    x = torch.randn(3, 8)
    assert torch.equal(gm(x), model(x))


def test_second_required_argument_and_non_module():
    class TwoInputs(nn.Module):
        def forward(self, x, mask):
            return x * mask

    with pytest.raises(TraceError, match="mask"):
        fxquant.trace(TwoInputs())
    with pytest.raises(TraceError, match="torch.nn.Module"):
        fxquant.trace(lambda x: x)
