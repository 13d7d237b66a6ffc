"""Every runtime module class a compiled graph may hold, gathered from their modules.

Each class registers itself where it is defined (``fxquant.runtime.savable.savable``);
importing this module imports every runtime module that defines one, so the registry is
complete here. ``fxquant.io`` (the loader's allowlist) and ``fxquant.lowering`` (which
modules compute on codes) read it through this module. A new runtime *module file* with a
savable class is added to the import below; tests/test_savable_registry.py fails until it is.
"""

from __future__ import annotations

from typing import Mapping

from fxquant.runtime import (  # noqa: F401  (imported for their @savable registrations)
    code_lut,
    fake_quant,
    fast_codes,
    float_point,
    hadamard,
    int_attention,
    int_layernorm,
    int_lis_attention,
    int_modules,
    log_base_softmax,
    log_int_softmax,
    onednn,
)
from fxquant.runtime.savable import savable_types

__all__ = ["registered", "integer_module_types"]


def integer_module_types() -> tuple[type, ...]:
    """The classes that compute on integer codes: the plain-state savable modules."""
    return tuple(cls for cls in savable_types().values() if cls.serial_schema.layout == "plain_state")


def registered() -> Mapping[str, type]:
    """type key -> class of every savable runtime module (the registry, complete)."""
    return savable_types()
