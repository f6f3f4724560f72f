"""The errors the command line reports as one line (`error: <what> (<where>)`, exit status 2) instead of a traceback.

`UserError` is the base of every failure a user can act on: a bad recipe or override (`vibeperf.config.ConfigError`),
a malformed data file (`vibeperf.data.DataError`), and `RunError`, a run stopped by a fault it can name (the rollout
engine raised, a non-finite loss, a checkpoint that could not be written). Anything else is a bug and keeps its
traceback. This module imports nothing, so every package can raise these without import cycles.
"""

from __future__ import annotations


class UserError(Exception):
    """A failure the user can act on; its message is one line that says what went wrong and where."""


class RunError(UserError, RuntimeError):
    """A run stopped by a named fault (engine, numerics, disk); the message gives the step and the cause."""
