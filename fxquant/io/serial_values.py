"""The JSON form of the values a saved graph holds (node args, meta, module configs).

Plain JSON carries None, bool, int, float, str and lists; everything else is a tagged object
``{"$": tag, "v": body}``: tuples, dicts, slices, torch.Size, dtypes, devices, Ellipsis,
non-finite floats, graph nodes and quantization points. Decoding is strict: unknown tags,
integers beyond :data:`MAX_INT` and dtypes or devices outside a short list fail with a
:class:`SerializeError` naming where they were found.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.fx as fx

from fxquant.errors import FxqError
from fxquant.quant.observers import observer_class
from fxquant.quant.points import QuantPoint
from fxquant.quant.spec import QuantSpec


class SerializeError(FxqError):
    """A compiled model could not be saved, or a file could not be loaded."""


#: the largest integer magnitude a file may hold; shapes and indices stay far below it
MAX_INT = 2**40
#: dtypes a value (not a tensor) may name
DTYPES = ("float32", "float64", "float16", "bfloat16", "int8", "uint8", "int16", "int32", "int64", "bool")
#: devices a value may name (a loaded model runs on the CPU; the caller moves it)
DEVICES = ("cpu",)


def encode(value: Any, where: str) -> Any:
    """A Python value as JSON; tuples, dicts, slices, dtypes and non-finite floats are tagged."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"$": "float", "v": repr(value)}
    if isinstance(value, fx.Node):
        return {"$": "node", "v": value.name}
    if isinstance(value, list):
        return [encode(v, where) for v in value]
    if isinstance(value, torch.Size):
        return {"$": "size", "v": [int(v) for v in value]}
    if isinstance(value, tuple):
        return {"$": "tuple", "v": [encode(v, where) for v in value]}
    if isinstance(value, dict):
        return {"$": "dict", "v": [[encode(k, where), encode(v, where)] for k, v in value.items()]}
    if isinstance(value, slice):
        return {"$": "slice", "v": [encode(value.start, where), encode(value.stop, where), encode(value.step, where)]}
    if isinstance(value, torch.dtype):
        return {"$": "dtype", "v": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"$": "device", "v": str(value)}
    if value is Ellipsis:
        return {"$": "ellipsis"}
    if isinstance(value, QuantPoint):
        return {"$": "point", "v": point_dict(value)}
    raise SerializeError(
        f"{where}: a value of type {type(value).__module__}.{type(value).__qualname__} "
        f"({value!r:.80}) cannot be saved; supported: None, bool, int, float, str, list, "
        "tuple, dict, slice, torch.dtype, torch.device, graph nodes, QuantPoint"
    )


def decode(value: Any, nodes: Optional[dict[str, fx.Node]], where: str) -> Any:
    """The inverse of :func:`encode`; ``nodes`` resolves node references (None: none allowed).
    Its recursion is bounded by the document's depth limit (``fxquant.io.serial_read``)."""
    if value is None or isinstance(value, (bool, str, float)):
        return value
    if isinstance(value, int):
        if abs(value) > MAX_INT:
            raise SerializeError(f"{where}: integer {value:.3e} is beyond the bound of {MAX_INT:.3e}")
        return value
    if isinstance(value, list):
        return [decode(v, nodes, where) for v in value]
    if not isinstance(value, dict) or "$" not in value or not set(value) <= {"$", "v"}:
        raise SerializeError(f"{where}: malformed value {value!r:.80}")
    tag, body = value["$"], value.get("v")
    if tag == "node":
        if nodes is None or not isinstance(body, str) or body not in nodes:
            raise SerializeError(f"{where}: refers to node {body!r:.80}, which is not defined before it")
        return nodes[body]
    if tag in ("tuple", "size", "dict", "slice"):
        items = [decode(v, nodes, where) for v in as_list(body, where)]
        return _container(tag, items, where)
    if tag == "float":
        if body not in ("inf", "-inf", "nan"):
            raise SerializeError(f"{where}: malformed float {body!r:.80}")
        return float(body)
    if tag == "dtype":
        if body not in DTYPES:
            raise SerializeError(f"{where}: dtype {body!r:.40} is not one of {DTYPES}")
        return getattr(torch, body)
    if tag == "device":
        if body not in DEVICES:
            raise SerializeError(
                f"{where}: device {body!r:.40} is not allowed in a file (only {DEVICES}; "
                "move the loaded model with .to(...))"
            )
        return torch.device(body)
    if tag == "ellipsis":
        return Ellipsis
    if tag == "point":
        return point_from(body, where)
    raise SerializeError(f"{where}: unknown value tag {tag!r:.40}")


def _container(tag: str, items: list, where: str) -> Any:
    if tag == "tuple":
        return tuple(items)
    if tag == "size":
        if not all(type(v) is int and v >= 0 for v in items):
            raise SerializeError(f"{where}: a torch.Size holds non-negative integers, got {items!r:.80}")
        return torch.Size(items)
    if tag == "dict":
        if not all(isinstance(kv, list) and len(kv) == 2 for kv in items):
            raise SerializeError(f"{where}: a dict is a list of [key, value] pairs")
        try:
            return {k: v for k, v in items}
        except TypeError:
            raise SerializeError(f"{where}: a dict key must be a plain value") from None
    if len(items) != 3 or not all(v is None or type(v) is int or isinstance(v, fx.Node) for v in items):
        raise SerializeError(f"{where}: a slice is [start, stop, step] of integers, None or nodes")
    return slice(*items)


def as_list(body: Any, where: str) -> list:
    if not isinstance(body, list):
        raise SerializeError(f"{where}: expected a list, got {body!r:.80}")
    return body


def point_dict(point: QuantPoint) -> dict:
    spec = point.spec
    return {
        "group": point.group,
        "section": point.section,
        "module": point.module,
        "axis": point.axis,
        "num_groups": point.num_groups,
        "spec": {
            "bits": spec.bits,
            "signed": spec.signed,
            "symmetric": spec.symmetric,
            "granularity": spec.granularity,
            "observer": spec.observer,
            "method": spec.method,
            "options": encode(dict(spec.options), "QuantSpec.options"),
            "enabled": spec.enabled,
        },
    }


_POINT_KEYS = {"group", "section", "module", "axis", "num_groups", "spec"}
_SPEC_KEYS = {"bits", "signed", "symmetric", "granularity", "observer", "method", "options", "enabled"}


def point_from(raw: Any, where: str) -> QuantPoint:
    """A QuantPoint from its JSON form, every field type-checked (QuantSpec checks the values)."""
    where = f"{where}: quantization point"
    if not isinstance(raw, dict) or set(raw) != _POINT_KEYS:
        raise SerializeError(f"{where}: expected the keys {sorted(_POINT_KEYS)}")
    spec_raw = raw["spec"]
    if not isinstance(spec_raw, dict) or set(spec_raw) != _SPEC_KEYS:
        raise SerializeError(f"{where}: spec: expected the keys {sorted(_SPEC_KEYS)}")
    for key in ("group", "section", "module"):
        if not isinstance(raw[key], str) or len(raw[key]) > 256:
            raise SerializeError(f"{where}: {key} must be a string")
    if not raw["section"].isidentifier() or len(raw["section"]) > 32:
        raise SerializeError(f"{where}: section {raw['section']!r:.40} is not a section name")
    for key in ("axis", "num_groups"):
        if raw[key] is not None and (type(raw[key]) is not int or abs(raw[key]) > 64):
            raise SerializeError(f"{where}: {key} must be a small integer or null")
    for key in ("signed", "enabled"):
        if type(spec_raw[key]) is not bool:
            raise SerializeError(f"{where}: spec.{key} must be true or false")
    if spec_raw["symmetric"] is not None and type(spec_raw["symmetric"]) is not bool:
        raise SerializeError(f"{where}: spec.symmetric must be true, false or null")
    options = decode(spec_raw["options"], None, where)
    if not isinstance(options, dict) or not all(isinstance(k, str) for k in options):
        raise SerializeError(f"{where}: spec.options must be a dict with string keys")
    try:
        spec = QuantSpec(**{**spec_raw, "options": options})
        observer_class(spec.observer).check_spec(spec)  # ObserverError (a ValueError) names the registered ones
        return QuantPoint(
            group=raw["group"],
            section=raw["section"],
            spec=spec,
            module=raw["module"],
            axis=raw["axis"],
            num_groups=raw["num_groups"],
        )
    except (TypeError, ValueError) as exc:
        raise SerializeError(f"{where}: {exc}") from None
