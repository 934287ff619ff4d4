"""The error the package raises for a user's mistake (a bad flag, file or value).

`build-llm` prints a UsageError as one line on stderr and exits with code 2; any other exception is
a bug and shows its traceback. From Python it is an ordinary ValueError (or TypeError), so callers
that catch those keep working.
"""

from __future__ import annotations


class UsageError(ValueError):
    """Bad input from a user: the message names the argument, the value and what would be valid."""


class UsageTypeError(UsageError, TypeError):
    """Bad input of the wrong type (e.g. a JSON file holding a list where an object belongs)."""
