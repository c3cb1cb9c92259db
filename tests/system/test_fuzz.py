"""Protocol fuzzing through nginx: Hypothesis sends thousands of random frames (random JSON, wrong types, deep
nesting, huge numbers, invalid UTF-8 in text frames, binary, empty and fragmented frames). Every frame gets exactly
one answer (an error with a known code, a welcome or the message) or a clean close with the code for it; after
each run of frames the same socket (or a fresh one, after a clean close) still chats; and at the end the replicas
serve others, hold no leaked sockets and logged no error.

Quick profile by default (500 runs of 5 to 40 frames, about 4,000); `pytest --long` also runs the long one
(5,000 runs, about 40,000 frames).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
import websockets
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.sync.client import ClientConnection, connect

from infinite_chat.protocol import REACTIONS, ErrorCode
from support.addresses import forwarded
from support.chat import eventually, still_chats
from support.names import unique
from support.stack import Stack

MAX_FRAME = 16 * 1024
ERROR_CODES = {code.value for code in ErrorCode}

QUICK = settings(
    max_examples=500,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)
LONG = settings(QUICK, max_examples=5000)

# ---- what to send ------------------------------------------------------------------------------------------------

Frame = tuple[str, Any]  # (kind, payload): text, binary, bad_utf8, oversized, fragments

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=50),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=20,
)
ids = st.tuples(st.integers(0, 2**70), st.integers(0, 2**70)).map(lambda t: f"{t[0]}-{t[1]}")
strings = st.text(max_size=40) | st.text(max_size=2100) | st.sampled_from(["", " ", "\n", "\u2028", "\x00", "lobby"])
protocol_shaped = st.fixed_dictionaries(
    {
        "type": st.sampled_from(
            ["join", "say", "typing", "edit", "delete", "react", "release", "mute", "ban", "slow", "limits"]
        )
        | st.text(max_size=8)
        | json_values
    },
    optional={
        "id": ids | strings | json_values,
        "emoji": st.sampled_from(REACTIONS) | strings | json_values,
        "on": st.booleans() | json_values,
        "name": strings | json_values,
        "room": st.from_regex(r"[a-z0-9_-]{1,33}", fullmatch=True) | strings | json_values,
        "since": ids | strings | json_values,
        "text": strings | json_values,
        "ref": st.text(max_size=70) | json_values,
        "token": st.text(max_size=70) | st.just("t" * 8193) | json_values,
        "moderator": st.text(max_size=70) | json_values,
        "seconds": st.integers(-5, 3_000_000) | st.none() | json_values,
        "scope": st.sampled_from(["room", "chat"]) | json_values,
        "sockets": st.integers(-5, 2000) | json_values,
        "reason": st.text(max_size=250) | json_values,
    },
)


def encoded(value: object, ascii_only: bool) -> str:
    # NaN and Infinity come out as Python's non-JSON literals: more bad JSON, on purpose.
    return json.dumps(value, ensure_ascii=ascii_only)


def deep(depth: int, shape: str) -> str:
    return "[" * depth + "]" * depth if shape == "list" else '{"a":' * depth + "1" + "}" * depth


json_text = st.builds(encoded, json_values | protocol_shaped, st.booleans())
nested = st.builds(deep, st.integers(1, 2500), st.sampled_from(["list", "dict"]))
huge_numbers = st.integers(1, 12000).map(lambda n: '{"type": "say", "text": "n", "ref": ' + "9" * n + "}") | st.just(
    '{"type": "join", "name": 1e999999}'
)
escaped_surrogates = st.sampled_from(['{"type":"say","text":"\\ud800"}', '{"type":"join","name":"\\udfff\\ud800"}'])
invalid_utf8 = st.builds(lambda a, b: a + b"\xff\xc0" + b, st.binary(max_size=30), st.binary(max_size=30))

answered: st.SearchStrategy[Frame] = st.one_of(
    st.tuples(st.just("text"), json_text),
    st.tuples(st.just("text"), nested),
    st.tuples(st.just("text"), huge_numbers),
    st.tuples(st.just("text"), escaped_surrogates),
    st.tuples(st.just("text"), st.text(max_size=300)),
    st.tuples(st.just("text"), st.just("")),
    st.tuples(st.just("binary"), st.binary(max_size=300)),
    st.tuples(st.just("fragments"), st.lists(st.text(max_size=40), min_size=1, max_size=5)),
)
closing: st.SearchStrategy[Frame] = st.one_of(
    st.tuples(st.just("bad_utf8"), invalid_utf8),
    st.tuples(st.just("oversized"), st.integers(MAX_FRAME + 1, MAX_FRAME * 2)),
)
# Mostly frames that get an answer: each closing one costs a new socket.
frames = st.one_of(answered, answered, answered, answered, answered, closing)

# ---- talking -------------------------------------------------------------------------------------------------------


@dataclass
class Prober:
    """One socket under fuzz, with the objects it has received but not yet looked at."""

    url: str
    ws: ClientConnection = field(init=False)
    waiting: list[dict[str, Any]] = field(default_factory=list)
    closes: list[int] = field(default_factory=list)
    frames_sent: int = 0

    def __post_init__(self) -> None:
        self.ws = self._open()

    def _open(self) -> ClientConnection:
        # Entered by hand: the socket outlives any one block here, and close() ends it.
        return connect(
            self.url,
            compression=None,
            max_size=None,
            open_timeout=15,
            close_timeout=5,
            additional_headers=forwarded(),
        ).__enter__()

    def reopen(self) -> None:
        self.ws.close()
        self.ws = self._open()
        self.waiting = []

    def send(self, frame: Frame) -> None:
        kind, payload = frame
        self.frames_sent += 1
        if kind == "text":
            self.ws.send(payload)
        elif kind == "binary":
            self.ws.send(bytes(payload))
        elif kind == "bad_utf8":
            self.ws.send(payload, text=True)
        elif kind == "oversized":
            self.ws.send("x" * payload)
        else:  # one text message in several frames
            self.ws.send(iter(payload))

    def answer(self, timeout: float = 15) -> dict[str, Any]:
        """The next object that answers a frame (presence events and typing lists are not answers)."""
        deadline = time.monotonic() + timeout
        while True:
            while self.waiting:
                obj = self.waiting.pop(0)
                if obj.get("type") not in ("presence", "typing"):
                    return obj
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError("no answer to a frame")
            frame = self.ws.recv(timeout=remaining)
            text = frame if isinstance(frame, str) else frame.decode()
            self.waiting.extend(json.loads(line) for line in text.split("\n"))

    def expect_close(self, code: int) -> None:
        with pytest.raises(websockets.ConnectionClosed):  # noqa: PT012 (answers to earlier frames may come first)
            while True:
                self.ws.recv(timeout=15)
        assert self.ws.protocol.close_rcvd is not None, "the replica dropped the connection without a close frame"
        assert self.ws.protocol.close_code == code
        self.closes.append(code)
        self.reopen()


def expected_close(frame: Frame) -> int | None:
    """The close code a frame must get, or None when it must get an answer."""
    kind, payload = frame
    if kind == "bad_utf8":
        return 1007
    if kind == "oversized" or (kind == "text" and len(payload.encode()) > MAX_FRAME):
        return 1009
    if kind == "fragments" and len("".join(payload).encode()) > MAX_FRAME:
        return 1009
    return None


def text_of(frame: Frame) -> str | bytes:
    kind, payload = frame
    if kind == "fragments":
        return "".join(payload)
    return payload  # type: ignore[no-any-return]


def expected(frame: Frame) -> set[str]:
    """What may answer a frame, by what kind of frame it is: the error codes of its class, or a welcome or the
    message itself. An oracle of its own (Python's json, not the server's parser): a server answering one code to
    everything, or the wrong class's code, fails here."""
    if frame[0] == "binary":
        return {"bad_json"}
    text = text_of(frame)
    if not text:
        return {"bad_json"}
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return {"bad_json"}
    # Python's json reads what the protocol refuses (NaN, numbers past 64 bits, nesting past 1024, lone
    # surrogates): for those, bad_json too, besides what the object itself would get.
    unreadable = {"bad_json"}
    if not isinstance(value, dict):
        return unreadable
    kind = value.get("type")
    if kind == "join":
        return unreadable | {
            "welcome",
            "invalid_name",
            "invalid_room",
            "invalid_since",
            "invalid_token",
            "already_joined",
            "banned",
            "too_many_sockets",
            "name_taken",
            "too_many_names",
            "rate_limited",
        }
    if kind == "release":
        return unreadable | {"released", "invalid_token", "invalid_name", "name_taken", "rate_limited"}
    if kind in ("mute", "ban", "slow", "limits"):
        # The fuzzer is no moderator: its frames are refused, whatever they hold.
        return unreadable | {"invalid_ref", "invalid_name", "invalid_moderation", "not_joined", "not_moderator"}
    if kind == "say":
        say_codes = {
            "invalid_ref",
            "invalid_text",
            "too_long",
            "not_joined",
            "rate_limited",
            "quota_exceeded",
            "too_many_rooms",
        }
        return unreadable | {"message"} | say_codes
    if kind == "typing":
        return unreadable | {"not_joined", SILENT}
    if kind in ("edit", "delete", "react"):
        change_codes = {
            "invalid_ref",
            "invalid_id",
            "invalid_moderation",  # a delete's reason
            "invalid_text",
            "too_long",
            "invalid_reaction",
            "not_joined",
            "rate_limited",
            "quota_exceeded",
            "unknown_message",
            "not_yours",
            "edit_window_closed",
            "message_deleted",
            "no_change",
            "too_many_reactions",
        }
        return unreadable | {"edit", "delete", "reaction"} | change_codes
    return unreadable | {"unknown_type"}


# A frame that gets no answer: a typing notice on a joined socket. After it, a marker frame (an unknown type with
# this ref) shows what came back for it: nothing, or an error that came before the marker's own answer.
SILENT = "silent"
MARKER = json.dumps({"type": "marker", "ref": "after-a-frame-that-may-get-no-answer"})


def may_be_silent(frame: Frame) -> bool:
    return SILENT in expected(frame)


def check_answer(frame: Frame, answer: dict[str, Any]) -> None:
    if answer.get("ref") == "after-a-frame-that-may-get-no-answer":
        assert answer.get("code") == "unknown_type", answer
        answer = {"type": SILENT}
    kind = answer.get("type")
    assert kind in ("error", "welcome", "message", "edit", "delete", "reaction", "released", SILENT), answer
    got = answer["code"] if kind == "error" else kind
    assert got in expected(frame), f"{frame!r:.200} was answered {got}"
    if kind == "error":
        assert answer["code"] in ERROR_CODES, answer
        assert isinstance(answer["detail"], str)
        assert answer["detail"]
        if answer["code"] in ("rate_limited", "quota_exceeded", "too_many_rooms", "too_many_names"):
            assert answer["retry_after_ms"] > 0


def still_answers(prober: Prober, room: str) -> None:
    """The socket still answers like a chat: a join (or 'already joined', or 'slow down' after many tries of names),
    then a message (or 'slow down')."""
    prober.ws.send(json.dumps({"type": "join", "name": unique("prober"), "room": room}))
    joined = prober.answer()
    assert joined["type"] == "welcome" or joined.get("code") in ("already_joined", "rate_limited"), joined
    prober.ws.send(json.dumps({"type": "say", "text": "still here", "ref": "probe"}))
    said = prober.answer()
    assert said["type"] == "message" or said.get("code") == "rate_limited", said
    # What the random frames joined, and this probe, get a socket of their own next time.
    prober.reopen()


@contextmanager
def watched(stack: Stack) -> Iterator[None]:
    """No replica logs an error meanwhile, and every socket opened meanwhile is gone afterwards."""
    since = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(time.time() - 1))
    before = {c: stack.replica_metrics(c)["chat_connections"] for c in stack.web_containers()}
    yield

    def back_to_before() -> bool:
        return all(stack.replica_metrics(c)["chat_connections"] <= n for c, n in before.items())

    asyncio.run(eventually(back_to_before, timeout=30, what="the fuzzed sockets closing on the replicas"))
    for container in stack.web_containers():
        for line in stack.docker("logs", "--since", since, container).stdout.splitlines():
            assert '"level":"error"' not in line, line[:2000]
            assert '"level":"critical"' not in line, line[:2000]


def fuzz(stack: Stack, room: str, profile: settings) -> Prober:
    prober = Prober(stack.ws_url)

    @profile
    @given(st.lists(frames, min_size=5, max_size=40))
    def run(batch: list[Frame]) -> None:
        for frame in batch:
            prober.send(frame)
            close = expected_close(frame)
            if close is not None:
                prober.expect_close(close)
            elif may_be_silent(frame):
                prober.send(("text", MARKER))
                answer = prober.answer()
                check_answer(frame, answer)
                if answer.get("type") == "error" and answer.get("ref") != "after-a-frame-that-may-get-no-answer":
                    marker = prober.answer()  # the marker's own answer, after the error
                    assert marker.get("ref") == "after-a-frame-that-may-get-no-answer", marker
            else:
                check_answer(frame, prober.answer())
        still_answers(prober, room)

    with watched(stack):
        run()
        prober.ws.close()
    return prober


def test_random_frames_get_an_answer_or_a_clean_close(stack: Stack, replicas: list[str], room: str) -> None:
    started = time.monotonic()
    prober = fuzz(stack, room, QUICK)
    asyncio.run(still_chats(stack.ws_url, replicas, f"{room}-{secrets.token_hex(2)}"))
    figures = {
        "test": "fuzz_quick",
        "frames": prober.frames_sent,
        "clean_closes": len(prober.closes),
        "seconds": round(time.monotonic() - started, 1),
    }
    print(f"\nFIGURES {json.dumps(figures)}")
    assert prober.frames_sent >= 3000


@pytest.mark.long
def test_random_frames_long(stack: Stack, replicas: list[str], room: str) -> None:
    started = time.monotonic()
    prober = fuzz(stack, room, LONG)
    asyncio.run(still_chats(stack.ws_url, replicas, f"{room}-{secrets.token_hex(2)}"))
    figures = {
        "test": "fuzz_long",
        "frames": prober.frames_sent,
        "clean_closes": len(prober.closes),
        "seconds": round(time.monotonic() - started, 1),
    }
    print(f"\nFIGURES {json.dumps(figures)}")
    assert prober.frames_sent >= 30000
