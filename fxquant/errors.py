"""Errors that name what went wrong and what to do; never a bare traceback from torch."""

from __future__ import annotations


class FxqError(Exception):
    """Base class of every error fxquant raises on purpose."""


class TraceError(FxqError):
    """The model could not be turned into an fx graph."""


class QConfigError(FxqError, ValueError):
    """A qconfig file or dict is invalid: the message names the file and the key path."""


class PassError(FxqError):
    """A pass failed: the message names the pass, the node and the passes that ran before."""

    def __init__(self, message: str, *, pass_name: str = "", node: str = "", before: tuple = ()):
        super().__init__(message)
        self.pass_name = pass_name
        self.node = node
        self.before = tuple(before)


class NodeError(FxqError):
    """Raised inside a pass about one node; the pass manager adds the pass context."""

    def __init__(self, node: str, message: str):
        super().__init__(f"node '{node}': {message}")
        self.node = node
