"""The default pass pipeline for each backend, its two stages and what ends an integer pipeline."""

from __future__ import annotations

from typing import Sequence

import torch.fx as fx

from fxquant.infra.contracts import Prop, contract_of
from fxquant.infra.pass_manager import Pass
from fxquant.passes import (
    Annotate,
    BiasCorrection,
    Calibrate,
    DecomposeAttention,
    FuseIntAttention,
    FuseScales,
    Gptq,
    InsertObservers,
    LinearModules,
    LowerFakeQuant,
    LowerInteger,
    LowerLogIntSoftmax,
    Reparameterize,
    Rotate,
    Smooth,
    SplitQkv,
    UseOnednnKernels,
)
from fxquant.runtime.int_modules import IntLinear

BACKENDS = ("fake", "int")


INT_KERNELS = ("portable", "onednn")


def default_passes(backend: str = "fake", int_kernels: str = "portable", qconfig=None) -> list[Pass]:
    """``fake``: ends in a fake-quant graph. ``int``: the same passes, then ``lower_integer``
    rewrites the fake-quant graph into int8 codes, integer GEMMs and dyadic requantization
    (one calibration, so the integer graph matches the fake-quant one point by point).
    ``int_kernels="onednn"`` (x86 CPUs) then moves the Linears onto oneDNN's fused int8
    kernel (``use_onednn_kernels``) and each attention core (q @ kT, score requantization,
    softmax, attn@V) into one C++ kernel (``fuse_int_attention``). ``gptq`` follows
    ``lower_log_int_softmax`` when ``qconfig`` (a QConfig) has a ``gptq:`` key, ``rotate``
    follows ``split_qkv`` when it has ``rotate:`` (then ``reparameterize`` with
    ``reparameterize: true``), ``bias_correction`` follows ``gptq`` when
    it has ``bias_correction: true``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is not available in this version; choose one of {BACKENDS}")
    if int_kernels not in INT_KERNELS:
        raise ValueError(f"int_kernels {int_kernels!r} is not one of {INT_KERNELS}")
    recovery = qconfig.recovery if qconfig is not None else {}
    passes = [
        DecomposeAttention(),
        LinearModules(),
        Annotate(),
        SplitQkv(),
        *([Rotate()] if recovery.get("rotate") is not None else []),
        *([Reparameterize()] if recovery.get("reparameterize") else []),
        Smooth(),
        InsertObservers(),
        Calibrate(),
        FuseScales(),
        LowerFakeQuant(),
        LowerLogIntSoftmax(),
    ]
    if recovery.get("gptq") is not None:
        passes.append(Gptq())  # on the finished fake-quant graph, so each layer sees the final upstream
    if recovery.get("bias_correction"):
        passes.append(BiasCorrection())  # on the final weights (gptq's), before int32 biases are made
    if backend == "int":
        passes.append(LowerInteger())
        if int_kernels == "onednn":
            passes += [UseOnednnKernels(), FuseIntAttention()]
    return passes


def split_before(passes: Sequence[Pass], prop: Prop) -> tuple[list[Pass], list[Pass]]:
    """``passes`` cut before the first pass whose contract provides ``prop`` (the second list
    is empty when none does)."""
    for index, p in enumerate(passes):
        if prop in contract_of(p).provides:
            return list(passes[:index]), list(passes[index:])
    return list(passes), []


def stages(passes: Sequence[Pass]) -> tuple[list[Pass], list[Pass]]:
    """The fake-quant stage (up to the graph before integer lowering) and the integer stage
    (from the pass that provides ``Prop.INTEGER`` on; empty for a fake-quant pipeline)."""
    return split_before(passes, Prop.INTEGER)


def release_setup_tensors(gm: fx.GraphModule) -> int:
    """The end of an integer pipeline: every IntLinear drops the scales and bias it kept for
    the passes that re-target it (``use_onednn_kernels``); returns how many did."""
    released = 0
    for module in gm.modules():
        if isinstance(module, IntLinear) and module.weight_scale is not None:
            module.release_setup_tensors()
            released += 1
    return released
