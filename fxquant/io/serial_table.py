"""The module types a saved graph may hold: how each is described at save time (its config
and tensors) and rebuilt at load time, checked against ``fxquant.io.serial_modules`` before
anything is allocated."""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Callable

import torch
from torch import nn

from fxquant.io.serial_modules import FLOAT_BUILDERS, check_float_tensors, check_plain_state, check_tensors
from fxquant.io.serial_values import SerializeError, decode, encode, point_dict, point_from
from fxquant.quant.log_quantizers import RESOLVED_LOG_METHODS
from fxquant.quant.qparams import QParams
from fxquant.runtime.catalog import registered
from fxquant.runtime.fake_quant import FakeQuantize, QuantConv2d, QuantLinear, _codes_dtype
from fxquant.runtime.savable import type_key


def _cfg_linear(m: nn.Linear) -> dict:
    return {"in_features": m.in_features, "out_features": m.out_features, "bias": m.bias is not None}


def _cfg_conv(m: nn.Conv2d) -> dict:
    return {
        "in_channels": m.in_channels,
        "out_channels": m.out_channels,
        "kernel_size": list(m.kernel_size),
        "stride": list(m.stride),
        "padding": m.padding if isinstance(m.padding, str) else list(m.padding),
        "dilation": list(m.dilation),
        "groups": m.groups,
        "bias": m.bias is not None,
        "padding_mode": m.padding_mode,
    }


def _cfg_layernorm(m: nn.LayerNorm) -> dict:
    return {
        "normalized_shape": list(m.normalized_shape),
        "eps": m.eps,
        "elementwise_affine": m.elementwise_affine,
        "bias": m.bias is not None,
    }


def _qparams_cfg(q: QParams) -> dict:
    return {"qmin": q.qmin, "qmax": q.qmax, "axis": q.axis}


def _cfg_fake(m: FakeQuantize) -> dict:
    return {
        "point": point_dict(m.point),
        "qparams": _qparams_cfg(m.qparams),
        "method": m.method,
        "post_scale": _post_scale(m),
    }


def _post_scale(m: nn.Module) -> Any:
    if isinstance(m.post_scale, bool) or not isinstance(m.post_scale, (int, float)):
        raise SerializeError(f"post_scale of type {type(m.post_scale).__name__} cannot be saved; expected a number")
    return encode(m.post_scale, "post_scale")


def _cfg_quant_weight(m: nn.Module) -> dict:
    if getattr(m, "weight_group_size", None) is not None:
        raise SerializeError(
            f"{type(m).__name__} holds group-wise weight scales (gptq.group_size "
            f"{m.weight_group_size}), which the .fxq format does not store yet; compile with "
            "gptq.group_size null to save the model"
        )
    out = {"point": point_dict(m.point), "weight_qparams": _qparams_cfg(m.weight_qparams)}
    if isinstance(m, QuantLinear):
        out.update(in_features=m.in_features, out_features=m.out_features)
    else:
        out.update(
            stride=list(m.stride),
            padding=m.padding if isinstance(m.padding, str) else list(m.padding),
            dilation=list(m.dilation),
            groups=m.groups,
        )
    return out


_PLAIN = (str, int, float, bool, type(None))


def _cfg_plain_state(m: nn.Module) -> dict:
    """The int backend's modules: tensors are buffers (saved as tensors); the rest is plain
    attributes (labels, ranges, flags), saved as JSON values; anything else is refused."""
    attrs = {}
    declared = type(m).serial_schema.attrs
    for name, value in vars(m).items():
        if name.startswith("_") or name == "training":
            continue
        if name not in declared:
            raise SerializeError(
                f"attribute {name!r} of {type(m).__name__} is not in its @savable schema "
                f"(fxquant.runtime.savable), so a saved file could not be loaded; declare it there"
            )
        if not isinstance(value, _PLAIN):
            raise SerializeError(
                f"attribute {name!r} of {type(m).__name__} is a {type(value).__name__}; only plain values can be saved"
            )
        attrs[name] = value if not isinstance(value, float) else encode(value, name)
    return {"attrs": attrs, "none_buffers": [k for k, v in m._buffers.items() if v is None]}


#: describe functions of the config-layout modules (their schemas name the keys)
_CONFIG_CODECS: dict[str, Callable[[nn.Module], dict]] = {
    "fxquant.FakeQuantize": _cfg_fake,
    "fxquant.QuantLinear": _cfg_quant_weight,
    "fxquant.QuantConv2d": _cfg_quant_weight,
    "fxquant.FloatPoint": lambda m: {"point": point_dict(m.point), "post_scale": _post_scale(m)},
    "fxquant.LogIntSoftmax": lambda m: {
        "point": point_dict(m.point),
        "bits": m.bits,
        "dim": m.dim,
        "renormalize": m.renormalize,
    },
    "fxquant.LogBaseSoftmax": lambda m: {
        "point": point_dict(m.point),
        "bits": m.bits,
        "dim": m.dim,
        "renormalize": m.renormalize,
        "step_num": m.step_num,
        "step_den": m.step_den,
    },
}


def _describe_config(m: nn.Module) -> dict:
    key = type_key(type(m))
    if key not in _CONFIG_CODECS:
        raise SerializeError(
            f"{key} declares the 'config' layout, but fxquant.io.serial_table has no codec for it; "
            "declare it 'plain_state' (plain attributes and tensors) or add its codec there"
        )
    return _CONFIG_CODECS[key](m)


def _module_types() -> dict[str, tuple[type, Callable[[nn.Module], dict]]]:
    """type key -> (class, config of an instance): torch's float modules, then every savable
    runtime module (``fxquant.runtime.catalog``). Restoring is in ``_build_module``. Built once
    per state of the registry (a class registered later, e.g. by a test, gets a new table)."""
    return _table_for(tuple(registered().items()))


@lru_cache(maxsize=4)
def _table_for(runtime_types: tuple[tuple[str, type], ...]) -> dict[str, tuple[type, Callable[[nn.Module], dict]]]:
    table: dict[str, tuple[type, Callable]] = {
        "torch.nn.Linear": (nn.Linear, _cfg_linear),
        "torch.nn.Conv2d": (nn.Conv2d, _cfg_conv),
        "torch.nn.LayerNorm": (nn.LayerNorm, _cfg_layernorm),
        "torch.nn.GELU": (nn.GELU, lambda m: {"approximate": m.approximate}),
        "torch.nn.Dropout": (nn.Dropout, lambda m: {"p": m.p, "inplace": m.inplace}),
        "torch.nn.Identity": (nn.Identity, lambda m: {}),
        "torch.nn.Softmax": (nn.Softmax, lambda m: {"dim": m.dim}),
    }
    for key, cls in runtime_types:
        plain = cls.serial_schema.layout == "plain_state"
        table[key] = (cls, _cfg_plain_state if plain else _describe_config)
    try:
        from timm.layers.norm import LayerNorm as TimmLayerNorm

        table["timm.layers.LayerNorm"] = (
            TimmLayerNorm,
            lambda m: {**_cfg_layernorm(m), "fast_norm": bool(m._fast_norm)},
        )
    except ImportError:  # timm is optional; a file that needs it says so on load
        pass
    return table


def _type_key(module: nn.Module, table: dict, where: str) -> str:
    for key, (cls, _) in table.items():
        if type(module) is cls:
            return key
    raise SerializeError(
        f"{where}: module type {type(module).__module__}.{type(module).__qualname__} is not "
        f"supported by fxquant.io.serialize (NotImplemented); supported types: {sorted(table)}"
    )


def _plain_module(cls: type, c: Any, tensors: dict[str, torch.Tensor], where: str) -> nn.Module:
    if not isinstance(c, dict) or set(c) != {"attrs", "none_buffers"}:
        raise SerializeError(f"{where}: malformed fxquant.{cls.__name__} description")
    attrs, none_buffers = check_plain_state(cls.__name__, c["attrs"], c["none_buffers"], tensors, where)
    module = cls.__new__(cls)
    nn.Module.__init__(module)
    for name, value in attrs.items():
        setattr(module, name, value)
    for name in none_buffers:
        module.register_buffer(name, None)
    return module


def _qparams(c: Any, scale: torch.Tensor, zero_point: torch.Tensor, where: str) -> QParams:
    if not isinstance(c, dict) or set(c) != {"qmin", "qmax", "axis"}:
        raise SerializeError(f"{where}: malformed qparams description")
    qmin, qmax, axis = c["qmin"], c["qmax"], c["axis"]
    if type(qmin) is not int or type(qmax) is not int or not -(2**16) <= qmin < qmax <= 2**16:
        raise SerializeError(f"{where}: qparams range [{qmin!r:.20}, {qmax!r:.20}] is not an integer range")
    if (axis is None) != (scale.dim() == 0) or (axis is not None and (type(axis) is not int or abs(axis) > 8)):
        raise SerializeError(f"{where}: qparams axis {axis!r:.20} does not fit a scale of shape {list(scale.shape)}")
    try:
        return QParams(scale, zero_point, qmin, qmax, axis)
    except ValueError as exc:
        raise SerializeError(f"{where}: {exc}") from None


def _post_scale_from(value: Any, where: str) -> float:
    value = decode(value, None, where)
    if type(value) not in (int, float) or value != value or abs(value) == float("inf"):
        raise SerializeError(f"{where}: post_scale must be a finite number, got {value!r:.40}")
    return value


def _fake_module(key: str, cls: type, c: Any, tensors: dict[str, torch.Tensor], where: str) -> nn.Module:
    """FakeQuantize, QuantLinear, QuantConv2d, LogIntSoftmax and FloatPoint from their configs."""
    kind = cls.__name__
    keys = set(cls.serial_schema.attrs)
    if not isinstance(c, dict) or set(c) != keys:
        raise SerializeError(f"{where}: a {key} description has exactly the keys {sorted(keys)}")
    sizes = {k: c[k] for k in ("in_features", "out_features") if k in c}
    check_tensors(kind, tensors, sizes, where)
    module = cls.__new__(cls)
    nn.Module.__init__(module)
    module.point = point_from(c["point"], where)
    if key == "fxquant.FakeQuantize":
        module.qparams = _qparams(c["qparams"], tensors["#qparams.scale"], tensors["#qparams.zero_point"], where)
        if c["method"] != "uniform" and c["method"] not in RESOLVED_LOG_METHODS:
            raise SerializeError(f"{where}: unknown method {c['method']!r:.40}")
        if not (
            torch.equal(tensors["scale"], module.qparams.scale)
            and torch.equal(tensors["zero_point"], module.qparams.zero_point)
        ):
            raise SerializeError(f"{where}: the scale/zero_point buffers differ from the quantization parameters")
        module.method, module.post_scale = c["method"], _post_scale_from(c["post_scale"], where)
    elif key == "fxquant.FloatPoint":
        module.post_scale = _post_scale_from(c["post_scale"], where)
    elif key in ("fxquant.LogIntSoftmax", "fxquant.LogBaseSoftmax"):
        if (
            type(c["bits"]) is not int
            or not 2 <= c["bits"] <= 16
            or type(c["dim"]) is not int
            or abs(c["dim"]) > 8
            or type(c["renormalize"]) is not bool
        ):
            raise SerializeError(f"{where}: malformed LogIntSoftmax description (bits, dim, renormalize)")
        module.bits, module.dim, module.renormalize = c["bits"], c["dim"], c["renormalize"]
        if key == "fxquant.LogBaseSoftmax":
            step = (c["step_num"], c["step_den"])
            if not all(type(v) is int and 1 <= v <= 16 for v in step):
                raise SerializeError(f"{where}: malformed LogBaseSoftmax description (step_num, step_den)")
            module.step_num, module.step_den = step
    else:
        module.weight_qparams = _qparams(
            c["weight_qparams"], tensors["#weight_qparams.scale"], tensors["#weight_qparams.zero_point"], where
        )
        expected = _codes_dtype(module.weight_qparams)
        if tensors["weight_codes"].dtype != expected:
            raise SerializeError(
                f"{where}: tensor 'weight_codes' is {tensors['weight_codes'].dtype}; the range "
                f"[{module.weight_qparams.qmin}, {module.weight_qparams.qmax}] is stored as {expected}"
            )
        rows = tensors["weight_codes"].shape[0]
        if tensors["#weight_qparams.scale"].numel() not in (1, rows) or (
            "bias" in tensors and tensors["bias"].shape != (rows,)
        ):
            raise SerializeError(f"{where}: weight scales or bias do not match the {rows} output channels")
        if key == "fxquant.QuantLinear":
            module.in_features, module.out_features = c["in_features"], c["out_features"]
        else:
            _conv_geometry(module, c, tensors["weight_codes"], where)
        module.register_parameter("bias", None)
    return module


def _conv_geometry(module: nn.Module, c: dict, codes: torch.Tensor, where: str) -> None:
    def pair(key: str, low: int) -> tuple[int, int]:
        value = c[key]
        if (
            not isinstance(value, list)
            or len(value) != 2
            or not all(type(v) is int and low <= v <= 4096 for v in value)
        ):
            raise SerializeError(f"{where}: conv {key} must be two integers >= {low}, got {value!r:.40}")
        return tuple(value)

    module.stride, module.dilation = pair("stride", 1), pair("dilation", 1)
    module.padding = c["padding"] if c["padding"] in ("same", "valid") else pair("padding", 0)
    if type(c["groups"]) is not int or c["groups"] < 1 or codes.shape[0] % c["groups"]:
        raise SerializeError(f"{where}: conv groups {c['groups']!r:.20} do not divide {codes.shape[0]} channels")
    module.groups = c["groups"]


def _build_module(key: Any, c: Any, tensors: dict[str, tuple[str, torch.Tensor]], where: str) -> nn.Module:
    """The module a file entry describes, checked against its schema before anything is allocated."""
    table = _module_types()
    if not isinstance(key, str) or key not in table:
        raise SerializeError(
            f"{where}: module type {key!r:.80} is not supported by this fxquant (supported: {sorted(table)})"
        )
    if key in FLOAT_BUILDERS:
        module = FLOAT_BUILDERS[key](c, where)  # on the meta device: allocates nothing
        check_float_tensors(module, tensors, where)
        return module
    cls, _ = table[key]
    plain = {name: t for name, (_, t) in tensors.items()}
    if table[key][1] is _cfg_plain_state:
        return _plain_module(cls, c, plain, where)
    return _fake_module(key, cls, c, plain, where)


def _module_tensors(module: nn.Module) -> dict[str, tuple[str, torch.Tensor]]:
    """local name -> (kind, tensor) for the module's own parameters, buffers and QParams tensors."""
    out: dict[str, tuple[str, torch.Tensor]] = {}
    for name, param in module._parameters.items():
        if param is not None:
            out[name] = ("param" if param.requires_grad else "param_nograd", param)
    for name, buf in module._buffers.items():
        if buf is not None:
            persistent = name not in module._non_persistent_buffers_set
            out[name] = ("buffer" if persistent else "buffer_np", buf)
    if isinstance(module, FakeQuantize):
        out["#qparams.scale"] = ("qparams", module.qparams.scale)
        out["#qparams.zero_point"] = ("qparams", module.qparams.zero_point)
    if isinstance(module, (QuantLinear, QuantConv2d)):
        out["#weight_qparams.scale"] = ("qparams", module.weight_qparams.scale)
        out["#weight_qparams.zero_point"] = ("qparams", module.weight_qparams.zero_point)
    return out


def _attach(module: nn.Module, name: str, kind: str, tensor: torch.Tensor, where: str) -> None:
    if kind == "qparams":
        return
    if kind in ("param", "param_nograd"):
        module._buffers.pop(name, None)
        if name in module.__dict__:
            delattr(module, name)
        module._parameters[name] = nn.Parameter(tensor, requires_grad=(kind == "param"))
    elif kind in ("buffer", "buffer_np"):
        module._parameters.pop(name, None)
        if name in module.__dict__:
            delattr(module, name)
        module.register_buffer(name, tensor, persistent=(kind == "buffer"))
    else:
        raise SerializeError(f"{where}: unknown tensor kind {kind!r} for '{name}'")
