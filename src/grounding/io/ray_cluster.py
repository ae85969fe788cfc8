"""The Ray cluster the ``ray`` engines run on: the one named by ``RAY_ADDRESS``, else a local
one started for this process. Ray is an optional extra (``pip install "grounding[ray]"``),
imported only here and by the engines that call :func:`connect`."""

from __future__ import annotations

import logging
import os
import socket
from types import ModuleType

from grounding.errors import ConfigError, DataError

ADDRESS_VARIABLE = "RAY_ADDRESS"
INSTALL = 'pip install "grounding[ray]"'
# Seconds to wait for the cluster's port to answer before saying it cannot be reached (Ray
# itself retries for minutes, printing warnings).
_REACH_TIMEOUT = 5.0


def require_ray() -> ModuleType:
    """The ``ray`` module; :class:`ConfigError` saying how to install it when it is missing."""
    try:
        import ray
        import ray.data  # the engines need Ray Data, the `ray[data]` extra
    except ImportError:
        raise ConfigError(f"engine: ray needs Ray Data, not installed here: {INSTALL}") from None
    return ray


def connect() -> ModuleType:
    """Connect this process to Ray once and return the ``ray`` module.

    With ``RAY_ADDRESS`` set (``host:port`` of a head started by ``ray start --head``, or
    ``ray://host:10001``), join that cluster; :class:`ConfigError` in one line when nothing
    answers there. Without it, start a local Ray with every core of this machine (never an
    unrelated instance that happens to run here).
    """
    address = os.environ.get(ADDRESS_VARIABLE, "").strip()
    if address and address not in ("auto", "local"):
        check_reachable(address)  # first: importing Ray alone takes seconds
    ray = require_ray()
    if ray.is_initialized():
        return ray
    options = {"include_dashboard": False, "logging_level": logging.WARNING}
    try:
        if address:
            ray.init(address=address, **options)
        else:
            ray.init(address="local", **options)
    except (ConnectionError, ValueError) as error:  # no cluster, or a client extra missing
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        raise ConfigError(
            f"{ADDRESS_VARIABLE}={address or '(unset)'}: cannot join the Ray cluster "
            f"({first_line}); {_what_to_change()}"
        ) from None
    return ray


def check_reachable(address: str, timeout: float = _REACH_TIMEOUT) -> None:
    """:class:`ConfigError` if nothing listens at ``address`` (``[ray://]host:port``)."""
    host, port = parse_address(address)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise ConfigError(
            f"{ADDRESS_VARIABLE}={address}: no Ray cluster answers at {host}:{port} "
            f"({reason.lower()}); {_what_to_change()}"
        ) from None


def parse_address(address: str) -> tuple[str, int]:
    """``(host, port)`` of ``[ray://]host[:port]`` (Ray's defaults: 6379, 10001 for ``ray://``)."""
    client = address.startswith("ray://")
    rest = address.removeprefix("ray://").rstrip("/")
    host, _, port = rest.rpartition(":") if ":" in rest else (rest, "", "")
    if not port:
        return rest, 10001 if client else 6379
    if not port.isdigit() or not host:
        raise ConfigError(
            f"{ADDRESS_VARIABLE}={address}: expected host:port or ray://host:port; "
            f"{_what_to_change()}"
        )
    return host, int(port)


def _what_to_change() -> str:
    return (
        f"start the head there with `ray start --head`, set {ADDRESS_VARIABLE} to its address, "
        f"or unset {ADDRESS_VARIABLE} to run on a local Ray"
    )


# A worker's user error travels back as two fields of its result row, since Ray keeps only its
# traceback as text; the driver raises it again with its one-line message.
_ERROR_KINDS: dict[str, type[Exception]] = {"ConfigError": ConfigError, "DataError": DataError}


def error_fields(error: ConfigError | DataError | None) -> dict[str, list[str]]:
    """The ``error`` and ``error_kind`` columns of a one-row result (empty without error)."""
    if error is None:
        return {"error": [""], "error_kind": [""]}
    kind = "ConfigError" if isinstance(error, ConfigError) else "DataError"
    return {"error": [str(error)], "error_kind": [kind]}


def raise_error(row: dict[str, object]) -> None:
    """Raise the user error a result row of :func:`error_fields` carries, if any."""
    if row["error"]:
        raise _ERROR_KINDS[str(row["error_kind"])](str(row["error"]))
