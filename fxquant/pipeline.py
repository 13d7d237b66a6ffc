"""The default pass pipeline for each backend."""
from __future__ import annotations

from fxquant.pass_manager import Pass

BACKENDS = ("fake",)


def default_passes(backend: str = "fake") -> list[Pass]:
    from fxquant.passes import (Annotate, Calibrate, DecomposeAttention, FuseScales, InsertObservers,
                                LowerFakeQuant, Smooth, SplitQkv)

    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is not available in this version; choose one of {BACKENDS}")
    return [DecomposeAttention(), Annotate(), SplitQkv(), Smooth(), InsertObservers(), Calibrate(), FuseScales(),
            LowerFakeQuant()]
