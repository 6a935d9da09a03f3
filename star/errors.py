"""Errors shared by library code and the commands that report them, defined below both so library modules need
not import the command line (star/cli.py)."""
from __future__ import annotations


class ReportedElsewhere(ValueError):
    """A problem another process of the same launch found and reports: this process exits 2 without a line."""

    quiet = True
