"""The `kvsqueeze` command line (click): one module per group of commands."""

from .main import main

__all__ = ["main"]
