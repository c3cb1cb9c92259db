"""Every code the server sends is defined once (protocol.py) and documented exactly (docs/protocol.md), and the
page only handles codes that exist: a code added, renamed or dropped on one side fails here."""

from __future__ import annotations

import re
from pathlib import Path

from infinite_chat.protocol import CloseCode, ErrorCode, HttpError

ROOT = Path(__file__).resolve().parents[2]
DOC = (ROOT / "docs" / "protocol.md").read_text(encoding="utf-8")
PAGE = (ROOT / "services" / "web" / "src" / "infinite_chat" / "static" / "app.js").read_text(encoding="utf-8")


def section(title: str, until: str) -> str:
    return DOC.split(title, 1)[1].split(until, 1)[0]


def test_the_error_codes_documented_are_exactly_the_servers() -> None:
    errors = section("#### `error`", "### Closing")
    fields = {"code", "detail", "ref", "retry_after_ms"}
    documented = set(re.findall(r"^\| `([a-z_]+)` \|", errors, re.M)) - fields
    assert documented == {code.value for code in ErrorCode}


def test_the_close_codes_documented_are_exactly_the_servers() -> None:
    closing = section("### Closing", "## Reconnecting")
    documented = {int(code) for code in re.findall(r"^\| (\d{4})\b", closing, re.M)}
    assert documented - {1006} == {code.value for code in CloseCode}  # 1006 is no close frame at all


def test_every_http_error_is_documented_and_every_documented_one_exists() -> None:
    in_tables = set(re.findall(r"^\| \d{3} \| `([a-z_]+)` \|", DOC, re.M))
    assert in_tables <= {code.value for code in HttpError}
    for code in HttpError:
        assert f"`{code.value}`" in DOC or f'"{code.value}"' in DOC, f"{code.value} is not in docs/protocol.md"


def test_the_page_handles_only_codes_the_server_sends() -> None:
    # The page switches on object types (the ten the server sends) and on error codes.
    objects = {"welcome", "message", "presence", "error", "edit", "delete", "reaction", "typing", "released"}
    objects |= {"moderation"}
    handled = set(re.findall(r'case "([a-z_]+)":', PAGE)) - objects
    assert handled, "the page's error handling moved: update this test"
    assert handled <= {code.value for code in ErrorCode} | {code.value for code in HttpError}
