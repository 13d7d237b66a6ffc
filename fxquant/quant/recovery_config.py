"""The qconfig's accuracy-recovery keys (``gptq:``, ``rotate:``), parsed and validated.

``gptq: true`` turns GPTQ on with the defaults; ``gptq: {damp: 0.01, act_order: true,
group_size: null, block_size: 128}`` sets them (any subset); ``gptq: false`` / ``null``
turns it off (also over a preset that ``extends`` from one with it on). ``rotate: true``
rotates the residual stream and every attention head; ``rotate: {residual: true, heads:
true, fc2: false, seed: 0}`` chooses. Unknown keys fail naming the key and the allowed ones, like the
rest of the qconfig. ``bias_correction: true`` corrects each quantized layer's mean output;
``reparameterize: true`` gives post-LayerNorm activations per-channel grids (RepQ-ViT).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping, Optional

from fxquant.errors import QConfigError

RECOVERY_KEYS = ("gptq", "rotate", "bias_correction", "reparameterize")


@dataclass(frozen=True)
class GptqConfig:
    """GPTQ settings: ``damp`` times the mean of diag(H) is added to H's diagonal;
    ``act_order`` quantizes columns by decreasing diag(H); ``group_size`` (input columns per
    scale; None = one scale per output channel); ``block_size`` columns per lazy batch update."""

    damp: float = 0.01
    act_order: bool = True
    group_size: Optional[int] = None
    block_size: int = 128


GPTQ_KEYS = tuple(GptqConfig.__dataclass_fields__)


@dataclass(frozen=True)
class RotateConfig:
    """``residual``: rotate the residual stream (a seeded random orthogonal matrix that keeps
    the channel mean, folded into every writer and reader); ``heads``: rotate Q/K and V/proj
    of every attention head (randomized Hadamard, folded into their weights); ``fc2``: an
    online block Hadamard transform on fc2's input (the GELU output), its inverse folded into
    fc2's weight; ``seed``."""

    residual: bool = True
    heads: bool = True
    fc2: bool = False
    seed: int = 0


ROTATE_KEYS = tuple(RotateConfig.__dataclass_fields__)


def parse_rotate(value: Any, source: str) -> Optional[RotateConfig]:
    if value is None or value is False:
        return None
    if value is True:
        return RotateConfig()
    if not isinstance(value, Mapping):
        raise _fail(source, "rotate", f"expected true, false or a mapping with keys {', '.join(ROTATE_KEYS)}")
    out: dict[str, Any] = {}
    for key, item in value.items():
        path = f"rotate.{key}"
        if key not in ROTATE_KEYS:
            raise _fail(source, path, f"unknown key; allowed keys: {', '.join(ROTATE_KEYS)}")
        if key == "seed":
            if isinstance(item, bool) or not isinstance(item, int) or item < 0:
                raise _fail(source, path, f"expected a non-negative integer, got {item!r}")
        elif not isinstance(item, bool):
            raise _fail(source, path, f"expected true or false, got {item!r}")
        out[key] = item
    config = RotateConfig(**out)
    if not (config.residual or config.heads or config.fc2):
        raise _fail(source, "rotate", "residual, heads and fc2 are all false: write `rotate: false` to turn it off")
    return config


def _fail(source: str, path: str, message: str) -> QConfigError:
    return QConfigError(f"{source}: {path}: {message}")


def parse_gptq(value: Any, source: str) -> Optional[GptqConfig]:
    if value is None or value is False:
        return None
    if value is True:
        return GptqConfig()
    if not isinstance(value, Mapping):
        raise _fail(source, "gptq", f"expected true, false or a mapping with keys {', '.join(GPTQ_KEYS)}")
    out: dict[str, Any] = {}
    for key, item in value.items():
        path = f"gptq.{key}"
        if key not in GPTQ_KEYS:
            raise _fail(source, path, f"unknown key; allowed keys: {', '.join(GPTQ_KEYS)}")
        if key == "damp":
            if isinstance(item, bool) or not isinstance(item, (int, float)) or not 0.0 <= float(item) <= 1.0:
                raise _fail(source, path, f"expected a number in [0, 1], got {item!r}")
            out[key] = float(item)
        elif key == "act_order":
            if not isinstance(item, bool):
                raise _fail(source, path, f"expected true or false, got {item!r}")
            out[key] = item
        elif key == "group_size":
            if item is not None and (isinstance(item, bool) or not isinstance(item, int) or item < 1):
                raise _fail(source, path, f"expected a positive integer or null, got {item!r}")
            out[key] = item
        else:  # block_size
            if isinstance(item, bool) or not isinstance(item, int) or item < 1:
                raise _fail(source, path, f"expected a positive integer, got {item!r}")
            out[key] = item
    return GptqConfig(**out)


def _switch(key: str):
    def parse(value: Any, source: str) -> Optional[bool]:
        if value is None or value is False:
            return None
        if value is True:
            return True
        raise _fail(source, key, f"expected true or false, got {value!r}")

    return parse


def pop_recovery(raw: dict, source: str, base: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """Remove the recovery keys from ``raw`` (a qconfig mapping) and return them parsed;
    a key ``raw`` does not set is inherited from ``base`` (the ``extends`` target's)."""
    out = dict(base or {})
    parsers = (
        ("gptq", parse_gptq),
        ("rotate", parse_rotate),
        ("bias_correction", _switch("bias_correction")),
        ("reparameterize", _switch("reparameterize")),
    )
    for key, parse in parsers:
        if key in raw:
            parsed = parse(raw.pop(key), source)
            if parsed is None:
                out.pop(key, None)
            else:
                out[key] = parsed
    return out


def recovery_to_dict(recovery: Mapping[str, Any]) -> dict[str, Any]:
    """The keys as a qconfig file writes them (``to_dict``'s counterpart of :func:`pop_recovery`)."""
    return {key: value if isinstance(value, bool) else asdict(value) for key, value in recovery.items()}
