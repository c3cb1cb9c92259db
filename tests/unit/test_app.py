"""The whole replica in one process, without Redis (the in-memory broker), through Quart's test client: the chat
socket, the HTTP API, health and readiness. The same behaviour through nginx and Redis: tests/system."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Any, cast

import pytest
from quart import Quart
from quart.testing import QuartClient

from infinite_chat import Settings, create_app
from support.asgi import AsgiSocket, Refused
from support.chat import ChatClient

Obj = dict[str, Any]
TIMEOUT = 2.0


class Replica:
    """One replica in this process: its HTTP routes through Quart's test client, its chat socket over ASGI."""

    def __init__(self, app: Quart, client: QuartClient, exits: AsyncExitStack) -> None:
        self.app = app
        self.client = client
        self.exits = exits

    async def chat(self, headers: dict[str, str] | None = None) -> ChatClient:
        chat = ChatClient.over(await AsgiSocket.open(self.app, headers=headers))  # type: ignore[arg-type]
        self.exits.push_async_callback(_close, chat)
        return chat


async def _close(chat: ChatClient) -> None:
    if not chat.closed:
        await chat.close()


SETTINGS = Settings(replica_name="unit-a", history_size=5, rate_limit=5.0, rate_burst=10)


@pytest.fixture
async def replica() -> AsyncIterator[Replica]:
    app = create_app(SETTINGS)
    async with app.test_app() as test_app, AsyncExitStack() as exits:
        yield Replica(app, cast(QuartClient, test_app.test_client()), exits)


async def test_join_gets_a_welcome_with_everything_a_client_needs(replica: Replica) -> None:
    alice = await replica.chat()
    welcome = await alice.join("  alice ", "room-1")
    assert isinstance(welcome.pop("token"), str)  # the name is hers now (tests/unit/test_names.py)
    assert welcome == {
        "type": "welcome",
        "replica": "unit-a",
        "room": "room-1",
        "name": "alice",
        "history": [],
        "online": ["alice"],
        "online_count": 1,
        "resumed": False,
    }


async def test_a_message_reaches_everyone_in_the_room_and_is_the_senders_acknowledgement(replica: Replica) -> None:
    alice, bob = await replica.chat(), await replica.chat()
    await alice.join("alice")
    await bob.join("bob")
    echo = await alice.say_and_wait("  hello\nbob  ", "a-1")
    assert echo["type"] == "message"
    assert set(echo) == {"type", "id", "ts", "room", "name", "text", "ref"}
    assert (echo["room"], echo["name"], echo["text"]) == ("lobby", "alice", "hello\nbob")
    assert echo["ts"].endswith("Z")
    assert await bob.wait_for(lambda o: o["type"] == "message") == echo


async def test_every_client_gets_every_message_once_in_the_same_order(replica: Replica) -> None:
    clients = [await replica.chat() for _ in range(3)]
    for n, client in enumerate(clients):
        await client.join(f"user-{n}")
    for round_ in range(3):
        for n, client in enumerate(clients):
            assert (await client.say_and_wait(f"m{round_}-{n}", f"{n}-{round_}"))["type"] == "message"
    for client in clients:
        await client.wait_for(lambda o: o.get("ref") == "2-2", start=0, timeout=TIMEOUT)
    orders = [[m["id"] for m in client.messages()] for client in clients]
    assert len(orders[0]) == 9
    assert len(set(orders[0])) == 9
    assert orders[1] == orders[0]
    assert orders[2] == orders[0]


async def test_a_late_joiner_gets_the_last_history_size_messages_oldest_first(replica: Replica) -> None:
    alice = await replica.chat()
    await alice.join("alice")
    sent = [await alice.say_and_wait(f"m{n}", f"r{n}") for n in range(7)]
    late = await replica.chat()
    welcome = await late.join("late")
    assert welcome["history"] == sent[-5:]  # history_size=5
    assert welcome["resumed"] is False
    assert welcome["online"] == ["alice", "late"]


async def test_a_client_resuming_with_since_gets_exactly_what_it_missed(replica: Replica) -> None:
    alice, bob = await replica.chat(), await replica.chat()
    await alice.join("alice")
    await bob.join("bob")
    first = await alice.say_and_wait("seen by bob", "a-1")
    await bob.wait_for(lambda o: o.get("ref") == "a-1")
    await bob.close()
    missed = [await alice.say_and_wait(f"missed {n}", f"a-m{n}") for n in range(3)]
    back = await replica.chat()
    welcome = await back.join("bob", since=first["id"])
    assert welcome["resumed"] is True
    assert welcome["history"] == missed
    live = await alice.say_and_wait("after the return", "a-2")
    assert await back.wait_for(lambda o: o["type"] == "message") == live


async def test_resuming_from_the_newest_message_gets_an_empty_history(replica: Replica) -> None:
    alice = await replica.chat()
    await alice.join("alice")
    last = await alice.say_and_wait("the newest", "a-1")
    again = await replica.chat()
    welcome = await again.join("alice", since=last["id"])
    assert (welcome["resumed"], welcome["history"]) == (True, [])


@pytest.mark.parametrize("since", ["1-0", "not-an-id", "99999999999999999999-0"])
async def test_an_unknown_since_gets_the_last_messages_and_resumed_false(replica: Replica, since: str) -> None:
    alice = await replica.chat()
    await alice.join("alice")
    sent = [await alice.say_and_wait(f"m{n}", f"r{n}") for n in range(6)]
    again = await replica.chat()
    welcome = await again.join("alice", since=since)
    assert welcome["resumed"] is False
    assert welcome["history"] == sent[-5:]


async def test_presence_join_and_leave_reach_the_room(replica: Replica) -> None:
    alice, bob = await replica.chat(), await replica.chat()
    await alice.join("alice")
    welcome = await bob.join("bob")
    assert welcome["online"] == ["alice", "bob"]
    joined = await alice.wait_for(lambda o: o["type"] == "presence" and o["name"] == "bob")
    assert joined == {
        "type": "presence",
        "event": "join",
        "name": "bob",
        "joined": ["bob"],
        "left": [],
        "online_count": 2,
    }
    await bob.close()
    left = await alice.wait_for(lambda o: o["type"] == "presence" and o["event"] == "leave")
    assert left == {
        "type": "presence",
        "event": "leave",
        "name": "bob",
        "joined": [],
        "left": ["bob"],
        "online_count": 1,
    }


async def test_rooms_are_isolated(replica: Replica) -> None:
    alice, bob = await replica.chat(), await replica.chat()
    await alice.join("alice", "room-a")
    await bob.join("bob", "room-b")
    await alice.say_and_wait("only for room a", "a-1")
    marker = await bob.say_and_wait("only for room b", "b-1")
    assert [m["text"] for m in bob.messages()] == [marker["text"]]
    assert all(obj.get("name") != "alice" for obj in bob.objects)


async def test_every_error_code_keeps_the_connection_usable(replica: Replica) -> None:
    chat = await replica.chat()
    before_join: list[tuple[Obj | str | bytes, str]] = [
        ("{not json", "bad_json"),
        (b"\x00\x01", "bad_json"),
        ("", "bad_json"),
        ("[1, 2]", "bad_json"),
        ({"type": "shout", "ref": "u-1"}, "unknown_type"),
        ({"type": "say", "text": "too early", "ref": "n-1"}, "not_joined"),
        ({"type": "join", "name": 5}, "invalid_name"),
        ({"type": "join", "name": "a" * 33}, "invalid_name"),
        ({"type": "join", "name": "alice", "room": "Not A Room"}, "invalid_room"),
        ({"type": "join", "name": "alice", "since": 12}, "invalid_since"),
    ]
    for frame, code in before_join:
        error = await chat.reply_to(frame)
        assert (error["type"], error["code"]) == ("error", code), frame
        assert error["detail"]
    await chat.join("alice")
    after_join: list[tuple[Obj | str | bytes, str, str | None]] = [
        ({"type": "join", "name": "alice"}, "already_joined", None),
        ({"type": "say", "text": None, "ref": "t-1"}, "invalid_text", "t-1"),
        ({"type": "say", "text": "   ", "ref": "t-2"}, "invalid_text", "t-2"),
        ({"type": "say", "text": "bell\x07", "ref": "t-3"}, "invalid_text", "t-3"),
        ({"type": "say", "text": "x" * 2001, "ref": "t-4"}, "too_long", "t-4"),
        ({"type": "say", "text": "hi", "ref": "r" * 65}, "invalid_ref", None),
        ({"type": "say", "text": ["hi"], "ref": "t-5"}, "invalid_text", "t-5"),
    ]
    for frame, code, ref in after_join:
        error = await chat.reply_to(frame)
        assert (error["type"], error["code"], error["ref"]) == ("error", code, ref), frame
    assert (await chat.say_and_wait("still here", "ok-1"))["type"] == "message"
    assert [m["text"] for m in chat.messages()] == ["still here"]


async def test_past_the_burst_messages_are_rate_limited_and_not_stored(replica: Replica) -> None:
    chat = await replica.chat()
    await chat.join("alice")
    for n in range(12):
        await chat.say(f"m{n}", f"r{n}")
    answers = [await chat.wait_for(lambda o, n=n: o.get("ref") == f"r{n}", start=0, timeout=TIMEOUT) for n in range(12)]  # type: ignore[misc]
    assert [a["type"] for a in answers[:10]] == ["message"] * 10
    refused = [a for a in answers[10:] if a["type"] == "error"]
    assert refused, answers[10:]
    for error in refused:
        assert error["code"] == "rate_limited"
        assert 0 < error["retry_after_ms"] <= 200  # one token at 5 per second
    response = await replica.client.get("/api/rooms/lobby/messages")
    stored = [m["ref"] for m in (await response.get_json())["messages"]]
    assert stored == [a["ref"] for a in answers if a["type"] == "message"][-5:]
    assert not {e["ref"] for e in refused} & set(stored)


async def test_a_foreign_origin_is_refused_and_the_own_origin_let_in(replica: Replica) -> None:
    with pytest.raises(Refused) as caught:
        await replica.chat({"Origin": "http://evil.example", "Host": "localhost"})
    assert caught.value.status == 403
    assert json.loads(caught.value.body)["error"] == "forbidden_origin"
    own = await replica.chat({"Origin": "http://localhost", "Host": "localhost"})
    assert (await own.join("alice"))["type"] == "welcome"


async def test_the_api_pages_back_through_the_history(replica: Replica) -> None:
    chat = await replica.chat()
    await chat.join("alice", "pages")
    sent = [(await chat.say_and_wait(f"m{n}", f"r{n}"))["id"] for n in range(7)]
    response = await replica.client.get("/api/rooms/pages/messages", query_string={"limit": "3"})
    page = await response.get_json()
    assert response.status_code == 200
    assert response.content_type == "application/json"
    assert [m["id"] for m in page["messages"]] == sent[4:]
    assert page["room"] == "pages"
    assert page["more"] is True
    response = await replica.client.get("/api/rooms/pages/messages", query_string={"limit": "3", "before": sent[4]})
    assert [m["id"] for m in (await response.get_json())["messages"]] == sent[1:4]
    response = await replica.client.get("/api/rooms/pages/messages", query_string={"limit": "3", "before": sent[1]})
    last = await response.get_json()
    assert ([m["id"] for m in last["messages"]], last["more"]) == ([sent[0]], False)
    default = await (await replica.client.get("/api/rooms/pages/messages")).get_json()
    assert [m["id"] for m in default["messages"]] == sent[-5:]  # history_size


async def test_an_empty_room_has_no_messages(replica: Replica) -> None:
    response = await replica.client.get("/api/rooms/nobody-here/messages")
    assert await response.get_json() == {"room": "nobody-here", "messages": [], "more": False}


async def test_the_api_pages_through_who_is_online_in_name_order(replica: Replica) -> None:
    names = ["Zoë", "alice", "bob", "carol", "dave"]  # by code point: "Z" before "a"
    for name in reversed(names):
        await (await replica.chat()).join(name, "people")
    await (await replica.chat()).join("bob", "people")  # a second tab: one name
    first = await replica.client.get("/api/rooms/people/online", query_string={"limit": "2"})
    assert (first.status_code, first.content_type) == (200, "application/json")
    assert await first.get_json() == {"room": "people", "online": ["Zoë", "alice"], "online_count": 5, "next": "alice"}
    second = await replica.client.get("/api/rooms/people/online", query_string={"limit": "2", "after": "alice"})
    assert await second.get_json() == {"room": "people", "online": ["bob", "carol"], "online_count": 5, "next": "carol"}
    last = await replica.client.get("/api/rooms/people/online", query_string={"limit": "2", "after": "carol"})
    assert await last.get_json() == {"room": "people", "online": ["dave"], "online_count": 5, "next": None}
    # `after` need not be online: the names after it.
    between = await replica.client.get("/api/rooms/people/online", query_string={"after": "bobby"})
    assert (await between.get_json())["online"] == ["carol", "dave"]
    everyone = await (await replica.client.get("/api/rooms/people/online")).get_json()  # up to 100 by default
    assert (everyone["online"], everyone["next"]) == (names, None)


async def test_an_empty_room_has_nobody_online(replica: Replica) -> None:
    response = await replica.client.get("/api/rooms/nobody-here/online")
    assert await response.get_json() == {"room": "nobody-here", "online": [], "online_count": 0, "next": None}


@pytest.mark.parametrize(
    ("path", "code"),
    [
        ("/api/rooms/Lobby/online", "invalid_room"),
        ("/api/rooms/lobby/online?limit=0", "invalid_limit"),
        ("/api/rooms/lobby/online?limit=101", "invalid_limit"),
        ("/api/rooms/lobby/online?limit=0100", "invalid_limit"),
        ("/api/rooms/lobby/online?limit=%C2%B2", "invalid_limit"),
        ("/api/rooms/lobby/online?after=", "invalid_after"),
        ("/api/rooms/lobby/online?after=%20alice", "invalid_after"),  # names are trimmed: never one
        ("/api/rooms/lobby/online?after=" + "a" * 33, "invalid_after"),
        ("/api/rooms/lobby/online?after=alice%E2%80%8B", "invalid_after"),  # a zero-width space
        ("/api/rooms/Lobby/messages", "invalid_room"),
        ("/api/rooms/" + "a" * 33 + "/messages", "invalid_room"),
        ("/api/rooms/lobby/messages?limit=0", "invalid_limit"),
        ("/api/rooms/lobby/messages?limit=101", "invalid_limit"),
        ("/api/rooms/lobby/messages?limit=-1", "invalid_limit"),
        ("/api/rooms/lobby/messages?limit=abc", "invalid_limit"),
        ("/api/rooms/lobby/messages?limit=", "invalid_limit"),
        ("/api/rooms/lobby/messages?limit=%C2%B2", "invalid_limit"),  # a superscript two is a digit to Python
        ("/api/rooms/lobby/messages?before=yesterday", "invalid_before"),
        ("/api/rooms/lobby/messages?before=", "invalid_before"),
        ("/api/rooms/lobby/messages?before=99999999999999999999-0", "invalid_before"),
    ],
)
async def test_bad_api_parameters_are_400_with_a_json_error(replica: Replica, path: str, code: str) -> None:
    response = await replica.client.get(path)
    assert response.status_code == 400
    body = await response.get_json()
    assert body["error"] == code
    assert body["detail"]


async def test_the_limit_bounds_are_allowed(replica: Replica) -> None:
    for path in ("/api/rooms/lobby/messages", "/api/rooms/lobby/online"):
        for limit in ("1", "100"):
            response = await replica.client.get(path, query_string={"limit": limit})
            assert response.status_code == 200


async def test_health_and_ready_answer_with_the_replica_name(replica: Replica) -> None:
    health = await replica.client.get("/health")
    assert (health.status_code, await health.get_json()) == (200, {"status": "ok", "replica": "unit-a"})
    ready = await replica.client.get("/ready")
    assert (ready.status_code, await ready.get_json()) == (200, {"status": "ready", "replica": "unit-a"})


async def test_unknown_paths_and_plain_http_on_the_socket_path_answer_json(replica: Replica) -> None:
    missing = await replica.client.get("/nothing-here")
    assert missing.status_code == 404
    assert (await missing.get_json())["error"] == "not_found"
    upgrade = await replica.client.get("/ws")
    assert upgrade.status_code == 426
    assert (await upgrade.get_json())["error"] == "upgrade_required"
