"""Moderators' frames as the server parses them (protocol.py): every field checked, each refusal with its code and
the frame's ref; the rule's notice as clients get it."""

from __future__ import annotations

import json
from typing import Any

import pytest

from infinite_chat.protocol import (
    MODERATION_SECONDS_MAX,
    SLOW_SECONDS_MAX,
    Ban,
    Delete,
    Join,
    Mute,
    ProtocolError,
    Scope,
    Slow,
    moderation_frame,
    parse_client_frame,
)


def parse(obj: dict[str, Any]) -> object:
    return parse_client_frame(json.dumps(obj))


def refused(obj: dict[str, Any]) -> ProtocolError:
    with pytest.raises(ProtocolError) as error:
        parse(obj)
    return error.value


def test_each_action_parses_with_its_fields() -> None:
    assert parse({"type": "mute", "name": " bob ", "seconds": 600, "reason": " cool off ", "ref": "r"}) == Mute(
        "bob", 600, "cool off", "r"
    )
    assert parse({"type": "ban", "name": "bob", "seconds": None}) == Ban("bob", None, Scope.ROOM, None)
    assert parse({"type": "ban", "name": "bob", "seconds": 60, "scope": "chat"}) == Ban("bob", 60, Scope.CHAT, None)
    assert parse({"type": "ban", "name": "bob"}) == Ban("bob", None, Scope.ROOM, None)  # no seconds: for good
    assert parse({"type": "slow", "seconds": 0}) == Slow(0, None)
    assert parse({"type": "delete", "id": "1-0", "reason": "spam"}) == Delete("1-0", None, "spam")
    assert parse({"type": "join", "name": "mod", "moderator": "t0ken"}) == Join("mod", "lobby", None, None, "t0ken")


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ({"type": "mute", "name": "bob"}, "invalid_moderation"),
        ({"type": "mute", "name": "bob", "seconds": -1}, "invalid_moderation"),
        ({"type": "mute", "name": "bob", "seconds": MODERATION_SECONDS_MAX + 1}, "invalid_moderation"),
        ({"type": "mute", "name": "bob", "seconds": True}, "invalid_moderation"),
        ({"type": "mute", "name": "bob", "seconds": 1.5}, "invalid_moderation"),
        ({"type": "mute", "name": "bob", "seconds": None}, "invalid_moderation"),  # a mute is never for good
        ({"type": "mute", "seconds": 60}, "invalid_name"),
        ({"type": "mute", "name": "bell\x07", "seconds": 60}, "invalid_name"),
        ({"type": "ban", "name": "bob", "scope": "world"}, "invalid_moderation"),
        ({"type": "ban", "name": "bob", "seconds": "60"}, "invalid_moderation"),
        ({"type": "slow", "seconds": SLOW_SECONDS_MAX + 1}, "invalid_moderation"),
        ({"type": "slow"}, "invalid_moderation"),
        ({"type": "mute", "name": "bob", "seconds": 60, "reason": "x" * 201}, "invalid_moderation"),
        ({"type": "mute", "name": "bob", "seconds": 60, "reason": "\u202eevil"}, "invalid_moderation"),
        ({"type": "mute", "name": "bob", "seconds": 60, "reason": 5}, "invalid_moderation"),
        ({"type": "delete", "id": "1-0", "reason": ["spam"]}, "invalid_moderation"),
        ({"type": "join", "name": "mod", "moderator": 5}, "invalid_token"),
        ({"type": "join", "name": "mod", "moderator": "t" * 8193}, "invalid_token"),
    ],
)
def test_a_bad_field_gets_its_code_and_the_frames_ref(frame: dict[str, Any], code: str) -> None:
    error = refused({**frame, "ref": "mine"} if frame["type"] != "join" else frame)
    assert error.code == code
    if frame["type"] != "join":
        assert error.ref == "mine"


def test_a_notice_says_what_who_and_until_when() -> None:
    frame = moderation_frame(
        "mute", room="lobby", name="bob", seconds=600, until="2026-12-02T17:40:00.000Z", by="alice", reason=None
    )
    assert json.loads(frame) == {
        "type": "moderation",
        "action": "mute",
        "room": "lobby",
        "name": "bob",
        "seconds": 600,
        "until": "2026-12-02T17:40:00.000Z",
        "by": "alice",
        "reason": None,
    }
