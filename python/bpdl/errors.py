"""Exceptions that mean "the user asked for something that cannot work", with the fix in the message.

The command line turns these into one line on stderr and a non-zero exit; anything else that
escapes is a bug in bpdl and keeps its traceback.
"""

from __future__ import annotations


class BPDLError(Exception):
    """Base class of every error the user can fix."""


class ConfigError(BPDLError, ValueError):
    """An invalid configuration: unknown name, impossible value or geometry, mismatched resume."""


class RunDirError(BPDLError, OSError):
    """The run directory cannot be used (unwritable, or holds a different run)."""


class UnknownNameError(ConfigError):
    """A name that is not in a registry; the message lists the valid names."""

    def __init__(self, kind: str, name: object, valid: list[str] | tuple[str, ...]):
        self.kind, self.name, self.valid = kind, name, list(valid)
        super().__init__(f"unknown {kind} {name!r}; valid {kind}s are: {', '.join(sorted(valid))}")
