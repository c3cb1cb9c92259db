"""The conversation's client frames (typing, edit, delete, react), mentions, and messages shown as they now are
(docs/protocol.md)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from infinite_chat.protocol import (
    MENTIONS_MAX,
    REACTION_NAMES_SHOWN,
    REACTIONS,
    Changes,
    Delete,
    Edit,
    ProtocolError,
    React,
    Typing,
    change_body,
    entry_frame,
    mentions_in,
    message_as_now,
    message_body,
    parse_client_frame,
)


def frame(**fields: Any) -> str:
    return json.dumps(fields)


def refused(data: str) -> ProtocolError:
    with pytest.raises(ProtocolError) as caught:
        parse_client_frame(data)
    return caught.value


def test_typing_needs_nothing_but_its_type() -> None:
    assert parse_client_frame(frame(type="typing", text="ignored")) == Typing()


def test_edit_delete_and_react_parse_with_their_ref() -> None:
    assert parse_client_frame(frame(type="edit", id="1-2", text="  new  ", ref="r")) == Edit("1-2", "new", "r")
    assert parse_client_frame(frame(type="delete", id="1-2")) == Delete("1-2", None)
    assert parse_client_frame(frame(type="react", id="1-2", emoji="🎉")) == React("1-2", "🎉", True, None)
    assert parse_client_frame(frame(type="react", id="1-2", emoji="❤️", on=False, ref="x")) == React(
        "1-2", "❤️", False, "x"
    )


@pytest.mark.parametrize("target", [None, 12, "", "abc", "1-", "99999999999999999999-0", ["1-2"]])
@pytest.mark.parametrize("kind", ["edit", "delete", "react"])
def test_a_change_needs_an_id_that_can_be_a_message_id(kind: str, target: object) -> None:
    error = refused(frame(type=kind, id=target, text="t", emoji="👍", ref="r"))
    assert (error.code, error.ref) == ("invalid_id", "r")


def test_a_change_checks_its_ref_first_then_its_id_then_its_text() -> None:
    assert refused(frame(type="edit", id="x", text="", ref=5)).code == "invalid_ref"
    assert refused(frame(type="edit", id="x", text="")).code == "invalid_id"
    assert refused(frame(type="edit", id="1-1", text=" ")).code == "invalid_text"
    assert refused(frame(type="edit", id="1-1", text="x" * 2001)).code == "too_long"
    assert refused(frame(type="edit", id="1-1", text="a\u202eb")).code == "invalid_text"


@pytest.mark.parametrize(
    ("emoji", "on"), [("🦄", True), ("👍🏽", True), ("❤", True), ("", True), (None, True), ("👍", "yes"), ("👍", 1)]
)
def test_a_reaction_is_one_of_the_set_and_on_is_a_boolean(emoji: object, on: object) -> None:
    error = refused(frame(type="react", id="1-1", emoji=emoji, on=on, ref="r"))
    assert (error.code, error.ref) == ("invalid_reaction", "r")


def test_the_set_of_reactions_is_twelve_short_strings() -> None:
    assert len(REACTIONS) == len(set(REACTIONS)) == 12
    assert all(1 <= len(emoji) <= 2 for emoji in REACTIONS)


@pytest.mark.parametrize(
    ("text", "mentions"),
    [
        ("@ann hi", ["ann"]),
        ("hi @ann, @bob! and @ann again", ["ann", "bob"]),
        ("(@ann)", ["ann"]),
        ("mail ann@example.org", []),
        ("@ann's", ["ann's"]),
        ("@" + "x" * 32, ["x" * 32]),
        ("@" + "x" * 33, []),
        ("@ alone", []),
        ("line\n@zoë.", ["zoë"]),
        ("@Ann and @ann", ["Ann", "ann"]),
    ],
)
def test_mentions_are_the_names_after_an_at_sign(text: str, mentions: list[str]) -> None:
    assert mentions_in(text) == mentions


def test_mentions_are_bounded() -> None:
    assert len(mentions_in(" ".join(f"@n{i}" for i in range(50)))) == MENTIONS_MAX


def test_a_message_lists_its_mentions_only_when_it_has_some() -> None:
    assert json.loads(b"{" + message_body("lobby", "ann", "hi @bob", None))["mentions"] == ["bob"]
    assert "mentions" not in json.loads(b"{" + message_body("lobby", "ann", "hi", None))


def test_a_change_is_an_object_of_its_own_type_with_its_target() -> None:
    body = change_body("lobby", "ann", Edit("1-1", "hi @bob", "r"))
    obj = json.loads(entry_frame("edit", "1795840487872-3", body))
    assert obj == {
        "type": "edit",
        "id": "1795840487872-3",
        "ts": "2026-11-28T04:34:47.872Z",
        "room": "lobby",
        "name": "ann",
        "target": "1-1",
        "text": "hi @bob",
        "mentions": ["bob"],
        "ref": "r",
    }


def test_a_message_as_it_now_is() -> None:
    body = message_body("lobby", "ann", "hi @bob", "r")
    edit = change_body("lobby", "ann", Edit("5-0", "hello", None))
    names = [f"fan{n}" for n in range(REACTION_NAMES_SHOWN + 3)]
    shown = json.loads(
        message_as_now("5-0", body, Changes(edit_id="9000-0", edit_body=edit, reactions=[("👍", names), ("🎉", ["x"])]))
    )
    assert shown["text"] == "hello"
    assert "mentions" not in shown  # the edit has none
    assert shown["edited"] == "1970-01-01T00:00:09.000Z"
    assert shown["reactions"] == [
        {"emoji": "👍", "count": len(names), "names": names[:REACTION_NAMES_SHOWN]},
        {"emoji": "🎉", "count": 1, "names": ["x"]},
    ]
    deleted = json.loads(message_as_now("5-0", body, Changes(deleted_id="7000-1")))
    assert deleted == {
        "type": "message",
        "id": "5-0",
        "ts": "1970-01-01T00:00:00.005Z",
        "room": "lobby",
        "name": "ann",
        "ref": "r",
        "deleted": "1970-01-01T00:00:07.000Z",
    }
