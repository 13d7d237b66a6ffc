"""Layer 10, the ``fxquant`` command line."""

from fxquant.cli.app import main

__all__ = ["main"]
