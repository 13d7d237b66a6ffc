"""The default pass pipeline for each backend."""
from __future__ import annotations

from fxquant.pass_manager import Pass

BACKENDS = ("fake", "int")


def default_passes(backend: str = "fake") -> list[Pass]:
    """``fake``: ends in a fake-quant graph. ``int``: the same passes, then ``lower_integer``
    rewrites the fake-quant graph into int8 codes, integer GEMMs and dyadic requantization
    (one calibration, so the integer graph matches the fake-quant one point by point)."""
    from fxquant.passes import (Annotate, Calibrate, DecomposeAttention, FuseScales, InsertObservers,
                                LowerFakeQuant, LowerInteger, LowerLogIntSoftmax, Smooth, SplitQkv)

    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is not available in this version; choose one of {BACKENDS}")
    passes = [DecomposeAttention(), Annotate(), SplitQkv(), Smooth(), InsertObservers(), Calibrate(), FuseScales(),
              LowerFakeQuant(), LowerLogIntSoftmax()]
    if backend == "int":
        passes.append(LowerInteger())
    return passes
