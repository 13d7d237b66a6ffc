"""The default pass pipeline for each backend, its two stages and what ends an integer pipeline."""

from __future__ import annotations

import platform
from typing import Optional, Sequence

import torch
import torch.fx as fx

from fxquant.infra.contracts import Prop, contract_of
from fxquant.infra.pass_manager import Pass
from fxquant.passes import (
    Annotate,
    BiasCorrection,
    Calibrate,
    DecomposeAttention,
    FuseIntAttention,
    FuseResidualAdds,
    FuseScales,
    Gptq,
    InsertObservers,
    LinearModules,
    LowerFakeQuant,
    LowerInteger,
    LowerLogIntSoftmax,
    PackInt4Weights,
    Reparameterize,
    Rotate,
    Smooth,
    SplitQkv,
    UseOnednnKernels,
)
from fxquant.quant.qconfig import QConfig
from fxquant.quant.qconfig_spec import parse_spec
from fxquant.runtime.int4_weights import fits_int4
from fxquant.runtime.int_modules import DequantizeCodes, IntLinear, IntMatmul, QuantizeCodes
from fxquant.runtime.onednn import onednn_available

BACKENDS = ("fake", "int")


INT_KERNELS = ("auto", "portable", "onednn")


def resolve_int_kernels(int_kernels: str, device: Optional[torch.device] = None) -> tuple[str, str]:
    """``(kernels, why)``: ``"auto"`` becomes ``"onednn"`` on an x86 CPU where torch has oneDNN's
    int8 Linear kernels, else ``"portable"`` (CUDA tensors, other CPUs, a torch without them);
    ``"portable"`` and ``"onednn"`` stay what they are. ``device``: where the model and its
    calibration data live (CPU when None)."""
    if int_kernels not in INT_KERNELS:
        raise ValueError(f"int_kernels {int_kernels!r} is not one of {INT_KERNELS}")
    if int_kernels != "auto":
        return int_kernels, "chosen explicitly"
    if device is not None and torch.device(device).type != "cpu":
        return "portable", f"{torch.device(device).type} tensors (oneDNN's int8 kernels are CPU-only)"
    if onednn_available():
        return "onednn", f"{platform.machine()} CPU with oneDNN int8 kernels"
    return "portable", (
        f"no oneDNN int8 Linear kernels on this {platform.machine() or 'unknown'} CPU build of torch "
        "(they need an x86 CPU and torch built with oneDNN)"
    )


def default_passes(backend: str = "fake", int_kernels: str = "auto", qconfig=None) -> list[Pass]:
    """``fake``: ends in a fake-quant graph. ``int``: the same passes, then ``lower_integer``
    rewrites the fake-quant graph into int8 codes, integer GEMMs and dyadic requantization
    (one calibration, so the integer graph matches the fake-quant one point by point).
    ``int_kernels="onednn"`` (x86 CPUs) then moves the Linears onto oneDNN's fused int8
    kernel (``use_onednn_kernels``) and each attention core (q @ kT, score requantization,
    softmax, attn@V) into one C++ kernel (``fuse_int_attention``); ``"auto"`` (default) does
    so where oneDNN's int8 kernels exist on this CPU (:func:`resolve_int_kernels`). ``gptq`` follows
    ``lower_log_int_softmax`` when ``qconfig`` (a QConfig) has a ``gptq:`` key, ``rotate``
    follows ``split_qkv`` when it has ``rotate:`` (then ``reparameterize`` with
    ``reparameterize: true``), ``bias_correction`` follows ``gptq`` when
    it has ``bias_correction: true``. An integer pipeline ends with ``pack_int4_weights`` when
    a weight grid of ``qconfig`` fits 4 bits (:func:`has_int4_weights`)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is not available in this version; choose one of {BACKENDS}")
    int_kernels, _ = resolve_int_kernels(int_kernels)
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
            passes += [UseOnednnKernels(), FuseResidualAdds(), FuseIntAttention()]
        if qconfig is not None and has_int4_weights(qconfig):
            passes.append(PackInt4Weights())  # last: the passes above read int8 weights
    return passes


def has_int4_weights(qconfig: QConfig) -> bool:
    """Whether a weight grid of ``qconfig`` (a group's, or one an override makes) fits 4 bits."""
    groups = set(qconfig.groups) | {group for _, body in qconfig.overrides for group in body}
    for group in sorted(groups):
        base = qconfig.groups.get(group, {}).get("weight")
        raws = [base] + [
            {**(base or {}), **body[group]["weight"]}
            for _, body in qconfig.overrides
            if "weight" in body.get(group, {})
        ]
        for raw in filter(None, raws):
            spec = parse_spec(raw, qconfig.source, f"{group}.weight")
            if spec.enabled and fits_int4(spec.qmin, spec.qmax):
                return True
    return False


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


def integer_ops_lowered(gm: fx.GraphModule) -> bool:
    """Whether ``lower_integer`` left integer ops that the oneDNN passes work on (codes, and a
    GEMM or a dequantization; a graph whose every point stayed float has none)."""
    kinds = {type(m) for m in gm.modules()}
    return bool(kinds & {QuantizeCodes, IntLinear, IntMatmul}) and bool(kinds & {IntMatmul, DequantizeCodes})


def release_setup_tensors(gm: fx.GraphModule) -> int:
    """The end of an integer pipeline: every IntLinear drops the scales and bias it kept for
    the passes that re-target it (``use_onednn_kernels``); returns how many did."""
    released = 0
    for module in gm.modules():
        if isinstance(module, IntLinear) and module.weight_scale is not None:
            module.release_setup_tensors()
            released += 1
    return released
