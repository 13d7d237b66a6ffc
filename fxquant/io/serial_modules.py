"""The submodules a saved graph may hold, each with the schema its file entry must satisfy.

Nothing is allocated from a file's configuration: torch's float modules are built on the
``meta`` device (no memory) and then must receive, from the file, exactly the parameters and
buffers that construction declares, with the same shapes and dtypes; fxquant's own modules
are checked against the schema each class declares next to itself (``fxquant.runtime.savable``:
each attribute's type or choices, each tensor's dtypes and shape relations).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from fxquant.io.serial_values import MAX_INT, SerializeError, decode
from fxquant.runtime.savable import Schema, TensorRule, schema_of

f32, f64, i8, u8, i32, i64 = torch.float32, torch.float64, torch.int8, torch.uint8, torch.int32, torch.int64


def _schema(kind: str, where: str) -> Schema:
    try:
        return schema_of(f"fxquant.{kind}")
    except KeyError:
        raise SerializeError(f"{where}: module type fxquant.{kind} is not a savable fxquant module") from None


def check_plain_state(
    kind: str, attrs: Any, none_buffers: Any, tensors: dict[str, torch.Tensor], where: str
) -> tuple[dict, list[str]]:
    """Validate a plain-state module's attributes and tensors against its schema."""
    schema = _schema(kind, where)
    if not isinstance(attrs, dict) or not isinstance(none_buffers, list):
        raise SerializeError(f"{where}: malformed fxquant.{kind} description (attrs, none_buffers)")
    out = {}
    for name, value in attrs.items():
        if name not in schema.attrs:
            raise SerializeError(f"{where}: fxquant.{kind} has no attribute {name!r:.40}")
        out[name] = _attr(value, schema.attrs[name], f"{where}: attribute {name!r}")
    for name in none_buffers:
        if name not in schema.tensors or name in tensors:
            raise SerializeError(f"{where}: {name!r:.40} cannot be an empty buffer of fxquant.{kind}")
    check_tensors(kind, tensors, out, where)
    return out, list(none_buffers)


def check_tensors(kind: str, tensors: dict[str, torch.Tensor], attrs: dict, where: str) -> None:
    """The file's tensors of an fxquant module against the schema of ``kind`` (a class name)."""
    schema = _schema(kind, where)
    for name, tensor in tensors.items():
        rule = schema.tensors.get(name)
        if rule is None:
            raise SerializeError(f"{where}: fxquant.{kind} has no tensor {name!r:.40}")
        _check_tensor(name, tensor, rule, attrs, tensors, where)
    for name, rule in schema.tensors.items():
        if rule.required and name not in tensors:
            raise SerializeError(f"{where}: fxquant.{kind} needs its tensor {name!r}")
    if schema.exactly_one and sum(name in tensors for name in schema.exactly_one) != 1:
        raise SerializeError(
            f"{where}: fxquant.{kind} needs exactly one of the tensors {list(schema.exactly_one)}, "
            f"the file has {[name for name in schema.exactly_one if name in tensors]}"
        )


def _attr(value: Any, rule: Any, where: str) -> Any:
    if rule is None:
        if value is not None:
            raise SerializeError(f"{where}: must be null")
        return None
    if isinstance(rule, tuple):
        if value not in rule:
            raise SerializeError(f"{where}: {value!r:.40} is not one of {rule}")
        return value
    if rule is float:
        if type(value) is int or (isinstance(value, dict) and value.get("$") == "float"):
            value = float(decode(value, None, where))
        if type(value) is not float:
            raise SerializeError(f"{where}: expected a number, got {value!r:.40}")
        return value
    if type(value) is not rule or (rule is int and abs(value) > MAX_INT) or (rule is str and len(value) > 256):
        raise SerializeError(f"{where}: expected a {rule.__name__}, got {value!r:.40}")
    return value


def _check_tensor(name: str, t: torch.Tensor, rule: TensorRule, attrs: dict, tensors: dict, where: str) -> None:
    at = f"{where}: tensor {name!r} ({str(t.dtype).removeprefix('torch.')} {list(t.shape)})"
    if t.dtype not in rule.dtypes:
        raise SerializeError(f"{at}: expected dtype {', '.join(str(d).removeprefix('torch.') for d in rule.dtypes)}")
    if t.dim() not in rule.ndims:
        raise SerializeError(f"{at}: expected {' or '.join(map(str, rule.ndims))} dimensions")
    if rule.like is not None and rule.like in tensors and tensors[rule.like].shape != t.shape:
        raise SerializeError(f"{at}: expected the shape of {rule.like!r}, {list(tensors[rule.like].shape)}")
    if rule.fits is not None and rule.fits in tensors:
        other = tensors[rule.fits].shape
        if len(other) != t.dim() or any(a != b and 1 not in (a, b) for a, b in zip(other, t.shape)):
            raise SerializeError(f"{at}: does not broadcast with {rule.fits!r}, {list(other)}")
    for dim, attr in ((0, rule.rows), (1, rule.cols)):
        if attr is not None and attrs.get(attr) != t.shape[dim]:
            raise SerializeError(f"{at}: dimension {dim} must equal {attr} = {attrs.get(attr)!r}")
    if rule.packed_cols is not None:
        count = attrs.get(rule.packed_cols)
        expected = (count + 1) // 2 if type(count) is int and count >= 0 else "?"
        if t.shape[1] != expected:
            raise SerializeError(
                f"{at}: a packed 4-bit weight (two codes per byte) has ceil({rule.packed_cols} / 2) = {expected} "
                f"columns ({rule.packed_cols} = {count!r:.20}); this one does not fit the layer"
            )


# --------------------------------------------------------------------------- torch's float modules


def _int(c: dict, key: str, where: str, low: int = 0) -> int:
    value = c.get(key)
    if type(value) is not int or not low <= value <= MAX_INT:
        raise SerializeError(f"{where}: config {key!r} must be an integer >= {low}, got {value!r:.40}")
    return value


def _bool(c: dict, key: str, where: str) -> bool:
    if type(c.get(key)) is not bool:
        raise SerializeError(f"{where}: config {key!r} must be true or false, got {c.get(key)!r:.40}")
    return c[key]


def _float(c: dict, key: str, where: str) -> float:
    value = c.get(key)
    if type(value) not in (int, float) or not 0 <= value < 1e6:
        raise SerializeError(f"{where}: config {key!r} must be a finite non-negative number, got {value!r:.40}")
    return float(value)


def _ints(c: dict, key: str, where: str, length: int, low: int = 0) -> tuple[int, ...]:
    value = c.get(key)
    if not isinstance(value, list) or len(value) != length:
        raise SerializeError(f"{where}: config {key!r} must be a list of {length} integers, got {value!r:.60}")
    return tuple(_int({key: v}, key, where, low) for v in value)


def _keys(c: Any, keys: set[str], where: str) -> dict:
    if not isinstance(c, dict) or set(c) != keys:
        raise SerializeError(f"{where}: config must have exactly the keys {sorted(keys)}")
    return c


def _linear(c: dict, where: str) -> nn.Module:
    _keys(c, {"in_features", "out_features", "bias"}, where)
    return nn.Linear(
        _int(c, "in_features", where),
        _int(c, "out_features", where),
        bias=_bool(c, "bias", where),
        device="meta",
        dtype=f32,
    )


def _conv(c: dict, where: str) -> nn.Module:
    _keys(
        c,
        {
            "in_channels",
            "out_channels",
            "kernel_size",
            "stride",
            "padding",
            "dilation",
            "groups",
            "bias",
            "padding_mode",
        },
        where,
    )
    if c["padding_mode"] not in ("zeros", "reflect", "replicate", "circular"):
        raise SerializeError(f"{where}: unknown padding_mode {c['padding_mode']!r:.40}")
    padding = c["padding"] if c["padding"] in ("same", "valid") else _ints(c, "padding", where, 2)
    groups = _int(c, "groups", where, 1)
    channels = _int(c, "in_channels", where, 1), _int(c, "out_channels", where, 1)
    if channels[0] % groups or channels[1] % groups:
        raise SerializeError(f"{where}: channels {channels} are not divisible by groups {groups}")
    return nn.Conv2d(
        *channels,
        _ints(c, "kernel_size", where, 2, 1),
        _ints(c, "stride", where, 2, 1),
        padding,
        _ints(c, "dilation", where, 2, 1),
        groups,
        _bool(c, "bias", where),
        c["padding_mode"],
        device="meta",
        dtype=f32,
    )


def _layernorm_args(c: dict, where: str) -> tuple:
    shape = c.get("normalized_shape")
    if not isinstance(shape, list) or not 1 <= len(shape) <= 4:
        raise SerializeError(f"{where}: config 'normalized_shape' must be a list of 1-4 sizes")
    return (
        tuple(_int({"size": v}, "size", where, 1) for v in shape),
        _float(c, "eps", where),
        _bool(c, "elementwise_affine", where),
        _bool(c, "bias", where),
    )


def _layernorm(c: dict, where: str) -> nn.Module:
    _keys(c, {"normalized_shape", "eps", "elementwise_affine", "bias"}, where)
    shape, eps, affine, bias = _layernorm_args(c, where)
    return nn.LayerNorm(shape, eps=eps, elementwise_affine=affine, bias=bias, device="meta", dtype=f32)


def _timm_layernorm(c: dict, where: str) -> nn.Module:
    from timm.layers.norm import LayerNorm as TimmLayerNorm

    _keys(c, {"normalized_shape", "eps", "elementwise_affine", "bias", "fast_norm"}, where)
    shape, eps, affine, bias = _layernorm_args(c, where)
    module = TimmLayerNorm(shape, eps=eps, affine=affine, bias=bias, device="meta", dtype=f32)
    module._fast_norm = _bool(c, "fast_norm", where)
    return module


def _gelu(c: dict, where: str) -> nn.Module:
    _keys(c, {"approximate"}, where)
    if c["approximate"] not in ("none", "tanh"):
        raise SerializeError(f"{where}: GELU approximate must be 'none' or 'tanh'")
    return nn.GELU(approximate=c["approximate"])


def _dropout(c: dict, where: str) -> nn.Module:
    _keys(c, {"p", "inplace"}, where)
    p = _float(c, "p", where)
    if p > 1:
        raise SerializeError(f"{where}: dropout p must be in [0, 1]")
    return nn.Dropout(p=p, inplace=_bool(c, "inplace", where))


def _softmax(c: dict, where: str) -> nn.Module:
    _keys(c, {"dim"}, where)
    if c["dim"] is not None and (type(c["dim"]) is not int or abs(c["dim"]) > 8):
        raise SerializeError(f"{where}: softmax dim must be a small integer")
    return nn.Softmax(dim=c["dim"])


def _identity(c: dict, where: str) -> nn.Module:
    _keys(c, set(), where)
    return nn.Identity()


#: type key -> builder of a meta-device module from its checked config
FLOAT_BUILDERS: dict[str, Callable[[dict, str], nn.Module]] = {
    "torch.nn.Linear": _linear,
    "torch.nn.Conv2d": _conv,
    "torch.nn.LayerNorm": _layernorm,
    "timm.layers.LayerNorm": _timm_layernorm,
    "torch.nn.GELU": _gelu,
    "torch.nn.Dropout": _dropout,
    "torch.nn.Softmax": _softmax,
    "torch.nn.Identity": _identity,
}


def check_float_tensors(module: nn.Module, tensors: dict[str, tuple[str, torch.Tensor]], where: str) -> None:
    """The file's tensors must be exactly the module's declared parameters/buffers (shape, dtype)."""
    declared = {
        **{k: v for k, v in module._parameters.items() if v is not None},
        **{k: v for k, v in module._buffers.items() if v is not None},
    }
    if set(declared) != set(tensors):
        raise SerializeError(
            f"{where}: the file gives the tensors {sorted(tensors)}, the module's config declares {sorted(declared)}"
        )
    for name, meta in declared.items():
        t = tensors[name][1]
        if t.shape != meta.shape or t.dtype != meta.dtype:
            raise SerializeError(
                f"{where}: tensor {name!r} is {str(t.dtype).removeprefix('torch.')} "
                f"{list(t.shape)}, the module's config declares "
                f"{str(meta.dtype).removeprefix('torch.')} {list(meta.shape)}"
            )
