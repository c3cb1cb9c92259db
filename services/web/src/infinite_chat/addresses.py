"""Who a client is, as far as limits go: its address, as the proxy in front forwarded it, and how many sockets
each address holds on this replica.

The replicas are reachable only through nginx (Compose) or an Application Load Balancer (AWS), and both append the
address they saw to X-Forwarded-For: the rightmost entry is the one that proxy vouches for; anything left of it is
what the client claimed. Without the header (a replica run alone, the test client) the TCP peer is the client.
IPv6 addresses count by their /64, the block one host usually has, so that a host cannot take a fresh address per
socket.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

UNKNOWN = "unknown"


def client_address(headers: Iterable[tuple[bytes, bytes]], peer: tuple[str, int] | None) -> str:
    """The key an address is counted under: an IPv4 address, an IPv6 /64 (`2001:db8::/64`), or "unknown"."""
    raw = peer[0] if peer else ""
    for key, value in headers:
        if key == b"x-forwarded-for":
            # With several such headers, the last one is the proxy's.
            raw = value.rpartition(b",")[2].decode("latin-1")
    return address_key(raw)


def address_key(raw: str) -> str:
    try:
        address = ipaddress.ip_address(raw.strip().strip("[]"))
    except ValueError:
        return UNKNOWN
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


class Sockets:
    """Open sockets per address on this replica; an address at its limit is refused more."""

    def __init__(self, per_address: int) -> None:
        self.per_address = per_address
        self._open: dict[str, int] = {}

    def open(self, address: str) -> bool:
        """Counts a new socket of `address`; False (and nothing counted) when it already has its limit."""
        count = self._open.get(address, 0)
        if count >= self.per_address:
            return False
        self._open[address] = count + 1
        return True

    def closed(self, address: str) -> None:
        count = self._open.get(address, 0) - 1
        if count > 0:
            self._open[address] = count
        else:
            self._open.pop(address, None)
