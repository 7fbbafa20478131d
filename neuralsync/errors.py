"""Exceptions a user can act on: each says what was wrong, where, and what was expected."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "NeuralSyncError",
    "StreamOrderError",
    "suggest",
]


class NeuralSyncError(Exception):
    """Base class of every error NeuralSync raises for a user's mistake.

    The command line prints these as one message and exits non-zero, without a traceback.
    """


class ConfigError(NeuralSyncError):
    """A scenario or configuration is missing, malformed, or names something that does not exist."""


class DataError(NeuralSyncError):
    """A data file or record is not what the scenario says it should be.

    Parameters
    ----------
    message
        What was wrong and what was expected.
    origin
        Where: ``"path/to/file.csv"``, ``"file.csv:17"`` or ``"file.csv:17, column 'price'"``.

    """

    def __init__(self, message: str, origin: str | None = None):
        self.origin = origin
        self.reason = message
        super().__init__(f"{origin}: {message}" if origin else message)


class StreamOrderError(DataError):
    """A record's timestamp is not after the previous one of its key (duplicate or out of order)."""


class CheckpointError(NeuralSyncError):
    """A checkpoint cannot be read, or does not belong to the run that tries to resume from it."""


def suggest(name: str, choices: Iterable[str]) -> str:
    """Return ``" (did you mean 'x'?)"`` for the closest of ``choices``, or ``""``.

    >>> suggest("pric", ["price", "volume"])
    " (did you mean 'price'?)"
    >>> suggest("zzz", ["price"])
    ''

    """
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""
