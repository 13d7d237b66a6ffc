"""QConfig: the seed's YAML schema (and its predecessor's keys) parsed into QuantSpecs.

A qconfig maps group names (``attn_qkv``, ``norm1``...) to specs. A linear group has
``weight:`` and ``output:`` sections; an activation group is a spec itself. Top-level keys
besides groups: ``name``, ``description``, ``extends`` (a preset by name, or a file or directory to start
from: a relative path is read from the directory of the file that says ``extends``),
``overrides`` (module glob -> partial groups) and ``skip`` (module globs kept in float).
Every error names the source, the key path and the allowed values.

This module holds the QConfig and the loader (presets, files, directories, ``extends``);
the group and section names are in :mod:`fxquant.quant.qconfig_groups`, one spec section's
keys and their parsing in :mod:`fxquant.quant.qconfig_spec`, the module globs in
:mod:`fxquant.quant.qconfig_globs`. The names of the first two are importable from here too.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import yaml

from fxquant.errors import QConfigError
from fxquant.quant.legacy_formats import Conversion, convert_directory, convert_file
from fxquant.quant.qconfig_globs import module_matches
from fxquant.quant.qconfig_groups import (
    ACT,
    ACTIVATION_GROUPS,
    ALL_GROUPS,
    LINEAR_GROUPS,
    LINEAR_SECTIONS,
    NORM_GROUPS,
    NORM_INPUT,
    TOP_LEVEL_KEYS,
)
from fxquant.quant.qconfig_spec import SPEC_KEYS, expect_kind, parse_spec, qconfig_error
from fxquant.quant.recovery_config import pop_recovery, recovery_to_dict
from fxquant.quant.spec import QuantSpec

__all__ = [
    "QConfig",
    "QConfigLike",
    "load_qconfig",
    "predecessor_conversion",
    "qconfig_from_dict",
    "preset_names",
    "parse_spec",
    "SPEC_KEYS",
    "LINEAR_GROUPS",
    "ACTIVATION_GROUPS",
    "ALL_GROUPS",
    "NORM_GROUPS",
    "NORM_INPUT",
    "LINEAR_SECTIONS",
    "ACT",
    "TOP_LEVEL_KEYS",
]


@dataclass
class QConfig:
    """Parsed qconfig: group -> section -> raw spec dict, validated, plus overrides and skip."""

    name: str
    groups: dict[str, dict[str, dict]]
    overrides: list[tuple[str, dict[str, dict[str, dict]]]] = field(default_factory=list)
    skip: list[str] = field(default_factory=list)
    source: str = field(default="<dict>", compare=False)  # where it was read: equal configs may differ here
    description: str = ""
    smooth_alpha: Optional[float] = None  # SmoothQuant migration strength; None = no smoothing
    # group -> file that defined it, for configs that must match the model group by group
    # (a directory of per-part files): annotate fails on a group the model does not have
    strict_groups: dict[str, str] = field(default_factory=dict)
    recovery: dict[str, Any] = field(default_factory=dict)  # accuracy-recovery passes: recovery_config
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def is_skipped(self, module_path: str) -> bool:
        return any(module_matches(module_path, pattern) for pattern in self.skip)

    def names_group(self, group: str) -> bool:
        """Whether ``group`` appears in the groups or in an override (``residual1`` sets the first
        residual add apart from ``residual`` only where a qconfig names it)."""
        return group in self.groups or any(group in body for _pattern, body in self.overrides)

    def spec_for(self, group: str, section: str, module_path: str = "") -> Optional[QuantSpec]:
        """The spec of ``group``'s ``section`` (``weight``/``output``/``act``) at ``module_path``,
        after overrides; None when that point stays in float."""
        key = (group, section, module_path)
        if key not in self._cache:
            self._cache[key] = self._resolve(group, section, module_path)
        return self._cache[key]

    def _resolve(self, group: str, section: str, module_path: str) -> Optional[QuantSpec]:
        if module_path and self.is_skipped(module_path):
            return None
        raw = copy.deepcopy(self.groups.get(group, {}).get(section))
        path = f"{group}.{section}" if section != ACT else group
        for pattern, groups in self.overrides:
            if module_path and module_matches(module_path, pattern):
                extra = groups.get(group, {}).get(section)
                if extra is not None:
                    raw = {**(raw or {}), **extra}
                    path = f"overrides.{pattern}.{path}"
        if raw is None:
            return None
        spec = parse_spec(raw, self.source, path)
        return spec if spec.enabled else None

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"name": self.name}
        if self.description:
            out["description"] = self.description
        if self.smooth_alpha is not None:
            out["smooth_alpha"] = self.smooth_alpha
        out.update(recovery_to_dict(self.recovery))
        out.update(_flatten_groups(self.groups))
        if self.overrides:
            out["overrides"] = {pattern: _flatten_groups(g) for pattern, g in self.overrides}
        if self.skip:
            out["skip"] = list(self.skip)
        return out


def _flatten_groups(groups: dict[str, dict[str, dict]]) -> dict:
    out = {}
    for group, sections in groups.items():
        if group in LINEAR_GROUPS:
            out[group] = {k: dict(v) for k, v in sections.items()}
        else:  # an activation group is its spec, plus a norm's ``input`` section
            out[group] = {
                **sections.get(ACT, {}),
                **({NORM_INPUT: dict(sections[NORM_INPUT])} if NORM_INPUT in sections else {}),
            }
    return out


def _parse_groups(raw: Mapping[str, Any], source: str, prefix: str = "") -> dict[str, dict[str, dict]]:
    groups: dict[str, dict[str, dict]] = {}
    for group, body in raw.items():
        path = f"{prefix}{group}"
        if (body is None or body is False) and group in ALL_GROUPS:
            if prefix:
                raise qconfig_error(
                    source,
                    path,
                    "null turns a group off only at the top level; to keep some modules float, list them in skip",
                )
            groups[group] = None  # off: the group's points stay float even where the base quantizes them
        elif group in LINEAR_GROUPS:
            if not isinstance(body, Mapping):
                raise qconfig_error(source, path, "a linear group is a mapping with sections weight and output")
            sections = {}
            for section, spec_raw in body.items():
                if section not in LINEAR_SECTIONS:
                    raise qconfig_error(
                        source,
                        f"{path}.{section}",
                        f"unknown section; a linear group has: {', '.join(LINEAR_SECTIONS)}",
                    )
                parse_spec(spec_raw, source, f"{path}.{section}")  # validate now, not at first use
                sections[section] = dict(spec_raw)
            groups[group] = sections
        elif group in ACTIVATION_GROUPS:
            if not isinstance(body, Mapping):
                raise qconfig_error(source, path, f"expected a mapping of spec keys, got {type(body).__name__}")
            body = dict(body)
            sections = {}
            if NORM_INPUT in body:
                if group not in NORM_GROUPS:
                    raise qconfig_error(
                        source,
                        f"{path}.{NORM_INPUT}",
                        f"only LayerNorm groups ({', '.join(NORM_GROUPS)}) quantize their input",
                    )
                parse_spec(body[NORM_INPUT], source, f"{path}.{NORM_INPUT}")
                sections[NORM_INPUT] = dict(body.pop(NORM_INPUT))
            if body or not sections:  # ``norm1: {input: {...}}`` alone leaves the norm's output float
                parse_spec(body, source, path)
                sections[ACT] = body
            groups[group] = sections
        else:
            raise qconfig_error(source, path, f"unknown group; allowed: {', '.join(ALL_GROUPS + TOP_LEVEL_KEYS)}")
    return groups


def _extends_target(value: str, base_dir: Optional[Path]) -> Union[str, Path]:
    """A preset by name; a relative path from the directory of the file holding ``extends``
    (``base_dir``; the working directory for a dict); an absolute path as it is."""
    if value in preset_names() or base_dir is None or Path(value).is_absolute():
        return value
    return base_dir / value


def qconfig_from_dict(
    raw: Mapping[str, Any], source: str = "<dict>", _depth: int = 0, *, base_dir: Optional[Path] = None
) -> QConfig:
    """``base_dir``: the directory of the file ``raw`` was read from; a relative ``extends``
    path resolves against it (None: against the working directory)."""
    if not isinstance(raw, Mapping):
        raise qconfig_error(source, "<top>", f"expected a mapping of groups, got {type(raw).__name__}")
    raw = dict(raw)
    raw_keys = set(raw)
    base: Optional[QConfig] = None
    if "extends" in raw:
        if _depth > 8:
            raise qconfig_error(source, "extends", "chain of 'extends' is too deep (a cycle?)")
        value = expect_kind(raw.pop("extends"), str, source, "extends")
        target = _extends_target(value, base_dir)
        if isinstance(target, Path) and not target.exists():
            raise qconfig_error(
                source,
                "extends",
                f"{value!r} is neither a preset ({', '.join(preset_names())}) nor an "
                f"existing file: looked for {target} (relative to the directory of {source})",
            )
        base = load_qconfig(target, _depth=_depth + 1)
    name = raw.pop("name", Path(source).stem if source != "<dict>" else "custom")
    description = raw.pop("description", "")
    smooth_alpha = raw.pop("smooth_alpha", None)
    if smooth_alpha is not None and smooth_alpha is not False:
        smooth_alpha = expect_kind(smooth_alpha, float, source, "smooth_alpha", "a number in [0, 1], or null")
        if not 0.0 <= smooth_alpha <= 1.0:
            raise qconfig_error(source, "smooth_alpha", f"{smooth_alpha} is outside [0, 1]")
    else:
        smooth_alpha = None
    recovery = pop_recovery(raw, source, base.recovery if base is not None else None)
    overrides_raw = raw.pop("overrides", {}) or {}
    skip = raw.pop("skip", []) or []
    if not isinstance(skip, list) or not all(isinstance(s, str) for s in skip):
        raise qconfig_error(source, "skip", "expected a list of module globs, e.g. [head, 'blocks.0.*']")
    if not isinstance(overrides_raw, Mapping):
        raise qconfig_error(source, "overrides", "expected a mapping from module glob to groups")
    groups = _parse_groups(raw, source)
    overrides = []
    for pattern, body in overrides_raw.items():
        if not isinstance(body, Mapping):
            raise qconfig_error(source, f"overrides.{pattern}", "expected a mapping of groups")
        overrides.append((str(pattern), _parse_groups(body, source, prefix=f"overrides.{pattern}.")))
    if base is not None:
        merged = copy.deepcopy(base.groups)
        for group, sections in groups.items():  # key by key, as overrides merge
            if sections is None:
                merged.pop(group, None)
                continue
            for section, raw_spec in sections.items():
                merged.setdefault(group, {})[section] = {**merged.get(group, {}).get(section, {}), **raw_spec}
        groups = merged
        overrides = base.overrides + overrides
        if smooth_alpha is None and "smooth_alpha" not in raw_keys:
            smooth_alpha = base.smooth_alpha
        skip = base.skip + skip
    config = QConfig(
        name=str(name),
        groups={group: sections for group, sections in groups.items() if sections is not None},
        overrides=overrides,
        skip=list(skip),
        smooth_alpha=smooth_alpha,
        recovery=recovery,
        source=source,
        description=str(description),
    )
    for _pattern, body in overrides:  # each override must parse when merged over its base
        for group, sections in body.items():
            for section in sections:
                config._resolve(group, section, "")
    return config


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("fxquant.qconfigs").iterdir() if p.name.endswith(".yaml"))


def _read_yaml(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as fh:
            return yaml.safe_load(fh) or {}
    except yaml.YAMLError as exc:
        raise QConfigError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None


def _yaml_files(path: Path) -> list[tuple[Path, Any]]:
    files = sorted(list(path.glob("*.yaml")) + list(path.glob("*.yml")))
    if not files:
        raise QConfigError(f"{path}: directory holds no .yaml files")
    out = [(file, _read_yaml(file)) for file in files]
    for file, data in out:
        if not isinstance(data, Mapping):
            raise QConfigError(f"{file}: expected a mapping of groups")
    return out


def predecessor_conversion(path: Union[str, Path], *, _depth: int = 0) -> Optional[Conversion]:
    """The fxquant qconfig (as a dict, with a note per key) for a file or folder in one of the
    predecessor's formats (:mod:`fxquant.quant.legacy_formats`); None when it is fxquant's own."""
    path = Path(path)
    if path.is_dir():

        def validate(file: Path, data: Any) -> None:
            qconfig_from_dict(data, str(file), _depth, base_dir=file.parent)

        return convert_directory(path, _yaml_files(path), validate)
    if not path.is_file():
        raise QConfigError(f"{path}: no such file or directory")
    return convert_file(path, _read_yaml(path))


def _load_directory(path: Path, depth: int) -> QConfig:
    """The predecessor kept one YAML per model part; merge them, refusing a group defined twice."""
    conversion = predecessor_conversion(path, _depth=depth)
    if conversion is not None:
        conversion.warn()
        return qconfig_from_dict(conversion.data, str(path), depth, base_dir=path)
    merged: dict[str, Any] = {}
    owner: dict[str, Path] = {}
    for file, data in _yaml_files(path):
        qconfig_from_dict(data, str(file), depth, base_dir=file.parent)  # validate each file, errors name it
        for key, value in data.items():
            if key in ("name", "description"):
                continue
            if key in merged and key not in ("skip",):
                raise QConfigError(f"{file}: {key}: already defined in {owner[key]}")
            merged[key] = merged.get(key, []) + value if key == "skip" else value
            owner[key] = file
    merged["name"] = path.name
    config = qconfig_from_dict(merged, str(path), depth, base_dir=path)
    config.strict_groups = {key: str(owner[key]) for key in merged if key in ALL_GROUPS}
    return config


QConfigLike = Union[str, Path, Mapping[str, Any], QConfig]


def load_qconfig(qconfig: QConfigLike, *, _depth: int = 0) -> QConfig:
    """A preset name (``"w8a8"``), a YAML file, a directory of YAML files, a dict or a QConfig.

    A file or directory in one of the predecessor's formats is read as such (warning with
    :class:`~fxquant.quant.legacy_formats.LegacyConfigWarning` where fxquant's meaning differs)."""
    if isinstance(qconfig, QConfig):
        return qconfig
    if isinstance(qconfig, Mapping):
        return qconfig_from_dict(qconfig, "<dict>", _depth)
    if not isinstance(qconfig, (str, Path)):
        raise QConfigError(f"qconfig must be a preset name, a path, a dict or a QConfig, got {type(qconfig).__name__}")
    text = str(qconfig)
    if text in preset_names():
        preset = resources.files("fxquant.qconfigs") / f"{text}.yaml"
        data = yaml.safe_load(preset.read_text(encoding="utf-8")) or {}
        return qconfig_from_dict(data, f"{text}.yaml", _depth)
    path = Path(text)
    if path.is_dir():
        return _load_directory(path, _depth)
    if path.is_file():
        data = _read_yaml(path)
        conversion = convert_file(path, data)
        if conversion is not None:  # one of the predecessor's formats
            conversion.warn()
            data = conversion.data
        return qconfig_from_dict(data, str(path), _depth, base_dir=path.parent)
    raise QConfigError(
        f"qconfig '{text}' is neither a preset ({', '.join(preset_names())}) nor an existing file or directory"
    )
