"""Who a client is for the per-address limits (addresses.py): the address the proxy in front vouches for."""

from __future__ import annotations

import pytest

from infinite_chat.addresses import Sockets, address_key, client_address


def test_the_rightmost_forwarded_address_is_the_one_the_proxy_saw() -> None:
    headers = [(b"x-forwarded-for", b"6.6.6.6, 198.18.0.7")]
    assert client_address(headers, ("172.18.0.3", 5000)) == "198.18.0.7"


def test_a_client_cannot_choose_its_address_by_sending_the_header_itself() -> None:
    # nginx appends what it saw to whatever the client sent; only the last entry counts.
    headers = [(b"x-forwarded-for", b"10.0.0.1"), (b"x-forwarded-for", b"10.0.0.1, 203.0.113.9")]
    assert client_address(headers, None) == "203.0.113.9"


def test_without_the_header_the_peer_is_the_client() -> None:
    assert client_address([], ("127.0.0.1", 40000)) == "127.0.0.1"
    assert client_address([], None) == "unknown"


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ("198.18.0.7", "198.18.0.7"),
        (" 198.18.0.7 ", "198.18.0.7"),
        ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
        ("[2001:db8:1:2::9]", "2001:db8:1:2::/64"),
        ("::ffff:198.18.0.7", "198.18.0.7"),
        ("not an address", "unknown"),
        ("", "unknown"),
    ],
)
def test_addresses_are_counted_by_host_and_ipv6_by_its_64(raw: str, key: str) -> None:
    assert address_key(raw) == key


def test_an_address_at_its_socket_limit_is_refused_until_one_closes() -> None:
    sockets = Sockets(per_address=2)
    assert sockets.open("a")
    assert sockets.open("a")
    assert not sockets.open("a")
    assert sockets.open("b")
    sockets.closed("a")
    assert sockets.open("a")
