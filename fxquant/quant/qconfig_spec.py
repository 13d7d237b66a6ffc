"""One qconfig spec section (``{bits: 8, observer_type: OmseObserver, ...}``) parsed into a QuantSpec.

Accepts the seed's keys and its predecessor's aliases (``calibration_mode`` / ``granularity``,
``observer_type`` / ``observer``...). Observer names come from the observer registry
(:mod:`fxquant.quant.observers.registry`), so a newly registered observer is accepted here
without editing this module, and each observer's ``check_spec`` refuses specs it cannot
serve. Every error names the source, the key path and the allowed values.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

from fxquant.errors import QConfigError
from fxquant.quant.observers import observer_class, registered_observers
from fxquant.quant.spec import QuantSpec

__all__ = ["parse_spec", "SPEC_KEYS", "expect_kind", "qconfig_error"]

_METHODS = {"uniform": "uniform", "log2": "log2", "log_sqrt2": "log_sqrt2", "log_adaptive": "log_adaptive"}
_GRANULARITY_KEYS = ("calibration_mode", "granularity")
_OBSERVER_KEYS = ("observer_type", "observer")
_METHOD_KEYS = ("quantization_method", "method")
_ENABLE_KEYS = ("enable", "quant_enable", "output_quant_enable", "weight_quant_enable")
_FLOAT_OPTIONS = {
    "percentile_alpha": (0.5, 1.0),
    "percentile_sigma": (0.0, 1.0),
    "ema_momentum": (0.0, 1.0),
}
# omse_steps <= 2000: a shrink step of 0.05% of the range (an 8-bit grid step is 0.4%); the search
# costs steps x samples (up to 2**20): ~1.5 s per observer at the maximum. kl_bins: a histogram row
# per group; a KL candidate costs O(levels) whatever the bins (fxquant.quant.observers.kl).
_INT_OPTIONS = {"kl_bins": (16, 1 << 16), "omse_steps": (1, 2000), "ptf_factors": (1, 8)}
_OPTION_HINTS = {"omse_steps": "finer shrink factors no longer change the chosen range but cost time"}
SPEC_KEYS = (
    ("bits", "signed", "symmetric", "bit_type", "enable_profiler", "lis_renormalize")
    + _GRANULARITY_KEYS
    + _OBSERVER_KEYS
    + _METHOD_KEYS
    + _ENABLE_KEYS
    + tuple(_FLOAT_OPTIONS)
    + tuple(_INT_OPTIONS)
)


def qconfig_error(source: str, path: str, message: str) -> QConfigError:
    """The error for a bad value at key path ``path`` of ``source`` (a file, a preset, ``<dict>``)."""
    return QConfigError(f"{source}: {path}: {message}")


_KIND_ALLOWED = {bool: "true, false", int: "an integer", float: "a number", str: "a string"}


def expect_kind(value: Any, kind: type, source: str, path: str, allowed: Optional[str] = None) -> Any:
    """``value`` if it is a ``kind`` (bool is no number; an int is a float), else a QConfigError."""
    ok = isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        ok, value = True, float(value)
    if not ok:
        raise qconfig_error(
            source,
            path,
            f"expected {kind.__name__}, got {type(value).__name__} {value!r}; "
            f"allowed: {allowed or _KIND_ALLOWED.get(kind, kind.__name__)}",
        )
    return value


def _bits(value: Any, source: str, path: str) -> int:
    bits = expect_kind(value, int, source, path, _BITS_ALLOWED)
    if not 2 <= bits <= 16:
        raise qconfig_error(source, path, f"{bits} is not allowed; allowed: {_BITS_ALLOWED}")
    return bits


_BITS_ALLOWED = "an integer in 2..16"


def _observer(value: Any, source: str, path: str) -> str:
    """A registered observer's name, given as ``minmax``, ``MinmaxObserver``... in any case."""
    names = registered_observers()
    key = value.lower() if isinstance(value, str) else ""
    if key.endswith("observer"):
        key = key[: -len("observer")]
    if key not in names:
        allowed = ", ".join(f"{name.capitalize()}Observer" for name in names)
        raise qconfig_error(
            source,
            path,
            f"{value!r} is not allowed; allowed: {allowed} (case-insensitive; the bare names "
            f"{', '.join(names)} also work; an observer of your own needs @register_observer)",
        )
    return key


def _choice(value: Any, table: Mapping[str, str], source: str, path: str, allowed: str) -> str:
    key = str(value).lower()
    if not isinstance(value, str) or key not in table:
        raise qconfig_error(source, path, f"{value!r} is not allowed; allowed: {allowed}")
    return table[key]


def parse_spec(raw: Mapping[str, Any], source: str, path: str) -> QuantSpec:
    """One spec section in the seed's (or its predecessor's) keys -> QuantSpec."""
    if not isinstance(raw, Mapping):
        raise qconfig_error(source, path, f"expected a mapping of spec keys, got {type(raw).__name__}")
    fields: dict[str, Any] = {}
    options: dict[str, Any] = {}
    for key, value in raw.items():
        where = f"{path}.{key}"
        if key == "bits":
            fields["bits"] = _bits(value, source, where)
        elif key in ("signed", "symmetric", "enable_profiler", "lis_renormalize") or key in _ENABLE_KEYS:
            flag = expect_kind(value, bool, source, where)
            if key in _ENABLE_KEYS:
                fields["enabled"] = flag
            elif key in ("enable_profiler", "lis_renormalize"):
                options[key] = flag
            else:
                fields[key] = flag
        elif key == "bit_type":
            fields.update(_parse_bit_type(value, source, where))
        elif key in _GRANULARITY_KEYS:
            allowed = ("layer_wise", "channel_wise", "head_wise", "group_wise")
            fields["granularity"] = _choice(value, {a: a for a in allowed}, source, where, ", ".join(allowed))
        elif key in _OBSERVER_KEYS:
            fields["observer"] = _observer(value, source, where)
        elif key in _METHOD_KEYS:
            fields["method"] = _choice(value, _METHODS, source, where, ", ".join(_METHODS))
        elif key in _FLOAT_OPTIONS:
            lo, hi = _FLOAT_OPTIONS[key]
            number = expect_kind(value, float, source, where, f"a number in [{lo}, {hi}]")
            if not lo <= number <= hi:
                raise qconfig_error(source, where, f"{number} is outside [{lo}, {hi}]")
            options[key] = number
        elif key in _INT_OPTIONS:
            lo, hi = _INT_OPTIONS[key]
            number = expect_kind(value, int, source, where, f"an integer in [{lo}, {hi}]")
            if not lo <= number <= hi:
                hint = f" ({_OPTION_HINTS[key]})" if key in _OPTION_HINTS and number > hi else ""
                raise qconfig_error(source, where, f"{number} is outside [{lo}, {hi}]{hint}")
            options[key] = number
        else:
            raise qconfig_error(source, where, f"unknown key; allowed keys: {', '.join(SPEC_KEYS)}")
    try:
        spec = QuantSpec(options=options, **fields)
        observer_class(spec.observer).check_spec(spec)
        return spec
    except ValueError as exc:
        raise qconfig_error(source, path, str(exc)) from None


def _parse_bit_type(value: Any, source: str, path: str) -> dict:
    if not isinstance(value, Mapping):
        raise qconfig_error(source, path, "expected a mapping with keys bits, symmetric, name")
    out: dict[str, Any] = {}
    for key, item in value.items():
        where = f"{path}.{key}"
        if key == "bits":
            out["bits"] = _bits(item, source, where)
        elif key == "symmetric":
            out["symmetric"] = expect_kind(item, bool, source, where)
        elif key == "name":
            name = expect_kind(item, str, source, where).lower()
            if not (name.startswith("int") or name.startswith("uint")):
                raise qconfig_error(
                    source, where, f"{item!r} is not allowed; allowed: intN or uintN (e.g. int8, uint8)"
                )
            out["signed"] = not name.startswith("uint")
            digits = name.lstrip("uint")
            if digits.isdigit() and "bits" not in out:
                out["bits"] = int(digits)
        else:
            raise qconfig_error(source, where, "unknown key; allowed keys: bits, symmetric, name")
    return out
