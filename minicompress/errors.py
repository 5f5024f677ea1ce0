"""One exception type for every user-facing failure.

A :class:`MinicompressError` carries a single line that names the flag or key at fault
and what is allowed; the CLI prints it as ``error: <message>`` and exits with status 2.
"""

from __future__ import annotations


class MinicompressError(Exception):
    """A user-facing error whose message is one line naming the culprit and the fix."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class ConfigError(MinicompressError):
    """A configuration key, flag or value is invalid."""
