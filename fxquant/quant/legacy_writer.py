"""A predecessor config written out as an fxquant qconfig YAML, a comment for every key it had.

:func:`render` turns a :class:`~fxquant.quant.legacy_formats.Conversion` into the text
``fxquant convert-config`` writes: the header says where it came from; then each group, preceded
by the comments for the predecessor keys that landed on it (``[differs]`` marks where fxquant
does something else than the predecessor did); the keys that landed nowhere are listed at the top.
Loading the text gives the same QConfig as loading the original.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from fxquant.quant.legacy_formats import Conversion
from fxquant.quant.legacy_mapping import Note

__all__ = ["render"]

DIFFERS = "[differs] "


def _comments(notes: list[Note]) -> list[str]:
    """One comment per message of a file: ``# file: key, key: message``."""
    by_text: dict[tuple[bool, str, str], list[str]] = {}
    for note in notes:
        keys = by_text.setdefault((note.differs, Path(note.file).name, note.text), [])
        if note.key not in keys:
            keys.append(note.key)
    return [
        f"# {DIFFERS if differs else ''}{file}: {', '.join(keys)}: {text}"
        for (differs, file, text), keys in by_text.items()
    ]


def _dump(value: Any) -> list[str]:
    return yaml.safe_dump(value, sort_keys=False, default_flow_style=False, width=1000).rstrip("\n").split("\n")


def render(conversion: Conversion) -> str:
    """The fxquant qconfig YAML for ``conversion``, commented key by key."""
    files = ", ".join(f"{Path(f).name} ({fmt})" for f, fmt in conversion.formats.items())
    lines = [
        f"# Converted by `fxquant convert-config` from {conversion.source}",
        f"# read as the predecessor's formats: {files}.",
        "# fxquant.load_qconfig gives the same QConfig for this file as for the original. Each group is",
        "# preceded by how the predecessor's keys became it; [differs] marks where fxquant does something",
        "# else than the predecessor did (loading the original warns about those).",
    ]
    nowhere = [n for n in conversion.notes if n.target is None or n.dropped]
    if nowhere:
        lines += ["#", "# Keys with no fxquant key of their own (dropped), and notes on a whole file or setting:"]
        lines += _comments(nowhere)
    data = dict(conversion.data)
    lines += [""] + _dump({key: data.pop(key) for key in ("name", "description") if key in data})
    for key, value in data.items():
        mine = [n for n in conversion.notes if n.target and not n.dropped and n.target.split(".")[0] == key]
        lines += [""] + _comments(mine) + _dump({key: value})
    return "\n".join(lines) + "\n"
