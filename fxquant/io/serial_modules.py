"""The submodules a saved graph may hold, each with the schema its file entry must satisfy.

Nothing is allocated from a file's configuration: torch's float modules are built on the
``meta`` device (no memory) and then must receive, from the file, exactly the parameters and
buffers that construction declares, with the same shapes and dtypes; fxquant's own modules
are plain state (typed attributes plus tensors), checked against :data:`SCHEMAS` (each
attribute's type or choices, each tensor's dtypes and shape relations).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn

from fxquant.io.serial_values import MAX_INT, SerializeError, decode

f32, f64, i8, u8, i32, i64 = torch.float32, torch.float64, torch.int8, torch.uint8, torch.int32, torch.int64


@dataclass(frozen=True)
class TensorRule:
    """What one tensor of a module must be: its dtypes, number of dimensions, and shape relations."""

    dtypes: tuple[torch.dtype, ...]
    ndims: tuple[int, ...] = (0, 1, 2, 3, 4)
    like: Optional[str] = None  # the same shape as this other tensor of the module
    fits: Optional[str] = None  # the same number of dimensions as this tensor, and broadcastable with it
    rows: Optional[str] = None  # dim 0 equals this integer attribute
    cols: Optional[str] = None  # dim 1 equals this integer attribute
    required: bool = False


@dataclass(frozen=True)
class Schema:
    """A plain-state module's attributes (name -> type or tuple of allowed values) and tensors."""

    attrs: dict[str, Any]
    tensors: dict[str, TensorRule] = field(default_factory=dict)


def _out(dtype: torch.dtype) -> TensorRule:
    return TensorRule((dtype,), ndims=(1,), rows="out_features")


_SCALE = TensorRule((f32,), required=True)
_LIKE_SCALE = TensorRule((f32,), fits="scale")
_NAMED = {"label": str, "out_label": str, "qmin": int, "qmax": int}
SCHEMAS: dict[str, Schema] = {
    "QuantizeCodes": Schema(
        {**_NAMED, "codes_dtype": ("int8", "uint8")},
        {"scale": _SCALE, "zero_point": TensorRule((f32,), fits="scale", required=True)},
    ),
    "DequantizeCodes": Schema(
        {"label": str, "post_scale": float, "fused_affine": bool},
        {
            "scale": _SCALE,
            "zero_point": TensorRule((f32,), fits="scale", required=True),
            "affine_scale": _LIKE_SCALE,
            "affine_bias": _LIKE_SCALE,
        },
    ),
    "IntLinear": Schema(
        {
            **_NAMED,
            "in_features": int,
            "out_features": int,
            "input_scale": float,
            "input_zero_point": int,
            "requantizes": bool,
            "float_requant": bool,
            "bias": None,
            "weight_scale": None,
            "zero_point_term": None,
            "out_point_scale": None,
            "out_point_zero": None,
        },
        {
            "weight_codes": TensorRule((i8,), ndims=(2,), rows="out_features", cols="in_features", required=True),
            "out_multiplier": _out(i32),
            "out_shift": TensorRule((i64,), ndims=(0,)),
            "out_offset": _out(i64),
            "out_scale": _out(f32),
            "out_bias": _out(f32),
            # kept when lowered with release_setup=False
            "bias": _out(f32),
            "weight_scale": _out(f32),
            "zero_point_term": _out(i32),
            "out_point_scale": TensorRule((f64,), ndims=(0, 1)),
            "out_point_zero": TensorRule((f64,), fits="out_point_scale"),
        },
    ),
    "IntMatmul": Schema(
        {**_NAMED, "requantizes": bool, "a_uint8": bool, "b_uint8": bool, "float_requant": bool},
        {
            "a_zero_point": TensorRule((f32,), required=True),
            "b_zero_point": TensorRule((f32,), fits="a_zero_point", required=True),
            "acc_scale": TensorRule((f64,), fits="a_zero_point", required=True),
            "out_point_scale": TensorRule((f64,), fits="a_zero_point"),
            "out_point_zero": TensorRule((f64,), fits="a_zero_point"),
            "out_multiplier": TensorRule((i32,), fits="a_zero_point"),
            "out_shift": TensorRule((i64,), ndims=(0,)),
            "out_offset": TensorRule((i64,), fits="a_zero_point"),
            "out_scale": TensorRule((f32,), fits="a_zero_point"),
            "float_multiplier": TensorRule((f32,), fits="a_zero_point"),
            "float_zero_point": TensorRule((f32,), fits="a_zero_point"),
        },
    ),
    "IntLayerNorm": Schema(
        {
            "in_label": str,
            "out_label": str,
            "in_zero_point": int,
            "eps_int": int,
            "sigma_bits": int,
            "out_zero_point": int,
            "qmin": int,
            "qmax": int,
            "codes_dtype": ("int8", "uint8"),
        },
        {
            "alpha": TensorRule((i64,), ndims=(1,), required=True),
            "weight_units": TensorRule((f64,), like="alpha", required=True),
            "offset": TensorRule((i64,), like="alpha", required=True),
        },
    ),
    "LisShiftMatmul": Schema(
        {"bits": int, "renormalize": bool, "max_shift": int, "label": str, "v_uint8": bool},
        {
            "lis_scale": TensorRule((f32,), required=True),
            "v_scale": TensorRule((f64,), fits="lis_scale", required=True),
            "v_zero_point": TensorRule((f64,), fits="lis_scale", required=True),
        },
    ),
    "OnednnLinear": Schema(
        {
            "label": str,
            "out_label": str,
            "in_features": int,
            "out_features": int,
            "input_scale": float,
            "input_zero_point": int,
            "output": ("float32", "int8", "uint8"),
            "output_scale": float,
            "output_zero_point": int,
            "post_op": ("none", "gelu"),
        },
        {
            "weight_codes": TensorRule((i8,), ndims=(2,), rows="out_features", cols="in_features", required=True),
            "weight_scale": _out(f32),
            "weight_zero_point": _out(i64),
            "bias": _out(f32),
        },
    ),
    "IntAttention": Schema(
        {"label": str, "qmin": int, "qmax": int}, {"head_constants": TensorRule((f32,), ndims=(2,), required=True)}
    ),
    # fake-quant modules: their configs have builders of their own; these are their tensors
    "FakeQuantize": Schema(
        {},
        {
            "scale": TensorRule((f32,), ndims=(0, 1), required=True),
            "zero_point": TensorRule((f32,), like="scale", required=True),
            "#qparams.scale": TensorRule((f32,), like="scale", required=True),
            "#qparams.zero_point": TensorRule((f32,), like="scale", required=True),
        },
    ),
    "QuantLinear": Schema(
        {},
        {
            "weight_codes": TensorRule(
                (i8, u8, i32), ndims=(2,), rows="out_features", cols="in_features", required=True
            ),
            "weight": TensorRule((f32,), like="weight_codes", required=True),
            "float_weight": TensorRule((f32,), like="weight_codes"),
            "bias": _out(f32),
            "#weight_qparams.scale": TensorRule((f32,), ndims=(0, 1), required=True),
            "#weight_qparams.zero_point": TensorRule((f32,), like="#weight_qparams.scale", required=True),
        },
    ),
    "QuantConv2d": Schema(
        {},
        {
            "weight_codes": TensorRule((i8, u8, i32), ndims=(4,), required=True),
            "weight": TensorRule((f32,), like="weight_codes", required=True),
            "float_weight": TensorRule((f32,), like="weight_codes"),
            "bias": TensorRule((f32,), ndims=(1,)),
            "#weight_qparams.scale": TensorRule((f32,), ndims=(0, 1), required=True),
            "#weight_qparams.zero_point": TensorRule((f32,), like="#weight_qparams.scale", required=True),
        },
    ),
    "LogIntSoftmax": Schema({}, {"scale": TensorRule((f32,))}),
    "FloatPoint": Schema({}, {}),
}


def check_plain_state(
    kind: str, attrs: Any, none_buffers: Any, tensors: dict[str, torch.Tensor], where: str
) -> tuple[dict, list[str]]:
    """Validate a plain-state module's attributes and tensors against its schema."""
    schema = SCHEMAS.get(kind)
    if schema is None:
        raise SerializeError(f"{where}: module type fxquant.{kind} has no schema")
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
    schema = SCHEMAS[kind]
    for name, tensor in tensors.items():
        rule = schema.tensors.get(name)
        if rule is None:
            raise SerializeError(f"{where}: fxquant.{kind} has no tensor {name!r:.40}")
        _check_tensor(name, tensor, rule, attrs, tensors, where)
    for name, rule in schema.tensors.items():
        if rule.required and name not in tensors:
            raise SerializeError(f"{where}: fxquant.{kind} needs its tensor {name!r}")


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
