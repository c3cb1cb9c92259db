"""Protocol v1 in isolation: what a client frame may hold (every error code, trimming, limits at their exact
boundaries) and the server objects as clients receive them (docs/protocol.md)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from infinite_chat.protocol import (
    NAME_MAX,
    REF_MAX,
    TEXT_MAX,
    Join,
    ProtocolError,
    Say,
    error_frame,
    is_name,
    message_body,
    message_frame,
    parse_client_frame,
    parse_message_id,
    presence_frame,
    welcome_frame,
)


def frame(**fields: Any) -> str:
    return json.dumps(fields)


def refused(data: str | bytes) -> ProtocolError:
    with pytest.raises(ProtocolError) as caught:
        parse_client_frame(data)
    return caught.value


# bad_json and unknown_type


@pytest.mark.parametrize(
    "data",
    [
        b'{"type": "say", "text": "hi"}',  # binary frame, even of valid JSON
        b"",
        "",
        "not json",
        '{"type": "say"',
        "[]",
        '[{"type": "say", "text": "hi"}]',
        "5",
        '"say"',
        "null",
        "true",
        "[" * 2000 + "]" * 2000,  # deeper than any parser should follow
        "1e400",
        '{"type": "say", "text": "\\ud800"}',  # a lone surrogate cannot be text
        '{"type": "say", "text": "a"}\n{"type": "say", "text": "b"}',  # one object per client frame
    ],
)
def test_anything_but_one_json_object_in_a_text_frame_is_bad_json(data: str | bytes) -> None:
    error = refused(data)
    assert error.code == "bad_json"
    assert error.detail
    assert error.ref is None


@pytest.mark.parametrize("kind", ["hello", "", "SAY", 5, None, ["say"], {"say": 1}])
def test_an_unknown_type_is_refused_and_its_ref_echoed(kind: object) -> None:
    error = refused(frame(type=kind, ref="r-1"))
    assert error.code == "unknown_type"
    assert error.ref == "r-1"


def test_a_frame_without_type_is_an_unknown_type() -> None:
    error = refused(frame(text="hi", ref=5))
    assert error.code == "unknown_type"
    assert error.ref is None  # an invalid ref is not echoed


# join


def test_join_with_only_a_name_goes_to_the_lobby() -> None:
    assert parse_client_frame(frame(type="join", name="alice")) == Join(name="alice", room="lobby", since=None)


def test_join_with_null_room_and_empty_since_means_their_defaults() -> None:
    assert parse_client_frame(frame(type="join", name="a", room=None, since="")) == Join("a", "lobby", None)


def test_join_keeps_room_and_since() -> None:
    parsed = parse_client_frame(frame(type="join", name="bob", room="team-7_x", since="1700000000000-3"))
    assert parsed == Join(name="bob", room="team-7_x", since="1700000000000-3")


def test_a_since_that_cannot_be_an_id_is_kept_for_the_session_to_treat_as_unknown() -> None:
    parsed = parse_client_frame(frame(type="join", name="bob", since="yesterday"))
    assert isinstance(parsed, Join)
    assert parsed.since == "yesterday"


@pytest.mark.parametrize("since", [5, 1.5, True, ["1-0"], {"id": "1-0"}])
def test_a_since_that_is_not_a_string_is_invalid_since(since: object) -> None:
    assert refused(frame(type="join", name="bob", since=since)).code == "invalid_since"


@pytest.mark.parametrize(
    ("raw", "trimmed"),
    [
        ("  alice  ", "alice"),
        ("\u00a0alice\u3000", "alice"),  # Unicode spaces are trimmed too
        ("Zoë 🚀", "Zoë 🚀"),
        ("a" * NAME_MAX, "a" * NAME_MAX),
        (" " + "a" * NAME_MAX + " ", "a" * NAME_MAX),  # the limit applies after trimming
        ("🚀" * NAME_MAX, "🚀" * NAME_MAX),  # characters, not bytes
        ("a|b", "a|b"),
    ],
)
def test_names_are_trimmed_and_accepted_up_to_the_limit(raw: str, trimmed: str) -> None:
    parsed = parse_client_frame(frame(type="join", name=raw))
    assert isinstance(parsed, Join)
    assert parsed.name == trimmed


@pytest.mark.parametrize(
    "name",
    [
        "",
        "   ",
        "\n\t",
        "a" * (NAME_MAX + 1),
        "a\nb",
        "a\tb",
        "a\x00b",
        "a\x1bb",
        "a\x7fb",
        "a\x85b",
        "a\u2028b",
        "a\u2029b",
        5,
        None,
        ["alice"],
        {"first": "alice"},
    ],
)
def test_bad_names_are_invalid_name(name: object) -> None:
    error = refused(frame(type="join", name=name))
    assert error.code == "invalid_name"
    assert error.detail


def test_a_join_without_a_name_is_invalid_name() -> None:
    assert refused(frame(type="join", room="lobby")).code == "invalid_name"


@pytest.mark.parametrize("room", ["a", "a" * 32, "0-_z", "lobby"])
def test_rooms_of_1_to_32_allowed_characters_are_accepted(room: str) -> None:
    parsed = parse_client_frame(frame(type="join", name="a", room=room))
    assert isinstance(parsed, Join)
    assert parsed.room == room


@pytest.mark.parametrize("room", ["", "a" * 33, "Lobby", "a b", " lobby", "lobby\n", "lobby.x", "é", 5, ["lobby"], {}])
def test_other_rooms_are_invalid_room(room: object) -> None:
    assert refused(frame(type="join", name="a", room=room)).code == "invalid_room"


def test_the_name_is_checked_before_the_room() -> None:
    assert refused(frame(type="join", name="", room="BAD")).code == "invalid_name"


# say


def test_say_trims_the_text_and_keeps_the_ref() -> None:
    assert parse_client_frame(frame(type="say", text="  hello \n", ref="c-1")) == Say(text="hello", ref="c-1")


def test_say_without_ref() -> None:
    assert parse_client_frame(frame(type="say", text="hi")) == Say(text="hi", ref=None)


@pytest.mark.parametrize(
    "text",
    [
        "x" * TEXT_MAX,
        "  " + "x" * TEXT_MAX + "\n\n",  # the limit applies after trimming
        "🚀" * TEXT_MAX,  # characters, not bytes
        "line one\nline two\tand a tab",
        "<img src=x onerror=alert(1)>",
        "\u200b zero width is not a control character",
    ],
)
def test_texts_up_to_the_limit_with_newlines_and_tabs_are_accepted(text: str) -> None:
    parsed = parse_client_frame(frame(type="say", text=text))
    assert isinstance(parsed, Say)
    assert parsed.text == text.strip()


def test_a_text_one_over_the_limit_is_too_long_with_its_ref() -> None:
    error = refused(frame(type="say", text="x" * (TEXT_MAX + 1), ref="c-9"))
    assert error.code == "too_long"
    assert error.ref == "c-9"


@pytest.mark.parametrize(
    "text", ["", "   ", "\n\t", None, 5, ["hi"], {"text": "hi"}, "a\rb", "a\x00b", "\x07", "a\x7f", "a\u2028b"]
)
def test_missing_blank_or_control_character_texts_are_invalid_text_with_their_ref(text: object) -> None:
    error = refused(frame(type="say", text=text, ref="c-2"))
    assert error.code == "invalid_text"
    assert error.ref == "c-2"


def test_a_say_without_text_is_invalid_text() -> None:
    assert refused(frame(type="say")).code == "invalid_text"


def test_an_empty_ref_is_a_ref() -> None:
    assert parse_client_frame(frame(type="say", text="hi", ref="")) == Say(text="hi", ref="")
    assert json.loads(message_frame("1-0", message_body("lobby", "a", "hi", "")))["ref"] == ""


def test_a_ref_of_the_limit_is_accepted() -> None:
    parsed = parse_client_frame(frame(type="say", text="hi", ref="r" * REF_MAX))
    assert isinstance(parsed, Say)
    assert parsed.ref == "r" * REF_MAX


@pytest.mark.parametrize("ref", ["r" * (REF_MAX + 1), 5, ["r"], {"r": 1}, True])
def test_a_ref_over_the_limit_or_not_a_string_is_invalid_ref_and_not_echoed(ref: object) -> None:
    error = refused(frame(type="say", text="hi", ref=ref))
    assert error.code == "invalid_ref"
    assert error.ref is None


def test_the_ref_is_checked_before_the_text() -> None:
    assert refused(frame(type="say", text=None, ref=5)).code == "invalid_ref"


# message ids


@pytest.mark.parametrize(
    ("raw", "parsed"),
    [("1700000000000-0", (1700000000000, 0)), ("0-0", (0, 0)), ("1-42", (1, 42)), ("9" * 19 + "-1", (10**19 - 1, 1))],
)
def test_message_ids_parse_to_a_sortable_pair(raw: str, parsed: tuple[int, int]) -> None:
    assert parse_message_id(raw) == parsed


@pytest.mark.parametrize(
    "raw",
    ["", "1", "1-", "-1", "a-1", "1-0-0", " 1-0", "1-0\n", "1.5-0", "+1-0", "9" * 20 + "-0", "1-" + "9" * 20, "١-٠"],
)
def test_strings_that_redis_would_not_take_as_a_stream_id_are_not_ids(raw: str) -> None:
    """Anything that matches is passed to Redis, which answers an error (looking like an outage) for the rest."""
    assert parse_message_id(raw) is None


def test_ids_order_numerically_not_as_text() -> None:
    assert parse_message_id("9-0") < parse_message_id("10-0")  # type: ignore[operator]
    assert parse_message_id("5-9") < parse_message_id("5-10")  # type: ignore[operator]


# server objects


def test_a_message_object_has_every_field_and_the_time_of_its_id() -> None:
    body = message_body("lobby", "alice", "hi\nthere", "c-17")
    obj = json.loads(message_frame("1795840487872-3", body))
    assert obj == {
        "type": "message",
        "id": "1795840487872-3",
        "ts": "2026-11-28T04:34:47.872Z",
        "room": "lobby",
        "name": "alice",
        "text": "hi\nthere",
        "ref": "c-17",
    }


def test_a_message_without_ref_has_no_ref_field() -> None:
    obj = json.loads(message_frame("1000-0", message_body("lobby", "alice", "hi", None)))
    assert "ref" not in obj
    assert obj["ts"] == "1970-01-01T00:00:01.000Z"  # milliseconds always written with three digits


def test_server_objects_never_contain_a_raw_newline() -> None:
    """The frame separator: several objects share a frame, one per line."""
    text = "a\nb\tc \u2028 \\n"
    encoded = message_frame("1-0", message_body("lobby", "line\nname", text, "x\ny"))
    assert b"\n" not in encoded
    assert json.loads(encoded)["text"] == text
    assert b"\n" not in error_frame(ProtocolError("invalid_text", "two\nlines", "r\n"))


def test_the_welcome_splices_history_in_unchanged() -> None:
    history = [message_frame(f"{n}-0", message_body("lobby", "bob", f"m{n}", None)) for n in (1, 2)]
    obj = json.loads(
        welcome_frame(
            replica="web-a",
            room="lobby",
            name="alice",
            history=history,
            online=["alice", "bob"],
            online_count=3,
            resumed=True,
            token="the-token",
        )
    )
    assert obj == {
        "type": "welcome",
        "replica": "web-a",
        "room": "lobby",
        "name": "alice",
        "history": [json.loads(message) for message in history],
        "online": ["alice", "bob"],
        "online_count": 3,
        "resumed": True,
        "token": "the-token",
    }


def test_an_error_always_has_code_detail_and_ref() -> None:
    obj = json.loads(error_frame(ProtocolError("bad_json", "That frame is not valid JSON.")))
    assert obj == {"type": "error", "code": "bad_json", "detail": "That frame is not valid JSON.", "ref": None}


def test_only_rate_limited_errors_say_when_to_retry() -> None:
    obj = json.loads(error_frame(ProtocolError("rate_limited", "Slow down.", "c-3"), retry_after_ms=150))
    assert obj == {"type": "error", "code": "rate_limited", "detail": "Slow down.", "ref": "c-3", "retry_after_ms": 150}


def test_a_presence_event_says_truncated_only_when_it_is() -> None:
    assert json.loads(presence_frame("join", "bob", ["bob"], [], 2, truncated=False)) == {
        "type": "presence",
        "event": "join",
        "name": "bob",
        "joined": ["bob"],
        "left": [],
        "online_count": 2,
    }
    assert json.loads(presence_frame("leave", "al", [], ["al"], 1, truncated=True))["truncated"] is True


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("alice", True),
        ("Zoë 🚀", True),
        ("a" * NAME_MAX, True),
        ("a" * (NAME_MAX + 1), False),
        ("", False),
        (" alice", False),
        ("alice ", False),
        ("alice\u200b", False),
        ("\u202enimda", False),
        ("a\nb", False),
    ],
)
def test_is_name_is_true_of_exactly_the_names_a_join_keeps(raw: str, expected: bool) -> None:
    assert is_name(raw) is expected
    if expected:
        assert parse_client_frame(frame(type="join", name=raw)).name == raw  # type: ignore[union-attr]
