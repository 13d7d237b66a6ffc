"""What the command line reads and writes, checked before any long work starts.

- the argument parser: a bad option is one ``fxquant: error:`` line (no usage dump, no
  ``SystemExit`` out of :func:`fxquant.cli.app.main`), counts are positive or non-negative ints;
- image folders (``--calib DIR``, ``--images DIR``): unreadable files are skipped with one
  warning that lists them; a folder with nothing readable is refused;
- output paths (``--save``, ``--report``, ``--html``, ``--dump-dir``, ``--onnx`` ...): a
  path under an existing file, or a directory where a file is expected, is refused before
  the compile runs.

Checkpoints (``--checkpoint``) are read by :mod:`fxquant.cli.checkpoint`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import torch

from fxquant.errors import FxqError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
LISTED = 8  # unreadable images named in the warning; the rest are counted


class CliError(FxqError):
    """Bad command-line input: printed as one line, exit status 2."""


# ------------------------------------------------------------------------------ arguments
class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are a :class:`CliError` (one line, exit 2 from ``main``), not a
    usage dump and ``SystemExit``; ``--help`` still prints and exits as usual."""

    def error(self, message: str):  # type: ignore[override]
        raise CliError(f"{message} (see {self.prog} --help)")


def _int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got '{text}'") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {value}")
        return value

    return parse


positive_int = _int_at_least(1)
non_negative_int = _int_at_least(0)


# --------------------------------------------------------------------------------- images
def image_files(folder: str, option: str) -> list[Path]:
    """The files of ``folder`` with an image suffix (sorted); refused if there are none."""
    directory = Path(folder)
    if not directory.is_dir():
        raise CliError(f"{option} {folder}: not a directory of images")
    try:
        files = sorted(p for p in directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    except OSError as exc:
        raise CliError(f"{option} {folder}: cannot list the directory ({exc.strerror or exc})") from None
    if not files:
        raise CliError(f"{option} {folder}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in the directory")
    return files


def open_rgb(path: Path):
    """``(PIL RGB image, "")``, or ``(None, why it cannot be read)``."""
    from PIL import Image

    if not path.is_file():
        return None, "a directory, not a file" if path.is_dir() else "not a regular file"
    try:
        if path.stat().st_size == 0:
            return None, "empty file"
        with Image.open(path) as image:
            return image.convert("RGB"), ""  # convert decodes the whole file: truncation shows here
    except Image.DecompressionBombError as exc:
        return None, f"too many pixels ({str(exc).split('.')[0]})"
    except Image.UnidentifiedImageError:
        return None, "not an image PIL can read"
    except (OSError, ValueError, SyntaxError, EOFError) as exc:  # PIL's decoders raise these on bad data
        return None, str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def read_images(files: Sequence[Path], transform) -> tuple[list[Path], list[torch.Tensor], list[tuple[Path, str]]]:
    """(readable files, their transformed tensors, [(unreadable file, why)])."""
    read, tensors, skipped = [], [], []
    for path in files:
        image, why = open_rgb(path)
        if image is None:
            skipped.append((path, why))
            continue
        read.append(path)
        tensors.append(transform(image))
    return read, tensors, skipped


def report_skipped(option: str, folder: str, skipped: Sequence[tuple[Path, str]], total: int) -> None:
    """One warning line naming the unreadable images; refused when none of ``total`` was read."""
    if not skipped:
        return
    listed = ", ".join(f"{p.name} ({why})" for p, why in skipped[:LISTED])
    more = f" and {len(skipped) - LISTED} more" if len(skipped) > LISTED else ""
    if len(skipped) == total:
        raise CliError(f"{option} {folder}: none of its {total} image files could be read: {listed}{more}")
    print(
        f"fxquant: warning: {option} {folder}: skipped {len(skipped)} of {total} image files that could not "
        f"be read: {listed}{more}",
        file=sys.stderr,
    )


# --------------------------------------------------------------------------- output paths
def _check_parents(target: Path, option: str) -> None:
    """The nearest existing folder above ``target`` must be a writable directory."""
    for parent in target.parents:
        if not parent.exists():
            continue
        if not parent.is_dir():
            raise CliError(f"{option} {target}: {parent} is a file, not a directory; choose another path")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise CliError(f"{option} {target}: no permission to write in {parent}")
        return


def check_output_file(path: Optional[str], option: str, example: str) -> None:
    """Refuse a file path that is a directory or lies under a file (``example``: a file name
    to suggest inside the directory)."""
    if not path:
        return
    target = Path(path)
    if target.is_dir():
        raise CliError(f"{option} {path}: is a directory; give a file path, such as {target / example}")
    _check_parents(target, option)


def check_output_dir(path: Optional[str], option: str) -> None:
    """Refuse a directory path that is an existing file or lies under one."""
    if not path:
        return
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise CliError(f"{option} {path}: is a file, not a directory; give a directory path")
    _check_parents(target, option)


@contextlib.contextmanager
def writing(option: str, path: str) -> Iterator[None]:
    """Turn an OSError while writing ``path`` (disk full, permissions changed) into one line."""
    try:
        yield
    except OSError as exc:
        raise CliError(f"{option} {path}: could not write it ({exc.strerror or exc})") from None
