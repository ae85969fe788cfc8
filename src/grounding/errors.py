"""The problems a person must fix, and how entry points report them.

:class:`DataError` (and its kinds: a file that breaks its format, a table that fails its
suite) and :class:`ConfigError` end a command with their message and exit status 1, never a
bare traceback; anything else is a bug and keeps its traceback. This module imports nothing
of the package, so every other module may import it.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable

#: ``scheme://user:password@host``: the password of a URI's user information
_PASSWORD = re.compile(r"(?P<keep>[a-zA-Z][a-zA-Z0-9+.-]*://[^/@\s:]*):[^/@\s]*@")


def redact(text: str) -> str:
    """``text`` with the password of every URI in it replaced by ``***``
    (``http://ann:secret@host`` -> ``http://ann:***@host``): what may be printed or logged."""
    return _PASSWORD.sub(r"\g<keep>:***@", text)


class DataError(Exception):
    """A problem with the data that a person must fix; the message says where."""


class ConfigError(ValueError):
    """``params.yaml`` (or a command's options) do not match their types; the message names
    the key."""


class FormatError(DataError):
    """A file that breaks its dataset format; the message names the file and the line (or the
    record, such as ``images[3]``)."""

    def __init__(self, source: str, message: str, line: int | None = None) -> None:
        where = f"{source}:{line}" if line is not None else source
        super().__init__(f"{where}: {message}")
        self.source = source
        self.line = line
        self.reason = message


USER_ERRORS: tuple[type[Exception], ...] = (ConfigError, DataError)


def run(main: Callable[[list[str] | None], object], argv: list[str] | None = None) -> None:
    """Call ``main(argv)``; on a user error print ``error: <message>`` (the password of any URI
    in it masked) and exit with 1."""
    try:
        main(argv)
    except USER_ERRORS as error:
        print(f"error: {redact(str(error))}", file=sys.stderr)
        raise SystemExit(1) from None
