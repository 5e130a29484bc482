"""The one exception type users see: a specific, one-line message about bad input.

The CLI prints ``error: <message>`` and exits with code 2 for these; anything else is a bug
and keeps its traceback.
"""


class CompactorError(Exception):
    """Bad input or an unmet precondition, described in one line: what, where, what to do."""


class ConfigError(CompactorError, ValueError):
    """A recipe or step configuration is invalid (unknown key, bad value)."""
