"""The default pass pipeline for each backend."""

from __future__ import annotations

from fxquant.infra.pass_manager import Pass

BACKENDS = ("fake", "int")


INT_KERNELS = ("portable", "onednn")


def default_passes(backend: str = "fake", int_kernels: str = "portable", qconfig=None) -> list[Pass]:
    """``fake``: ends in a fake-quant graph. ``int``: the same passes, then ``lower_integer``
    rewrites the fake-quant graph into int8 codes, integer GEMMs and dyadic requantization
    (one calibration, so the integer graph matches the fake-quant one point by point).
    ``int_kernels="onednn"`` (x86 CPUs) then moves the Linears onto oneDNN's fused int8
    kernel (``use_onednn_kernels``) and each attention core (q @ kT, score requantization,
    softmax, attn@V) into one C++ kernel (``fuse_int_attention``). ``gptq`` follows
    ``lower_fake_quant`` when ``qconfig`` (a QConfig) has a ``gptq:`` key."""
    from fxquant.passes import (
        Annotate,
        Calibrate,
        DecomposeAttention,
        FuseIntAttention,
        FuseScales,
        Gptq,
        InsertObservers,
        LowerFakeQuant,
        LowerInteger,
        LowerLogIntSoftmax,
        Smooth,
        SplitQkv,
        UseOnednnKernels,
    )

    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is not available in this version; choose one of {BACKENDS}")
    if int_kernels not in INT_KERNELS:
        raise ValueError(f"int_kernels {int_kernels!r} is not one of {INT_KERNELS}")
    passes = [
        DecomposeAttention(),
        Annotate(),
        SplitQkv(),
        Smooth(),
        InsertObservers(),
        Calibrate(),
        FuseScales(),
        LowerFakeQuant(),
        LowerLogIntSoftmax(),
    ]
    if qconfig is not None and qconfig.recovery.get("gptq") is not None:
        passes.append(Gptq())  # on the finished fake-quant graph, so each layer sees the final upstream
    if backend == "int":
        onednn = int_kernels == "onednn"
        passes.append(LowerInteger(release_setup=not onednn))
        if onednn:
            passes += [UseOnednnKernels(measure=False), FuseIntAttention()]
    return passes
