"""The problems a person must fix, and how entry points report them.

:class:`DataError` (and its kinds: a file that breaks the format, a table that fails its
suite) and :class:`~grounding.config.ConfigError` end a command with their message and exit
status 1, never a bare traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from grounding.config import ConfigError


class DataError(Exception):
    """A problem with the data that a person must fix; the message says where."""


USER_ERRORS: tuple[type[Exception], ...] = (ConfigError, DataError)


def run(main: Callable[[list[str] | None], object], argv: list[str] | None = None) -> None:
    """Call ``main(argv)``; on a user error print ``error: <message>`` and exit with 1."""
    try:
        main(argv)
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
