"""The module globs of a qconfig's ``skip`` and ``overrides``, checked against a model.

A glob is matched against module paths (``blocks.3.attn.qkv``) with
:func:`module_matches`. One that matches no module of the model is a typo
(``"blcoks.*"``) or a qconfig written for another model: applied silently it would leave
the config without the effect it was written for, so :func:`check_globs` refuses it and
names the closest module paths and globs of this model (``difflib``).
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from typing import Any, Iterable

from fxquant.errors import QConfigError


def module_matches(module_path: str, pattern: str) -> bool:
    """Whether a ``skip``/``overrides`` glob covers ``module_path``.

    ``"blocks.0.*"`` also covers ``blocks.0`` itself: a block's own ops (its residual
    adds, attention's matmuls in ``blocks.0.attn``) belong to that module, not to a child,
    and "everything in block 0" is what the glob means.
    """
    if module_path == pattern or fnmatch.fnmatchcase(module_path, pattern):
        return True
    return pattern.endswith(".*") and fnmatch.fnmatchcase(module_path, pattern[:-2])


_INDEX = re.compile(r"^\d+$")
MAX_SUGGESTIONS = 3


def _candidates(paths: Iterable[str]) -> list[str]:
    """Module paths, the same with every numeric segment as ``*`` (``blocks.*.attn``), and
    ``prefix.*`` for every prefix: what a glob over these modules could have meant."""
    out: set[str] = set()
    for path in paths:
        parts = path.split(".")
        out.add(path)
        general = [("*" if _INDEX.match(p) else p) for p in parts]
        out.add(".".join(general))
        for i in range(1, len(parts)):
            out.add(".".join(parts[:i]) + ".*")
            out.add(".".join(general[:i]) + ".*")
    return sorted(out)


def close_matches(pattern: str, paths: Iterable[str]) -> list[str]:
    """Up to MAX_SUGGESTIONS module paths or globs of the model that look like ``pattern``."""
    return difflib.get_close_matches(pattern, _candidates(paths), n=MAX_SUGGESTIONS, cutoff=0.6)


def unmatched_globs(config: Any, paths: Iterable[str]) -> list[tuple[str, str]]:
    """(key path, glob) of every ``skip`` entry and ``overrides`` key that covers none of ``paths``."""
    paths = [p for p in paths if p]
    globs = [(f"skip[{i}]", pattern) for i, pattern in enumerate(config.skip)]
    globs += [(f"overrides.{pattern}", pattern) for pattern, _ in config.overrides]
    return [(key, pattern) for key, pattern in globs if not any(module_matches(p, pattern) for p in paths)]


def check_globs(config: Any, paths: Iterable[str], model: str = "the model") -> None:
    """Raise QConfigError for the first glob of ``config`` that matches none of ``paths``
    (the model's module paths), naming the qconfig's source, the key, the glob and the close
    matches."""
    paths = sorted({p for p in paths if p})
    for key, pattern in unmatched_globs(config, paths):
        near = close_matches(pattern, paths)
        hint = (
            f"did you mean {', '.join(repr(n) for n in near)}?"
            if near
            else f"{model}'s top-level modules: {', '.join(sorted({p.split('.')[0] for p in paths})) or 'none'}"
        )
        raise QConfigError(
            f"{config.source}: {key}: glob {pattern!r} matches no module of {model}; {hint} "
            "(globs match module paths such as 'blocks.0.attn.qkv'; 'blocks.0.*' covers block 0)"
        )
