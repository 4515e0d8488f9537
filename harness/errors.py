"""How a run ends for the user: bad input (exit 2, one line), an interruption, and the exit codes."""

from __future__ import annotations

import signal

EXIT_OK, EXIT_CELL_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class UsageError(ValueError):
    """Bad input from the user: exit code 2 and one line."""


class Interrupted(Exception):
    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class DataError(RuntimeError):
    """Data that cannot be found, read or trusted; the message says what to do (exit code 2, one line)."""
