"""Who may open a chat socket (websocket.py): the page's own origin, listed origins, and clients that are not
browsers; never another site's page (cross-site WebSocket hijacking)."""

from __future__ import annotations

import pytest

from infinite_chat.websocket import origin_allowed


def headers(origin: str | None, host: str = "chat.example.com") -> list[tuple[bytes, bytes]]:
    pairs = [(b"host", host.encode())]
    return pairs + ([(b"origin", origin.encode())] if origin is not None else [])


@pytest.mark.parametrize(
    "origin", ["https://chat.example.com", "http://chat.example.com", "https://CHAT.example.com/", None]
)
def test_the_pages_own_origin_and_non_browsers_are_let_in(origin: str | None) -> None:
    assert origin_allowed(headers(origin), frozenset())


@pytest.mark.parametrize(
    "origin",
    [
        "https://evil.example",
        "null",
        "https://chat.example.com.evil.example",
        "https://evil.example/https://chat.example.com",
        "ftp://chat.example.com",
        "https://chat.example.com:8443",
    ],
)
def test_other_origins_are_refused(origin: str) -> None:
    assert not origin_allowed(headers(origin), frozenset())


def test_a_listed_origin_is_let_in() -> None:
    allowed = frozenset({"https://app.example.org"})
    assert origin_allowed(headers("https://app.example.org"), allowed)
    assert not origin_allowed(headers("https://other.example.org"), allowed)
