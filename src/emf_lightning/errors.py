"""Errors the user can fix: a bad configuration value, a missing or unreadable input file.

``emf`` (``cli.main``) catches :class:`UserInputError` at the top and prints its message as one line on stderr
with exit code 2, no traceback (``--debug`` or ``EMF_DEBUG=1`` shows it). Everything else is a bug and keeps its
traceback. So raise these only where the message says what is wrong *and* how to fix it.

The concrete classes also derive from the builtin type a caller would expect (``ValueError`` for a bad value,
``FileNotFoundError`` for a missing file), so ``except ValueError`` keeps working.
"""

from __future__ import annotations

import math
from typing import Any


class UserInputError(Exception):
    """Base of the errors ``emf`` reports as one line (exit 2) instead of a traceback."""


class ConfigError(UserInputError, ValueError):
    """A configuration or command-line value is invalid, or contradicts another one."""


class InputNotFoundError(UserInputError, FileNotFoundError):
    """A file or shard the configuration names does not exist."""


class CheckpointError(UserInputError, ValueError):
    """A checkpoint cannot be read, is not an emf-lightning checkpoint, or contradicts the command line."""


def require_finite(name: str, value: Any) -> None:
    """Refuse NaN and infinities in a number, or in a (start, end) pair or list of numbers, naming the key.

    A NaN passes most range checks (every comparison with it is false) and then silently produces black
    images or a NaN loss far from its cause.
    """
    values = value if isinstance(value, (list, tuple)) else [value]
    for v in values:
        if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isfinite(v):
            raise ConfigError(f"{name} must be a finite number, got {value!r}")
