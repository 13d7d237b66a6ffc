"""Write a benchmark's section into BENCHMARKS.md between its own markers."""

from __future__ import annotations

from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"


def replace_section(name: str, body: str, path: Path = BENCHMARKS) -> None:
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = (
        path.read_text()
        if path.exists()
        else "# Benchmarks\n\nRun by hand; each section names the command that produced it.\n"
    )
    block = f"{start}\n{body.rstrip()}\n{end}"
    if start in text and end in text:
        before, rest = text.split(start, 1)
        text = before + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def publish(name: str, text: str, write: bool) -> None:
    """Print a benchmark's section; with ``write``, also put it into BENCHMARKS.md."""
    print(text)
    if write:
        replace_section(name, text)
