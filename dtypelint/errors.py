"""The errors dtypelint raises on bad input. The CLI prints them as one line and exits with code 2."""

from __future__ import annotations


class DtypelintError(Exception):
    """Base class: a problem with what the user asked for, not a bug in dtypelint."""


class UsageError(DtypelintError, ValueError):
    """An argument, option or configuration value is invalid."""


class LoadError(DtypelintError):
    """A model, checkpoint, config or rule pack could not be loaded."""


class WriteError(DtypelintError):
    """A file or stream dtypelint writes (a plan, a graph, a report) could not be written."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message: dtypelint reports errors on one line."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
