"""The one exception type users see: a specific, one-line message about bad input.

The CLI prints ``error: <message>`` and exits with code 2 for these; anything else is a bug
and keeps its traceback.
"""


class CompactorError(Exception):
    """Bad input or an unmet precondition, described in one line: what, where, what to do."""


class ConfigError(CompactorError, ValueError):
    """A recipe or step configuration is invalid (unknown key, bad value)."""


class GateFailed(CompactorError):
    """A quality gate was not met: the CLI prints the measured value against the limit and
    exits with code 3 (2 stays "bad input")."""

    exit_code = 3


class MemoryCapExceeded(CompactorError):
    """The process passed its memory cap while running (:class:`compactor.memory.MemoryGuard`):
    stopped cleanly, nothing half-written; exit code 2 like the plan's refusal before a run."""
