"""The claim tokens of the names the tests join with: one test run is one set of people, so a test that joins as
"alice" after another test claimed "alice" on the same stack is alice again, as the page would be with its token."""

from __future__ import annotations

import secrets

from infinite_chat.names import fold

_TOKENS: dict[str, str] = {}


def token_for(name: str) -> str | None:
    return _TOKENS.get(fold(name))


def remember(name: str, token: str) -> None:
    _TOKENS[fold(name)] = token


def unique(name: str) -> str:
    """A name nobody in this run has claimed: for a test about claiming, or an attacker's fresh identity."""
    return f"{name}-{secrets.token_hex(4)}"
