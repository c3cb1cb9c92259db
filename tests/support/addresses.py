"""Client addresses for the tests. Every test client runs on this host, which nginx sees as one address (Docker's
gateway), while the stack limits what one address may do. The test stack trusts X-Forwarded-For from there
(REAL_IP_FROM in tests/stack.env, as an operator would for a proxy in front of nginx), so each client is a user with
an address of its own unless a test gives several the same one: an attacker's sockets, an office behind one NAT."""

from __future__ import annotations

import ipaddress
import secrets

# RFC 2544's block for benchmark tests: never an address anyone has on the internet.
TEST_NETWORK = ipaddress.ip_network("198.18.0.0/15")


def new_address() -> str:
    # Not `random`: Hypothesis seeds it for each example, which would give the fuzz test's sockets one address.
    return str(TEST_NETWORK[1 + secrets.randbelow(TEST_NETWORK.num_addresses - 2)])


def forwarded(address: str | None = None) -> dict[str, str]:
    """The header that makes a request come from `address` (a fresh one when None) as far as the stack is concerned."""
    return {"X-Forwarded-For": address or new_address()}
