"""Progress bars for observer work that can take more than a few seconds.

An observer's range search (OMSE's shrink factors, KL's candidate windows) costs about
``candidates x values`` element operations: a few million is instant, the largest settings
the qconfig allows reach 1e10 and tens of seconds. :func:`work_bar` returns a tqdm bar
(``tqdm.auto``, as fxquant's calibration bar) for work above ``SHOW_ABOVE`` element
operations, and a disabled one below it or while :func:`observer_progress` has switched
bars off (``fxquant.compile(..., progress=False)`` does).
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

from tqdm.auto import tqdm

#: element operations (candidates x values) above which a bar is shown: about a second
#: of work on one CPU core
SHOW_ABOVE = 3e8

_ENABLED: contextvars.ContextVar[bool] = contextvars.ContextVar("fxquant_observer_progress", default=True)


@contextlib.contextmanager
def observer_progress(enabled: bool) -> Iterator[None]:
    """Show (or hide) observer progress bars inside the ``with`` block."""
    token = _ENABLED.set(bool(enabled))
    try:
        yield
    finally:
        _ENABLED.reset(token)


def work_bar(total: int, work: float, desc: str, unit: str = "candidate") -> tqdm:
    """A bar over ``total`` steps of ``work`` element operations in all."""
    return tqdm(total=total, desc=desc, unit=unit, leave=False, disable=not _ENABLED.get() or work < SHOW_ABOVE)
