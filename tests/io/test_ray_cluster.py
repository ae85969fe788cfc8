"""The Ray cluster: an address that nothing answers at, or Ray missing, is one line saying
what to change (before Ray spends minutes retrying)."""

from __future__ import annotations

import socket
import sys
import time

import pytest

from grounding.errors import ConfigError
from grounding.io import ray_cluster


def closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("10.0.0.5:6379", ("10.0.0.5", 6379)),
        ("head.cluster", ("head.cluster", 6379)),
        ("ray://head.cluster:10002", ("head.cluster", 10002)),
        ("ray://head.cluster", ("head.cluster", 10001)),
    ],
)
def test_addresses_default_to_ray_s_ports(address: str, expected: tuple[str, int]) -> None:
    assert ray_cluster.parse_address(address) == expected


def test_a_malformed_address_is_refused() -> None:
    with pytest.raises(ConfigError, match="RAY_ADDRESS=head:port: expected host:port"):
        ray_cluster.parse_address("head:port")


def test_an_unreachable_cluster_is_one_line_naming_what_to_change(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    address = f"127.0.0.1:{closed_port()}"
    monkeypatch.setenv("RAY_ADDRESS", address)
    start = time.perf_counter()
    with pytest.raises(ConfigError) as raised:
        ray_cluster.connect()
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(f"RAY_ADDRESS={address}: no Ray cluster answers at {address}")
    assert "`ray start --head`" in message
    assert "unset RAY_ADDRESS" in message
    assert time.perf_counter() - start < 10  # not Ray's minutes of retries


def test_without_ray_installed_the_error_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(ConfigError, match=r'pip install "grounding\[ray\]"'):
        ray_cluster.require_ray()


def test_a_worker_s_user_error_comes_back_as_itself() -> None:
    from grounding.errors import DataError

    row = {name: values[0] for name, values in ray_cluster.error_fields(DataError("x")).items()}
    with pytest.raises(DataError, match=r"^x$"):
        ray_cluster.raise_error(row)
    clean = {name: values[0] for name, values in ray_cluster.error_fields(None).items()}
    ray_cluster.raise_error(clean)  # nothing to raise
