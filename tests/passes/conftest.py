"""Shared fixtures of the pass tests: tiny seeded models, PassContext building, qconfigs.

Every pass test follows TVM relax's shape: build a small *Before* graph (``fxquant.trace``
of a tiny timm ViT or Swin, or a hand-made module), run the passes that must come first,
run the pass under test through a ``PassManager`` with the ``NumericDiff`` instrument, then
check the *Expected* structure (nodes, modules, ``fxq.*`` meta) and the numerics.
"""

from __future__ import annotations

import copy
import operator
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import pytest
import timm
import torch
import torch.fx as fx

import fxquant
from fxquant.analysis.instruments import NumericDiff
from fxquant.infra.pass_manager import Pass, PassContext, PassManager
from fxquant.infra.records import Report
from fxquant.quant.qconfig import ACTIVATION_GROUPS, LINEAR_GROUPS, load_qconfig

FLOAT32_EPS = torch.finfo(torch.float32).eps
# A pass that only reorders float32 arithmetic (SDPA -> explicit ops, a GEMM on a column
# slice) may change each dot product / softmax sum of length <= 64 by about one rounding
# per term: allow that many ulps of the output's magnitude, nothing more.
REORDER_ULPS = 64


@dataclass
class TinyModel:
    """A tiny timm model with what the tests need to know about it."""

    name: str
    model: torch.nn.Module
    image_size: int
    depth: int  # transformer blocks in all
    heads: dict  # attention module path -> number of heads
    head_dim: int

    def image(self, n: int = 1, seed: int = 0) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return torch.randn(n, 3, self.image_size, self.image_size, generator=generator)

    def inputs(self, seed: int = 0) -> tuple:
        return (self.image(1, seed),)

    def calib(self, batches: int = 2, batch_size: int = 2, seed: int = 1) -> list:
        return [self.image(batch_size, seed + i) for i in range(batches)]


def _vit() -> TinyModel:
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=2, num_classes=10
    ).eval()
    return TinyModel("vit", model, 32, 2, {f"blocks.{i}.attn": 2 for i in range(2)}, 32)


def _swin() -> TinyModel:
    torch.manual_seed(0)
    model = timm.create_model(
        "swin_tiny_patch4_window7_224",
        img_size=56,
        embed_dim=32,
        depths=(2, 2),
        num_heads=(2, 4),
        window_size=7,
        num_classes=10,
    ).eval()
    heads = {f"layers.{s}.blocks.{b}.attn": h for s, h in enumerate((2, 4)) for b in range(2)}
    return TinyModel("swin", model, 56, 4, heads, 16)  # 32/2 and 64/4 channels per head


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    """Tensors here are tiny: a second OpenMP thread only adds synchronisation, and on a busy
    2-core machine its spinning makes each op 5-10x slower. Restored after each module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


_MODELS: dict[str, TinyModel] = {}


def tiny_model(name: str) -> TinyModel:
    """Built once per session; passes and ``fxquant.trace`` never modify the user's model."""
    if name not in _MODELS:
        _MODELS[name] = {"vit": _vit, "swin": _swin}[name]()
    return _MODELS[name]


@pytest.fixture
def vit() -> TinyModel:
    return tiny_model("vit")


@pytest.fixture
def swin() -> TinyModel:
    return tiny_model("swin")


@pytest.fixture(params=["vit", "swin"])
def tiny(request) -> TinyModel:
    """The tiny ViT, then the tiny Swin."""
    return tiny_model(request.param)


# ---------------------------------------------------------------------------- qconfigs
def act_spec(bits: int = 8, **extra) -> dict:
    return {"bits": bits, "signed": True, "observer_type": "MinmaxObserver", **extra}


def weight_spec(bits: int = 8, **extra) -> dict:
    return {
        "bits": bits,
        "signed": True,
        "calibration_mode": "channel_wise",
        "observer_type": "MinmaxObserver",
        **extra,
    }


def all_groups_qconfig(bits: int = 8) -> dict:
    """Every group enabled: weights per channel, outputs and activations per tensor, min-max."""
    config: dict = {group: {"weight": weight_spec(bits), "output": act_spec(bits)} for group in LINEAR_GROUPS}
    config.update({group: act_spec(bits) for group in ACTIVATION_GROUPS})
    return config


def gemm_inputs_qconfig(bits: int = 8) -> dict:
    """w8a8's points with min-max observers (fast): weights per channel, every GEMM input
    affine per tensor, Q/K/V and the scores per head; intSoft, residuals, outputs in float."""
    act = {"bits": bits, "signed": False, "calibration_mode": "layer_wise", "observer_type": "MinmaxObserver"}
    config: dict = {group: {"weight": weight_spec(bits)} for group in LINEAR_GROUPS}
    config.update(
        {group: act for group in ("norm1", "norm2", "attn_v_out", "mlp_gelu", "final_norm", "patch_merging_norm")}
    )
    config.update(
        {
            group: {**act, "calibration_mode": "head_wise"}
            for group in ("attn_q_out", "attn_k_out", "attn_v_input", "attn_kv_out")
        }
    )
    return config


@pytest.fixture
def qconfigs():
    """Builders of qconfig dicts (a namespace, so tests read ``qconfigs.all_groups()``)."""

    class _Builders:
        act = staticmethod(act_spec)
        weight = staticmethod(weight_spec)
        all_groups = staticmethod(all_groups_qconfig)
        gemm_inputs = staticmethod(gemm_inputs_qconfig)

    return _Builders


# ------------------------------------------------------------------ context and passes
def make_context(gm: fx.GraphModule, qconfig, inputs: tuple, calib_data: Optional[Iterable] = None) -> PassContext:
    """The context ``fxquant.compile`` builds: the reference is a deepcopy of the traced graph."""
    config = load_qconfig(qconfig)
    return PassContext(
        qconfig=config,
        reference=copy.deepcopy(gm),
        diff_inputs=tuple(inputs),
        calib_data=calib_data,
        progress=False,
        report=Report(model=type(gm).__name__, qconfig=config.name, backend="fake"),
    )


def run_passes(gm: fx.GraphModule, ctx: PassContext, *passes: Pass) -> fx.GraphModule:
    """Run ``passes`` in order with the NumericDiff instrument; each one's record lands in
    ``ctx.report.passes`` (output QSNR vs the reference, per-node QSNR, the pass's notes).
    Their order is checked against their contracts starting from ``ctx.properties``: what
    earlier ``run`` calls on this context established (a fresh context: a traced graph)."""
    return PassManager(list(passes), [NumericDiff()], holds=ctx.properties).run(gm, ctx)


@pytest.fixture
def make_ctx() -> Callable[..., PassContext]:
    return make_context


@pytest.fixture
def run() -> Callable[..., fx.GraphModule]:
    return run_passes


# --------------------------------------------------------------------------- numerics
@torch.no_grad()
def forward(module: torch.nn.Module, inputs: tuple) -> torch.Tensor:
    return module(*inputs)


def assert_reordering_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to float32 rounding of reordered sums (see REORDER_ULPS)."""
    atol = REORDER_ULPS * FLOAT32_EPS * float(expected.abs().max())
    torch.testing.assert_close(actual, expected, rtol=0.0, atol=atol)


@pytest.fixture
def fp32():
    """``fp32.forward(module, inputs)``, ``fp32.assert_close(actual, expected)`` (rounding)."""

    class _Numerics:
        eps = FLOAT32_EPS
        forward = staticmethod(forward)
        assert_close = staticmethod(assert_reordering_close)

    return _Numerics


# ------------------------------------------------------------------------ graph queries
def nodes_with(gm: fx.GraphModule, key: str) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if key in n.meta]


def scalar_muls(gm: fx.GraphModule) -> list[fx.Node]:
    """``x * c`` nodes with a Python float ``c`` (attention's 1/sqrt(d))."""
    return [
        n
        for n in gm.graph.nodes
        if n.op == "call_function" and n.target is operator.mul and any(isinstance(a, float) for a in n.args)
    ]


@pytest.fixture
def graph():
    """Small graph queries shared by the pass tests."""

    class _Queries:
        nodes_with = staticmethod(nodes_with)
        scalar_muls = staticmethod(scalar_muls)

    return _Queries


@pytest.fixture
def trace() -> Callable[..., fx.GraphModule]:
    return fxquant.trace
