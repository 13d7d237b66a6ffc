"""One setting of the predecessor (``BicMak/Quant_trainning``) as an fxquant spec section.

The predecessor wrote a setting as ``{calibration_mode, bit_type: {bits, symmetric | signed,
name}, observer_type, quantization_method, percentile_alpha, percentile_sigma, kl_bins,
enable_profiler, output_quant_enable}`` and filled a missing key with its loader's default.
What a setting did depended on the module that read it, its *role* here: a Linear's weight or
output, a token activation of shape (B, N, C), the attention scores, the softmax, a LayerNorm's
output, the embedding's output. :func:`translate_spec` gives the fxquant spec section that
quantizes the same way and a :class:`Note` per key saying how it was mapped; a note with
``differs`` is where fxquant does something else than the predecessor did, and loading warns
about it (:mod:`fxquant.quant.legacy_formats`); ``fxquant convert-config`` writes every note as a
comment.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

from fxquant.quant.observers import registered_observers
from fxquant.quant.qconfig_spec import expect_kind, parse_spec, qconfig_error

__all__ = ["Note", "translate_spec", "PREDECESSOR_KEYS", "ROLES", "is_predecessor_setting"]

# what each predecessor module did with its setting
WEIGHT, OUTPUT, TOKENS, SCORES, SOFTMAX, NORM, ACTIVATION, EMBED = (
    "weight",
    "output",
    "tokens",
    "scores",
    "softmax",
    "norm",
    "activation",
    "embed",
)
ROLES = (WEIGHT, OUTPUT, TOKENS, SCORES, SOFTMAX, NORM, ACTIVATION, EMBED)

PREDECESSOR_KEYS = (
    "calibration_mode",
    "bit_type",
    "observer_type",
    "quantization_method",
    "percentile_alpha",
    "percentile_sigma",
    "kl_bins",
    "enable_profiler",
    "output_quant_enable",
)
# keys its files held that its loaders never read: a misspelling in its own history
NEVER_READ = {"kv_bins": "a misspelling of kl_bins in its early files"}
BIT_TYPE_KEYS = ("bits", "symmetric", "signed", "name")
MODES = ("layer_wise", "channel_wise", "head_wise")
OBSERVERS = {"minmax": "MinmaxObserver", "percentile": "PercentileObserver", "omse": "OmseObserver", "kl": "KLObserver"}
METHODS = {"uniform": "uniform", "log2": "log2"}
DEFAULTS = {
    "calibration_mode": "layer_wise",
    "observer_type": "PercentileObserver",
    "quantization_method": "Uniform",
    "percentile_alpha": 0.95,
}
DEFAULT_SIGMA, DEFAULT_KL_BINS = 0.01, 2048


@dataclass(frozen=True)
class Note:
    """How one predecessor key was read: ``file: key: text``; ``target`` is the fxquant key path
    of its setting (None: none); ``differs``: fxquant does something else there (a warning)."""

    file: str
    key: str
    text: str
    target: Optional[str] = None
    differs: bool = False
    dropped: bool = False  # the key itself has no fxquant counterpart


def is_predecessor_setting(raw: Any) -> bool:
    """Written the way the predecessor's per-part files write a setting: ``bit_type`` and
    ``enable_profiler`` present, no key of fxquant's own."""
    return (
        isinstance(raw, Mapping)
        and isinstance(raw.get("bit_type"), Mapping)
        and "enable_profiler" in raw
        and all(key in PREDECESSOR_KEYS or key in NEVER_READ for key in raw)
    )


class _Reader:
    def __init__(self, raw: Mapping[str, Any], file: str, where: str, target: Optional[str]):
        self.raw, self.file, self.where, self.target = raw, file, where, target
        self.notes: list[Note] = []
        self.covered: set[str] = set()  # the keys of ``raw`` a note speaks for

    def note(self, key: str, text: str, differs: bool = False, dropped: bool = False) -> None:
        self.covered.add(key.split(".")[0])
        self.notes.append(Note(self.file, f"{self.where}.{key}", text, self.target, differs, dropped))

    def choice(self, key: str, table: Mapping[str, str], allowed: str) -> str:
        value = self.raw.get(key, DEFAULTS.get(key))
        found = table.get(value.lower()) if isinstance(value, str) else None
        if found is None:
            raise qconfig_error(self.file, f"{self.where}.{key}", f"{value!r} is not allowed; allowed: {allowed}")
        return found

    def bit_type(self) -> tuple[int, bool]:
        raw = self.raw.get("bit_type", {}) or {}
        where = f"{self.where}.bit_type"
        if not isinstance(raw, Mapping):
            raise qconfig_error(self.file, where, f"expected a mapping with keys {', '.join(BIT_TYPE_KEYS)}")
        for key in raw:
            if key not in BIT_TYPE_KEYS:
                raise qconfig_error(
                    self.file, f"{where}.{key}", f"unknown key; allowed keys: {', '.join(BIT_TYPE_KEYS)}"
                )
        bits = expect_kind(raw.get("bits", 8), int, self.file, f"{where}.bits", "an integer in 2..16")
        if not 2 <= bits <= 16:
            raise qconfig_error(self.file, f"{where}.bits", f"{bits} is not allowed; allowed: an integer in 2..16")
        sign_key = "symmetric" if "symmetric" in raw else "signed"
        signed = expect_kind(raw.get(sign_key, True), bool, self.file, f"{where}.{sign_key}")
        name = raw.get("name")
        if name is not None:
            digits = "".join(ch for ch in str(name) if ch.isdigit())
            if digits and int(digits) != bits:
                self.note(
                    "bit_type.name",
                    f"{name!r} names {digits} bits but the predecessor quantized with bits ({bits}) and only "
                    f"printed the name; fxquant uses {bits} bits",
                    differs=True,
                )
        grid = "symmetric around 0" if signed else "unsigned, with a zero point"
        self.note("bit_type", f"-> bits: {bits}, signed: {str(signed).lower()} ({grid})")
        return bits, signed


def _granularity(reader: _Reader, mode: str, role: str) -> str:
    """The fxquant granularity that scales the same elements together, for this role."""
    if mode == "layer_wise":
        return mode
    if role == TOKENS:
        reader.note(
            "calibration_mode",
            f"{mode}: the predecessor gave each of the C = heads x head_dim channels of the (B, N, C) "
            "tensor its own scale; fxquant quantizes this tensor per head (B, heads, N, head_dim), where "
            "channel_wise is not defined: loaded as head_wise (one scale per head)",
            differs=True,
        )
        return "head_wise"
    if role == SCORES:
        reader.note("calibration_mode", f"{mode}: per head of the (B, heads, N, N) scores -> head_wise")
        return "head_wise"
    if role == NORM:
        reader.note(
            "calibration_mode",
            f"{mode}: the predecessor's QLayerNorm replaced the per-channel scales by their mean (power-of-two "
            "factors only when given a calibration loader); fxquant: layer_wise, one scale from the observer",
            differs=True,
        )
        return "layer_wise"
    if role == EMBED:
        reader.note(
            "calibration_mode",
            f"{mode}: per channel of the (B, N, C) embedding; fxquant's patch_embed.output is the "
            "convolution's (B, C, H, W) output, scaled per channel C (axis 1): the same C scales",
        )
        return "channel_wise"
    if mode == "head_wise":  # a Linear weight, or a QAct built without num_heads: one scale per channel
        reader.note("calibration_mode", "head_wise: the predecessor had no heads here and scaled per channel")
    return "channel_wise"


def _observer_options(reader: _Reader, observer: str, out: dict) -> None:
    raw = reader.raw
    if observer == "percentile":
        out["percentile_alpha"] = expect_kind(
            raw.get("percentile_alpha", DEFAULTS["percentile_alpha"]),
            float,
            reader.file,
            f"{reader.where}.percentile_alpha",
        )
        sigma = expect_kind(
            raw.get("percentile_sigma", DEFAULT_SIGMA), float, reader.file, f"{reader.where}.percentile_sigma"
        )
        kept = round(1.0 - sigma, 12)
        out["percentile_sigma"] = kept
        reader.note(
            "percentile_sigma",
            f"{sigma:g}: the predecessor moved the running range {sigma:g} of the way to each batch's; "
            f"fxquant's percentile_sigma is the share of the running range kept: loaded as {kept:g} "
            "(the same smoothing)",
            differs=True,
        )
    elif observer == "kl":
        out["kl_bins"] = expect_kind(raw.get("kl_bins", DEFAULT_KL_BINS), int, reader.file, f"{reader.where}.kl_bins")
    for key in ("percentile_alpha", "percentile_sigma", "kl_bins"):
        if key in raw and key not in out:
            reader.note(
                key, f"not read by the {OBSERVERS.get(observer, observer)} (nor by the predecessor's)", dropped=True
            )


def _observer(reader: _Reader) -> str:
    names = registered_observers()
    value = reader.raw.get("observer_type", DEFAULTS["observer_type"])
    key = value.lower() if isinstance(value, str) else ""
    key = key[: -len("observer")] if key.endswith("observer") else key
    if key not in names:
        allowed = ", ".join(dict.fromkeys([*OBSERVERS.values(), *(f"{n.capitalize()}Observer" for n in names)]))
        raise qconfig_error(
            reader.file, f"{reader.where}.observer_type", f"{value!r} is not allowed; allowed: {allowed}"
        )
    return key


def translate_spec(
    raw: Optional[Mapping[str, Any]], role: str, file: str, where: str, target: Optional[str]
) -> tuple[dict, list[Note]]:
    """The fxquant spec section for predecessor setting ``raw`` (at key path ``where`` of
    ``file``) read by a module of ``role``; ``target``: the fxquant key path it lands on."""
    raw = {} if raw is None else raw
    if not isinstance(raw, Mapping):
        raise qconfig_error(file, where, f"expected a mapping of the predecessor's keys, got {type(raw).__name__}")
    reader = _Reader(raw, file, where, target)
    for key in raw:
        if key in NEVER_READ:
            reader.note(key, f"never read by the predecessor ({NEVER_READ[key]}); dropped", dropped=True)
        elif key not in PREDECESSOR_KEYS:
            raise qconfig_error(file, f"{where}.{key}", f"unknown key; allowed keys: {', '.join(PREDECESSOR_KEYS)}")
    bits, signed = reader.bit_type()
    observer = _observer(reader)
    method = reader.choice("quantization_method", METHODS, "Uniform, Log2")
    mode = reader.choice("calibration_mode", {m: m for m in MODES}, ", ".join(MODES))
    enabled = expect_kind(raw.get("output_quant_enable", True), bool, file, f"{where}.output_quant_enable")
    if raw.get("enable_profiler"):
        reader.note(
            "enable_profiler",
            "True: fxquant has no per-layer profiler switch; its report measures every point "
            "(fxquant compile --html, fxquant diff)",
            differs=True,
            dropped=True,
        )
    if role == OUTPUT and not enabled:
        reader.note("output_quant_enable", "False: the predecessor left this output in float -> enable: false")
        _as_is(reader, "not used: the output stays in float", dropped=True)
        return _checked({"enable": False}, reader), reader.notes
    if not enabled:
        reader.note(
            "output_quant_enable",
            "False: the predecessor's module here never read it and quantized this tensor anyway; fxquant "
            "quantizes it too",
            differs=True,
            dropped=True,
        )
    if role == SOFTMAX:
        said = (method, observer, mode) != ("log2", "minmax", "layer_wise")
        reader.note(
            "quantization_method",
            f"{raw.get('quantization_method', 'Uniform')}: the predecessor's QuantIntSoft always quantized the "
            "probabilities as 2**-code with its Log2Quantizer (scale 1), whatever quantization_method, "
            "observer_type and calibration_mode say; fxquant: quantization_method log2, unsigned, layer_wise "
            "MinmaxObserver (scale = the largest probability seen)",
            differs=said,
        )
        _as_is(reader, "not used by the log2 softmax quantizer (see quantization_method)", dropped=True)
        return _checked({"bits": bits, "signed": False, "quantization_method": "log2"}, reader), reader.notes
    out: dict[str, Any] = {"bits": bits, "signed": signed, "calibration_mode": _granularity(reader, mode, role)}
    out["observer_type"] = OBSERVERS.get(observer, raw.get("observer_type"))
    out["quantization_method"] = method
    _observer_options(reader, observer, out)
    _as_is(reader)
    return _checked(out, reader), reader.notes


AS_IS = "as is"


def _as_is(reader: _Reader, text: str = AS_IS, dropped: bool = False) -> None:
    """A note for every key no other note speaks for: it kept its meaning (or, ``dropped``, its
    value no longer matters)."""
    for key in list(reader.raw):
        if key not in reader.covered:
            reader.note(key, text, dropped=dropped)


def _checked(out: dict, reader: _Reader) -> dict:
    parse_spec(out, reader.file, reader.where)  # what fxquant refuses (e.g. an alpha below 0.5), named here
    return out
