"""Capture what C++ code writes to the process's stdout and stderr.

torch's TorchScript ONNX exporter logs the whole TorchScript IR (thousands of lines for a
ViT) to the C++ ``std::cout`` when an export fails, whatever ``verbose`` says; Python's
``sys.stdout`` redirection does not see it. :func:`captured_output` points file
descriptors 1 and 2 at a temporary file for the duration of a block and hands back what
was written there.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import tempfile
from typing import Callable, Iterator

STDOUT, STDERR = 1, 2


def _flush_all() -> None:
    """Python's and C stdio's buffers (C++ iostreams are synced with stdio by default)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    with contextlib.suppress(OSError, AttributeError, TypeError):  # no libc by that name (Windows)
        ctypes.CDLL(None).fflush(None)


@contextlib.contextmanager
def captured_output() -> Iterator[Callable[[], str]]:
    """``with captured_output() as text: ...``; ``text()`` is what fds 1 and 2 received inside.

    Where the descriptors cannot be duplicated (no console), nothing is captured and
    ``text()`` is empty.
    """
    with tempfile.TemporaryFile() as log:
        try:
            saved = (os.dup(STDOUT), os.dup(STDERR))
        except OSError:
            yield lambda: ""
            return
        _flush_all()
        try:
            os.dup2(log.fileno(), STDOUT)
            os.dup2(log.fileno(), STDERR)

            def text() -> str:
                _flush_all()
                log.seek(0)
                return log.read().decode("utf-8", errors="replace")

            yield text
        finally:
            _flush_all()
            os.dup2(saved[0], STDOUT)
            os.dup2(saved[1], STDERR)
            os.close(saved[0])
            os.close(saved[1])
