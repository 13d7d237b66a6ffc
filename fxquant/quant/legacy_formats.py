"""The predecessor's config formats, recognised by their shape and read as fxquant qconfigs.

``BicMak/Quant_trainning``, the hand-written quantizer fxquant replaces, had three formats:

* **per-part files** (its last ``configs/``: ``attn_config.yaml``, ``mlp_config.yaml``,
  ``block_config.yaml``, ``head_config.yaml``): fxquant's group names plus ``residual1`` /
  ``residual2``, every setting written with ``bit_type`` and ``enable_profiler``; and the
  **global** file (``embed_config.yaml``): top-level ``outputs``, ``weight``, ``activation``,
  ``norm``, ``intsoft``, read by the module the file name says (embedding, attention, MLP);
* the **single file** ``quant_config_int8.yaml``: ``default``, ``layers``, ``attn_layer``,
  ``residual_layer``, with ``default`` filling every missing key and every missing name;
* the **split files** ``weight_config.yaml``, ``activation_config.yaml``,
  ``residual_config.yaml`` in one folder: the single file's sections, each file with its own
  ``default``; a name no file gives takes the first file's ``default``.

:func:`convert_file` and :func:`convert_directory` give a :class:`Conversion`: the equivalent
fxquant qconfig as a dict, and a :class:`~fxquant.quant.legacy_mapping.Note` per key;
:meth:`Conversion.warn` warns, once per file, where fxquant's meaning differs. What each name
quantizes is in :mod:`fxquant.quant.legacy_names`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from fxquant.errors import QConfigError
from fxquant.quant.legacy_mapping import Note, is_predecessor_setting, translate_spec
from fxquant.quant.legacy_names import (
    GLOBAL_KEYS,
    OLD_NAMES,
    PER_PART_GROUPS,
    SECTIONED_KEYS,
    allowed_names,
    global_targets,
    split_order,
)
from fxquant.quant.qconfig_groups import LINEAR_GROUPS, LINEAR_SECTIONS
from fxquant.quant.qconfig_spec import qconfig_error

__all__ = ["Conversion", "LegacyConfigWarning", "convert_file", "convert_directory", "shape_of"]


class LegacyConfigWarning(UserWarning):
    """A predecessor config was read where its meaning and fxquant's differ."""


@dataclass
class Conversion:
    """A predecessor config as an fxquant qconfig dict, with how each key was read."""

    source: str
    data: dict[str, Any]
    notes: list[Note] = field(default_factory=list)
    formats: dict[str, str] = field(default_factory=dict)  # file -> the format it was read as

    def warn(self) -> None:
        for file, fmt in self.formats.items():
            lines = _grouped([n for n in self.notes if n.differs and n.file == file])
            if lines:
                warnings.warn(
                    LegacyConfigWarning(
                        f"{file}: read as the predecessor's {fmt}; where fxquant differs:\n  " + "\n  ".join(lines)
                    ),
                    stacklevel=4,
                )


def _grouped(notes: list[Note]) -> list[str]:
    """One line per message: the keys that share it, then the message."""
    by_text: dict[str, list[str]] = {}
    for note in notes:
        keys = by_text.setdefault(note.text, [])
        if note.key not in keys:
            keys.append(note.key)
    return [f"{', '.join(keys)}: {text}" for text, keys in by_text.items()]


# ------------------------------------------------------------------------------ shapes
def shape_of(data: Any) -> Optional[str]:
    """``"sectioned"``, ``"global"``, ``"per-part"`` or None (fxquant's own schema)."""
    if not isinstance(data, Mapping) or not data:
        return None
    if any(key in data for key in SECTIONED_KEYS):
        return "sectioned"
    if "outputs" in data or "weight" in data:
        return "global"
    settings = []
    for body in data.values():
        if isinstance(body, Mapping) and set(body) and set(body) <= set(LINEAR_SECTIONS):
            settings += list(body.values())
        else:
            settings.append(body)
    return "per-part" if settings and all(is_predecessor_setting(s) for s in settings) else None


FORMAT_NAMES = {
    "sectioned": "single-file format (default, layers, attn_layer, residual_layer)",
    "global": "global format (outputs, weight, activation, norm, intsoft)",
    "per-part": "per-part format (residual1/residual2, bit_type, enable_profiler)",
    "split": "split-file format (weight/activation/residual files with their own default)",
}


# ---------------------------------------------------------------------------- readers
def _put(groups: dict, target: str, spec: dict) -> None:
    group, _, section = target.partition(".")
    if section:
        groups.setdefault(group, {})[section] = spec
    else:
        groups[group] = spec


def _per_part(data: Mapping, file: str, groups: dict, notes: list[Note]) -> None:
    for name, body in data.items():
        if name not in PER_PART_GROUPS:
            raise qconfig_error(
                file, str(name), f"unknown group; the predecessor's per-part groups are: {', '.join(PER_PART_GROUPS)}"
            )
        role = PER_PART_GROUPS[name]
        if name in LINEAR_GROUPS:
            if not isinstance(body, Mapping) or set(body) != set(LINEAR_SECTIONS):
                raise qconfig_error(file, str(name), "a Linear's setting has exactly two sections: weight and output")
            for section in LINEAR_SECTIONS:
                target = f"{name}.{section}"
                spec, more = translate_spec(body[section], section, file, target, target)
                _put(groups, target, spec)
                notes += more
        else:
            spec, more = translate_spec(body, role, file, str(name), str(name))
            _put(groups, str(name), spec)
            notes += more


def _global(data: Mapping, file: str, groups: dict, notes: list[Note]) -> None:
    for key in data:
        if key not in GLOBAL_KEYS:
            raise qconfig_error(file, str(key), f"unknown key; the global format has: {', '.join(GLOBAL_KEYS)}")
    for key in ("outputs", "weight"):
        if not data.get(key):
            raise qconfig_error(file, key, "the predecessor's global format needs both outputs and weight")
    part, targets = global_targets(Path(file).stem, data)
    notes.append(Note(file, "<file>", f"read by the predecessor's {part} module (its file name says so)"))
    for key in GLOBAL_KEYS:
        if key not in data:
            continue
        used = [(target, role, note) for source, target, role, note in targets if source == key]
        if not used:
            why = f"never read by the predecessor's {part} module"
            if key == "weight" and part == "embedding":
                why += ": the patch projection's weights stayed float, as patch_embed.weight does here"
            notes.append(Note(file, key, f"{why}; dropped"))
            continue
        for target, role, note in used:
            spec, more = translate_spec(data[key], role, file, key, target)
            _put(groups, target, spec)
            notes.append(Note(file, key, note or f"-> {target}", target, differs=bool(note)))
            notes += more


def _merged(default: Mapping, body: Mapping) -> dict:
    """``body`` over ``default`` key by key, ``bit_type`` merged one level down (as the predecessor)."""
    out = {**default, **body}
    if isinstance(default.get("bit_type"), Mapping) and isinstance(body.get("bit_type"), Mapping):
        out["bit_type"] = {**default["bit_type"], **body["bit_type"]}
    return out


def _sections(data: Mapping, file: str) -> tuple[Mapping, dict[str, tuple[str, Mapping]]]:
    """(default, name -> (section, setting)) of one single-format file."""
    for key in data:
        if key not in SECTIONED_KEYS:
            raise qconfig_error(file, str(key), f"unknown key; allowed: {', '.join(SECTIONED_KEYS)}")
    default = data.get("default") or {}
    if not isinstance(default, Mapping):
        raise qconfig_error(file, "default", "expected a mapping of the predecessor's keys")
    names: dict[str, tuple[str, Mapping]] = {}
    for section in SECTIONED_KEYS[1:]:
        body = data.get(section) or {}
        if not isinstance(body, Mapping):
            raise qconfig_error(file, section, "expected a mapping of layer names")
        for name, setting in body.items():
            if name not in OLD_NAMES:
                raise qconfig_error(
                    file, f"{section}.{name}", f"unknown name; the predecessor's names: {allowed_names()}"
                )
            if name in names:
                raise qconfig_error(file, f"{section}.{name}", f"already given in {names[name][0]}")
            if setting:  # an empty entry meant "use default"
                names[name] = (section, setting)
    return default, names


def _sectioned(parts: list[tuple[str, Mapping]], groups: dict, notes: list[Note]) -> None:
    """The single file (one part) or the split files (several): every one of the predecessor's
    block names gets a setting, from its file merged over that file's default, else the first
    file's default."""
    first_default: Optional[Mapping] = None
    given: dict[str, tuple[str, str, Mapping]] = {}  # name -> (file, key path, setting)
    for file, data in parts:
        default, names = _sections(data, file)
        if first_default is None:
            first_default = default
            translate_spec(default, "activation", file, "default", None)  # a bad default fails here
        own_default = default or first_default
        for name, (section, setting) in names.items():
            if name in given:
                raise qconfig_error(file, f"{section}.{name}", f"already given in {given[name][0]}")
            if not isinstance(setting, Mapping):
                raise qconfig_error(file, f"{section}.{name}", "expected a mapping of the predecessor's keys")
            given[name] = (file, f"{section}.{name}", _merged(own_default, setting))
    first_file = parts[0][0]
    for name, (_section, targets, twice) in OLD_NAMES.items():
        file, where, setting = given.get(name, (first_file, f"default (for {name})", first_default or {}))
        for target, role, what in targets:
            spec, more = translate_spec(setting, role, file, where, target)
            _put(groups, target, spec)
            origin = "" if name in given else f"; {name} is not given, so the predecessor used default"
            notes.append(Note(file, where, f"-> {target} ({what}{origin})", target))
            notes += more
        if twice:
            notes.append(Note(file, where, twice, None, differs=True))


READERS: dict[str, Callable] = {"per-part": _per_part, "global": _global}


def convert_file(path: Path, data: Any) -> Optional[Conversion]:
    """``data`` (read from ``path``) as an fxquant qconfig, or None when it is fxquant's own."""
    shape = shape_of(data)
    if shape is None:
        return None
    groups: dict = {}
    notes: list[Note] = []
    file = str(path)
    if shape == "sectioned":
        _sectioned([(file, data)], groups, notes)
    else:
        READERS[shape](data, file, groups, notes)
    return Conversion(file, _qconfig(path.stem, groups, shape), notes, {file: FORMAT_NAMES[shape]})


def _qconfig(name: str, groups: dict, shape: str) -> dict:
    description = f"converted from the predecessor's {FORMAT_NAMES[shape].split(' (')[0]}"
    return {"name": name, "description": description, **groups}


def convert_directory(
    path: Path, files: list[tuple[Path, Any]], validate: Callable[[Path, Any], None]
) -> Optional[Conversion]:
    """A folder of YAML files as one qconfig, or None when none of them is the predecessor's.
    The single-format files of a folder are the split files; every other predecessor file is read
    alone; a file in fxquant's schema (``validate`` checks it) joins as it is. A group given by
    two files fails naming both."""
    shapes = {file: shape_of(data) for file, data in files}
    if all(shape is None for shape in shapes.values()):
        return None
    sectioned = split_order([(f, d) for f, d in files if shapes[f] == "sectioned"])
    merged: dict[str, Any] = {}
    owner: dict[str, str] = {}
    notes: list[Note] = []
    formats: dict[str, str] = {}

    def add(groups: Mapping, file: str) -> None:
        for key, value in groups.items():
            if key in ("name", "description"):
                continue
            if key in merged and key != "skip":
                raise QConfigError(f"{file}: {key}: already defined in {owner[key]}")
            merged[key] = merged.get(key, []) + value if key == "skip" else value
            owner[key] = file

    if sectioned:
        groups: dict = {}
        _sectioned([(str(f), d) for f, d in sectioned], groups, notes)
        kind = "split" if len(sectioned) > 1 else "sectioned"
        formats.update({str(f): FORMAT_NAMES[kind] for f, _ in sectioned})
        add(groups, ", ".join(str(f) for f, _ in sectioned))
    for file, data in files:
        shape = shapes[file]
        if shape == "sectioned":
            continue
        if shape is None:
            validate(file, data)
            add(data, str(file))
            continue
        groups = {}
        READERS[shape](data, str(file), groups, notes)
        formats[str(file)] = FORMAT_NAMES[shape]
        add(groups, str(file))
    kinds = {("split" if s == "sectioned" and len(sectioned) > 1 else s) for s in shapes.values() if s}
    shape = kinds.pop() if len(kinds) == 1 else "per-part"
    data = {**_qconfig(path.name, {}, shape), **merged}
    return Conversion(str(path), data, notes, formats)
