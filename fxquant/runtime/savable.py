"""Which runtime modules a saved graph may hold, and what each one's file entry must be.

A module class of ``fxquant.runtime`` becomes savable by declaring its schema next to the
class with the :func:`savable` decorator::

    @savable(Schema({"label": str, "qmin": int}, {"scale": TensorRule((torch.float32,), required=True)}))
    class MyIntOp(nn.Module): ...

Its file entry then has the type key ``fxquant.MyIntOp``, and :func:`savable_types` -- the
loader's allowlist of fxquant modules -- holds it. Two layouts:

* ``"plain_state"`` (the integer modules): the declared attributes are saved as JSON values
  and the declared tensors as tensors; ``fxquant.load`` checks both against the schema and
  rebuilds the module without calling ``__init__`` (an empty instance receives them). A new
  module of this kind needs nothing but the decorator.
* ``"config"`` (the fake-quant modules, whose state holds quantization points and QParams
  objects): ``attrs`` names the keys of the entry's config, ``tensors`` its tensors; the codec
  that turns such a config into a module lives in ``fxquant.io.serial_table`` and saving a
  ``config`` module it does not know fails with a message naming the class.

This module holds the vocabulary only; ``fxquant.io`` reads and writes files with it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping, Optional

import torch

LAYOUTS = ("plain_state", "config")

#: config-layout value kinds (their codecs are in ``fxquant.io.serial_values``/``serial_table``)
POINT = "quantization point"
QPARAMS = "quantization parameters: range and axis here, scale and zero point as '#<key>.scale' / '#<key>.zero_point'"
NUMBER = "finite number"


@dataclass(frozen=True)
class TensorRule:
    """What one tensor of a module must be: its dtypes, number of dimensions, and shape relations."""

    dtypes: tuple[torch.dtype, ...]
    ndims: tuple[int, ...] = (0, 1, 2, 3, 4)
    like: Optional[str] = None  # the same shape as this other tensor of the module
    fits: Optional[str] = None  # the same number of dimensions as this tensor, and broadcastable with it
    rows: Optional[str] = None  # dim 0 equals this integer attribute
    cols: Optional[str] = None  # dim 1 equals this integer attribute
    packed_cols: Optional[str] = None  # dim 1 equals ceil(attribute / 2): two 4-bit codes per byte
    required: bool = False


@dataclass(frozen=True)
class Schema:
    """A module's attributes (name -> type, ``None`` for an attribute that is always None, or a
    tuple of the allowed values) and tensors (name -> rule), in one of :data:`LAYOUTS`.
    ``exactly_one``: tensors of which a saved entry holds exactly one (e.g. an int8 or a packed
    4-bit weight)."""

    attrs: dict[str, Any]
    tensors: dict[str, TensorRule] = field(default_factory=dict)
    layout: str = "plain_state"
    exactly_one: tuple[str, ...] = ()

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"schema layout {self.layout!r} is not one of {LAYOUTS}")
        for name, rule in self.tensors.items():
            for other in (rule.like, rule.fits):
                if other is not None and other not in self.tensors:
                    raise ValueError(f"tensor rule {name!r} refers to {other!r}, which the schema does not declare")
            for attr in (rule.rows, rule.cols, rule.packed_cols):
                if attr is not None and attr not in self.attrs:
                    raise ValueError(f"tensor rule {name!r} refers to attribute {attr!r}, which is not declared")
        for name in self.exactly_one:
            if name not in self.tensors:
                raise ValueError(f"exactly_one names {name!r}, which the schema does not declare")


def per_output(dtype: torch.dtype) -> TensorRule:
    """A 1-d tensor with one entry per output feature (``rows="out_features"``): biases, scales."""
    return TensorRule((dtype,), ndims=(1,), rows="out_features")


_REGISTRY: dict[str, type] = {}


def type_key(cls: type) -> str:
    """The key a class's modules carry in a saved file."""
    return f"fxquant.{cls.__name__}"


def savable(schema: Schema):
    """Class decorator: register ``cls`` as savable with ``schema`` (stored as ``cls.serial_schema``)."""
    if not isinstance(schema, Schema):
        raise TypeError(f"savable() takes a Schema, got {type(schema).__name__}")

    def register(cls: type) -> type:
        if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
            raise TypeError(f"savable: {cls!r} is not an nn.Module class")
        key = type_key(cls)
        if key in _REGISTRY and _REGISTRY[key] is not cls:
            raise ValueError(
                f"savable: {key} is already registered by {_REGISTRY[key].__module__}; "
                "a saved file names modules by class name, so two savable classes need two names"
            )
        if "serial_schema" in vars(cls):
            raise ValueError(f"savable: {cls.__qualname__} declares serial_schema itself; use the decorator only")
        cls.serial_schema = schema
        _REGISTRY[key] = cls
        return cls

    return register


def unregister(cls: type) -> None:
    """Remove ``cls`` from the registry (tests that register a toy module clean up with this)."""
    if _REGISTRY.get(type_key(cls)) is cls:
        del _REGISTRY[type_key(cls)]
        del cls.serial_schema


def savable_types() -> Mapping[str, type]:
    """type key -> class, for every class registered so far (read-only view). The classes register
    when their modules are imported; ``fxquant.io.serial_table`` imports every runtime module
    that defines one before it reads this."""
    return MappingProxyType(_REGISTRY)


def schema_of(key: str) -> Schema:
    """The schema of the registered type ``key`` (KeyError naming the registered ones)."""
    if key not in _REGISTRY:
        raise KeyError(f"{key} is not a savable fxquant module; registered: {sorted(_REGISTRY)}")
    return _REGISTRY[key].serial_schema
