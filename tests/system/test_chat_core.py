"""Chat core (issue 3) on the real stack, only through nginx: every error code, bad input, exactly-once delivery in one
order across both replicas, history from Redis across restarts, resuming with `since`, presence (also when a replica
dies), isolated rooms, and the history API. Every test runs twice: on the single Redis and on the Redis Cluster (the
`cluster` profile), where the tests' rooms are spread over the three primaries."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest

from support.chat import ChatClient, Obj, client_on, eventually, still_chats
from support.names import unique
from support.stack import Stack, room_on, room_slot

HISTORY_SIZE = 25
# The rooms handed out on each stack (key: whether it is the cluster), for the check that they covered every shard.
HANDED_OUT: dict[bool, list[str]] = {}


@pytest.fixture(scope="session", params=["standalone", "cluster"])
def stack(request: pytest.FixtureRequest) -> Stack:
    """The session's stack on the single Redis (conftest's `stack`), or on the Redis Cluster (`cluster_stack`)."""
    started: Stack = request.getfixturevalue("stack" if request.param == "standalone" else "cluster_stack")
    return started


@pytest.fixture
def room(stack: Stack) -> str:
    """A room of the test's own; on the cluster, on each primary in turn, so that these tests cover every shard."""
    handed_out = HANDED_OUT.setdefault(stack.cluster, [])
    primaries = stack.primaries()
    handed_out.append(room_on(primaries[len(handed_out) % len(primaries)]))
    return handed_out[-1]


# A message of protocol v1 as the server sends it: the keys every one has (ref only when the sender gave one).
MESSAGE_KEYS = {"type", "id", "ts", "room", "name", "text"}


async def say_accepted(client: ChatClient, text: str, ref: str) -> Obj:
    """Says something until the server accepts it: a rate_limited answer says how long to wait before the retry."""
    while True:
        reply = await client.say_and_wait(text, ref, timeout=20)
        if reply["type"] == "message":
            return reply
        assert reply["code"] == "rate_limited", reply
        await asyncio.sleep(reply["retry_after_ms"] / 1000)


async def say_many(client: ChatClient, count: int, prefix: str) -> list[Obj]:
    return [await say_accepted(client, f"{prefix} {n}", f"{prefix}-{n}") for n in range(count)]


async def fill(stack: Stack, replicas: list[str], room: str, count: int) -> list[Obj]:
    """`count` messages said in `room` by one client on each replica at once; returns them in log order."""
    senders = [
        await client_on(stack.ws_url, replica, name=f"filler-{n}", room=room) for n, replica in enumerate(replicas)
    ]
    share = -(-count // len(senders))
    await asyncio.gather(*(say_many(s, share, f"fill-{n}") for n, s in enumerate(senders)))
    for sender in senders:
        await sender.close()
    messages = api(stack, room, limit=min(count, 100))["messages"]
    assert len(messages) == min(count, 100)
    return list(messages)


def api(stack: Stack, room: str, **params: Any) -> dict[str, Any]:
    response = stack.get(f"/api/rooms/{room}/messages", params=params)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    body: dict[str, Any] = response.json()
    return body


def ids(messages: list[Obj]) -> list[str]:
    return [str(message["id"]) for message in messages]


def order_key(message_id: str) -> tuple[int, int]:
    millis, _, sequence = message_id.partition("-")
    return int(millis), int(sequence)


async def expect_error(client: ChatClient, frame: Obj | str | bytes, code: str) -> Obj:
    start = len(client.objects)
    await client.send_raw(frame if isinstance(frame, str | bytes) else json.dumps(frame))
    reply = await client.wait_for(lambda o: o["type"] in ("error", "welcome", "message"), start=start)
    assert reply["type"] == "error", f"{frame!r}: {reply}"
    assert reply["code"] == code, f"{frame!r}: {reply}"
    assert isinstance(reply["detail"], str)
    assert reply["detail"]
    return reply


# Errors and bad input


async def test_each_kind_of_bad_frame_gets_its_error_through_nginx_and_the_connection_stays_usable(
    stack: Stack, replicas: list[str], room: str
) -> None:
    """The errors of the protocol's rules; the limits (lengths, the rate) are in test_hostile.py."""
    client = await ChatClient.open(stack.ws_url)
    await expect_error(client, "{not json", "bad_json")
    await expect_error(client, {"type": "shout", "ref": "u-1"}, "unknown_type")
    error = await expect_error(client, {"type": "say", "text": "too early", "ref": "early-1"}, "not_joined")
    assert error["ref"] == "early-1"
    await expect_error(client, {"type": "join", "name": "   "}, "invalid_name")
    await expect_error(client, {"type": "join", "name": "alice", "room": "No Spaces"}, "invalid_room")
    await expect_error(client, {"type": "join", "name": "alice", "room": room, "since": 17}, "invalid_since")
    await client.join("alice", room)
    await expect_error(client, {"type": "join", "name": "alice", "room": room}, "already_joined")
    refusals: list[tuple[Obj, str]] = [
        ({"type": "say", "text": "  \n ", "ref": "e-1"}, "invalid_text"),
        ({"type": "say", "text": "a\x00b", "ref": "e-2"}, "invalid_text"),
    ]
    for n, (frame, code) in enumerate(refusals):
        error = await expect_error(client, frame, code)
        assert error["ref"] == frame["ref"]
        # Usable after each: the next message is accepted.
        assert (await client.say_and_wait(f"after {code}", f"ok-{n}"))["type"] == "message"
    assert {m["text"] for m in api(stack, room)["messages"]} == {"after invalid_text"}
    await client.close()
    await still_chats(stack.ws_url, replicas, room)


WRONG_BEFORE_JOIN: list[tuple[str | bytes, str]] = [
    ('{"type": "join", "name": 5}', "invalid_name"),
    ('{"type": "join", "name": null}', "invalid_name"),
    ('{"type": "join", "name": ["alice"]}', "invalid_name"),
    ('{"type": "join", "name": {"first": "alice"}}', "invalid_name"),
    ('{"type": "join", "name": "alice", "room": ["lobby"]}', "invalid_room"),
    ('{"type": "join", "name": "alice", "room": 7}', "invalid_room"),
    ('{"type": "join", "name": "alice", "since": {"id": "1-0"}}', "invalid_since"),
    ("[]", "bad_json"),
    ('[{"type": "join", "name": "alice"}]', "bad_json"),
    ("null", "bad_json"),
    ('"join"', "bad_json"),
    ("", "bad_json"),
    ("[" * 3000 + "]" * 3000, "bad_json"),
    ('{"type": "say", "text": 1e999}', "bad_json"),
    (b'{"type": "join", "name": "alice"}', "bad_json"),
    (b"", "bad_json"),
    (b"\xff\xfe\x00", "bad_json"),
    ('{"type": {"nested": "join"}}', "unknown_type"),
    ('{"type": ["say"]}', "unknown_type"),
    ('{"type": null}', "unknown_type"),
    ('{"name": "alice"}', "unknown_type"),
    ('{"type": "say", "text": "hi"}', "not_joined"),
    ('{"type": "say", "text": null}', "invalid_text"),  # checked before whether the client has joined
]

WRONG_AFTER_JOIN: list[tuple[str | bytes, str]] = [
    ('{"type": "say", "text": null}', "invalid_text"),
    ('{"type": "say", "text": 5}', "invalid_text"),
    ('{"type": "say", "text": ["hello"]}', "invalid_text"),
    ('{"type": "say", "text": {"body": "hello"}}', "invalid_text"),
    ('{"type": "say"}', "invalid_text"),
    ('{"type": "say", "text": "hi", "ref": 5}', "invalid_ref"),
    ('{"type": "say", "text": "hi", "ref": {"id": 1}}', "invalid_ref"),
    ('{"type": "say", "text": "hi", "ref": ["r"]}', "invalid_ref"),
    (b'{"type": "say", "text": "binary"}', "bad_json"),
    (b"", "bad_json"),
    ("", "bad_json"),
    ('{"type": "join", "name": 5}', "invalid_name"),
    ('{"type": "join", "name": "alice"}', "already_joined"),
    ("[[[[]]]]", "bad_json"),
]


async def test_wrong_types_binary_and_empty_frames_each_get_their_error(
    stack: Stack, replicas: list[str], room: str
) -> None:
    # Sockets until each replica has handled every kind of bad frame (a socket's replica is known once it joins).
    covered: set[str] = set()
    for attempt in range(10):
        client = await ChatClient.open(stack.ws_url)
        for frame, code in WRONG_BEFORE_JOIN:
            await expect_error(client, frame, code)
        await client.join(f"wrong-{attempt}", room)
        for frame, code in WRONG_AFTER_JOIN:
            await expect_error(client, frame, code)
        assert (await client.say_and_wait("all good", f"good-{attempt}"))["type"] == "message"
        covered.add(client.replica)
        await client.close()
        if covered == set(replicas):
            break
    assert covered == set(replicas)
    assert {m["text"] for m in api(stack, room)["messages"]} == {"all good"}
    await still_chats(stack.ws_url, replicas, room)


# Delivery


async def test_every_client_on_either_replica_gets_every_message_once_in_the_same_order(
    stack: Stack, replicas: list[str], room: str
) -> None:
    clients = [
        await client_on(stack.ws_url, replicas[n % len(replicas)], name=f"user-{n}", room=room) for n in range(10)
    ]
    assert {client.replica for client in clients} == set(replicas)
    senders = clients[:6]  # three on each replica
    sent = await asyncio.gather(*(say_many(sender, 50, f"s{n}") for n, sender in enumerate(senders)))
    expected = {message["id"] for batch in sent for message in batch}
    assert len(expected) == 300

    await eventually(
        lambda: all(len(client.of_type("message")) >= len(expected) for client in clients),
        timeout=60,
        what="every client holding all 300 messages",
    )
    reference = ids(clients[0].of_type("message"))
    assert sorted(reference, key=order_key) == reference  # the log's order
    for client in clients:
        received = client.of_type("message")
        assert len(received) == len(expected), f"{client.replica}: duplicates"
        assert ids(received) == reference, f"a client on {client.replica} saw another order"
        assert set(ids(received)) == expected
        assert not client.of_type("error") or all(e["code"] == "rate_limited" for e in client.of_type("error"))
    # Each sender's messages arrive in the order it said them, and unchanged.
    for n, batch in enumerate(sent):
        mine = [m for m in clients[-1].of_type("message") if m["name"] == f"user-{n}"]
        assert mine == batch
        assert [m["text"] for m in mine] == [f"s{n} {k}" for k in range(50)]
        assert all(set(m) == MESSAGE_KEYS | {"ref"} for m in mine)
    for client in clients:
        await client.close()


async def test_rooms_are_isolated(stack: Stack, replicas: list[str], room: str) -> None:
    other = f"{room}-b"
    in_a = [await client_on(stack.ws_url, r, name=f"a-{n}", room=room) for n, r in enumerate(replicas)]
    in_b = [await client_on(stack.ws_url, r, name=f"b-{n}", room=other) for n, r in enumerate(replicas)]
    said_a = await in_a[0].say_and_wait("for room a only", "only-a")
    await in_a[1].wait_for(lambda o: o.get("ref") == "only-a")
    # Published after room a's message on the one channel every replica hears in order: once it is in, room a's
    # message would have been delivered before it.
    said_b = await in_b[1].say_and_wait("for room b only", "only-b")
    await in_b[0].wait_for(lambda o: o.get("ref") == "only-b")
    for client in in_b:
        assert client.messages() == [said_b]
        assert all(o.get("name", "").startswith("b-") for o in client.objects if o["type"] != "welcome")
    for client in in_a:
        assert client.messages() == [said_a]
    assert api(stack, room)["messages"] == [said_a]
    assert api(stack, other)["messages"] == [said_b]
    for client in in_a + in_b:
        await client.close()


# History and resuming


async def test_a_late_joiner_on_either_replica_gets_the_last_25_from_redis(
    stack: Stack, replicas: list[str], room: str
) -> None:
    said = await fill(stack, replicas, room, 30)
    for replica in replicas:
        late = await client_on(stack.ws_url, replica, name="late", room=room)
        welcome = late.welcome
        assert welcome is not None
        assert welcome["resumed"] is False
        assert welcome["history"] == said[-HISTORY_SIZE:]
        assert all(set(m) >= MESSAGE_KEYS for m in welcome["history"])
        await late.close()
    assert api(stack, room)["messages"] == said[-HISTORY_SIZE:]


async def test_an_unknown_since_gets_the_last_25_and_resumed_false(
    stack: Stack, replicas: list[str], room: str
) -> None:
    said = await fill(stack, replicas, room, 30)
    elsewhere = await client_on(stack.ws_url, None, name="elsewhere", room=f"{room}-x")
    foreign = await elsewhere.say_and_wait("an id of another room", "foreign")
    await elsewhere.close()
    unknown = [
        said[0]["id"].split("-")[0] + "-999999",  # looks like an id of this room's time, but is none
        "1-0",  # older than anything retained: as if trimmed
        foreign["id"],  # in the retained log of another room only
        "not-an-id",
        "99999999999999999999-0",  # more than Redis takes
    ]
    for since in unknown:
        client = await ChatClient.open(stack.ws_url)
        welcome = await client.join("back", room, since=since)
        assert welcome["resumed"] is False, since
        assert welcome["history"] == said[-HISTORY_SIZE:], since
        await client.close()


async def test_reconnecting_with_since_gets_exactly_what_was_missed(
    stack: Stack, replicas: list[str], room: str
) -> None:
    alice = await client_on(stack.ws_url, replicas[0], name="alice", room=room)
    bob = await client_on(stack.ws_url, replicas[1], name="bob", room=room)
    before = await say_many(alice, 3, "before")
    await bob.wait_for(lambda o: o.get("ref") == "before-2")
    seen_by_bob = bob.messages()
    assert seen_by_bob == before
    await bob.close()

    missed = await say_many(alice, 5, "missed")
    # Back on the other replica, while alice goes on talking: the join must neither skip nor repeat what is said
    # during it.
    talking = asyncio.create_task(say_many(alice, 12, "during"))
    back = await client_on(stack.ws_url, replicas[0], name="bob", room=room, since=seen_by_bob[-1]["id"])
    during = await talking
    after = await say_accepted(alice, "after", "after-0")
    await back.wait_for(lambda o: o.get("ref") == "after-0")

    welcome = back.welcome
    assert welcome is not None
    assert welcome["resumed"] is True
    assert welcome["history"][: len(missed)] == missed
    everything = seen_by_bob + back.messages()
    assert ids(everything) == ids(before + missed + during + [after]), "a gap or a repeat"


async def test_history_survives_restarting_both_web_replicas_and_redis(
    stack: Stack, replicas: list[str], room: str
) -> None:
    said = await fill(stack, replicas, room, 30)

    await asyncio.to_thread(stack.docker, "restart", *stack.web_containers())
    await asyncio.to_thread(stack.wait_healthy)
    await both_replicas_answer(stack, replicas)
    for replica in replicas:
        late = await client_on(stack.ws_url, replica, name="after-web-restart", room=room)
        assert late.welcome is not None
        assert late.welcome["history"] == said[-HISTORY_SIZE:]
        await late.close()

    # The single Redis, or every node of the cluster (and the cluster whole again).
    await asyncio.to_thread(stack.restart_redis)
    await both_replicas_answer(stack, replicas)
    # Every request is served once Redis is back, also on connections that each replica held from before: several
    # at once, so that each replica's pool hands out more than its newest connection.
    for _ in range(3):
        pages = await asyncio.gather(*(asyncio.to_thread(stack.get, f"/api/rooms/{room}/messages") for _ in range(8)))
        assert [page.status_code for page in pages] == [200] * 8, {page.text for page in pages if page.is_error}
    joined = await asyncio.gather(*(ChatClient.open(stack.ws_url) for _ in range(8)))
    welcomes = await asyncio.gather(*(client.join(f"back-{n}", room) for n, client in enumerate(joined)))
    assert {welcome["replica"] for welcome in welcomes} == set(replicas)
    assert all(welcome["history"] == said[-HISTORY_SIZE:] for welcome in welcomes)
    for client in joined:
        await client.close()
    late = await client_on(stack.ws_url, replicas[0], name="after-redis-restart", room=room)
    assert late.welcome is not None
    assert late.welcome["history"] == said[-HISTORY_SIZE:]
    assert api(stack, room, limit=100)["messages"] == said
    # And the log goes on after it: new ids come after the stored ones.
    newest = await say_accepted(late, "after the restarts", "after-restarts")
    assert order_key(newest["id"]) > order_key(said[-1]["id"])
    await late.close()


async def both_replicas_answer(stack: Stack, replicas: list[str]) -> None:
    seen: set[str] = set()

    def both_seen() -> bool:
        response = stack.get("/health")
        if response.status_code == 200:
            seen.add(response.json()["replica"])
        return seen == set(replicas)

    await eventually(both_seen, timeout=60, what="both replicas answering through nginx", interval=0.2)


async def test_when_redis_is_down_the_sender_gets_unavailable_and_nobody_the_message(
    stack: Stack, replicas: list[str], room: str
) -> None:
    alice = await client_on(stack.ws_url, replicas[0], name="alice", room=room)
    bob = await client_on(stack.ws_url, replicas[1], name="bob", room=room)
    kept = await alice.say_and_wait("before the outage", "kept")
    await bob.wait_for(lambda o: o.get("ref") == "kept")

    await asyncio.to_thread(stack.stop_redis)  # the single Redis, or every node of the cluster
    try:
        refused = await bob.say_and_wait("during the outage", "lost", timeout=20)
        assert (refused["type"], refused["code"]) == ("error", "unavailable"), refused
        assert "retry_after_ms" not in refused
        ready = stack.get("/ready")
        assert ready.status_code == 503
        assert ready.json()["status"] == "unavailable"
        assert stack.get("/health").status_code == 200  # alive, and will reconnect by itself
        online = stack.get(f"/api/rooms/{room}/online")
        assert (online.status_code, online.json()["error"]) == (503, "unavailable")
        # Joining needs Redis too: an error the client can read, then close 1013 (try again later).
        newcomer = await ChatClient.open(stack.ws_url)
        await newcomer.send({"type": "join", "name": unique("newcomer"), "room": room})
        error = await newcomer.wait_for(lambda o: o["type"] in ("welcome", "error"), timeout=20)
        assert error["code"] == "unavailable"
        assert await newcomer.wait_closed(timeout=15) == 1013
    finally:
        await asyncio.to_thread(stack.start_redis)

    retried = await say_accepted(bob, "during the outage", "retried")
    await alice.wait_for(lambda o: o.get("ref") == "retried", timeout=30)
    for client in (alice, bob):
        assert [m["ref"] for m in client.messages()] == ["kept", "retried"]
        assert not client.closed
    assert [m["id"] for m in api(stack, room)["messages"]] == [kept["id"], retried["id"]]
    await alice.close()
    await bob.close()


# Presence


async def test_presence_is_right_across_replicas(stack: Stack, replicas: list[str], room: str) -> None:
    alice = await client_on(stack.ws_url, replicas[0], name="alice", room=room)
    assert alice.welcome is not None
    assert (alice.welcome["online"], alice.welcome["online_count"]) == (["alice"], 1)
    bob = await client_on(stack.ws_url, replicas[1], name="bob", room=room)
    assert bob.welcome is not None
    assert (bob.welcome["online"], bob.welcome["online_count"]) == (["alice", "bob"], 2)
    joined = await alice.wait_for(lambda o: o["type"] == "presence" and o["name"] == "bob")
    assert joined == {
        "type": "presence",
        "event": "join",
        "name": "bob",
        "joined": ["bob"],
        "left": [],
        "online_count": 2,
    }

    # A second tab of bob's, on the other replica: bob is online already, so nobody hears of it.
    bob_tab = await client_on(stack.ws_url, replicas[0], name="bob", room=room)
    await bob_tab.close()
    carol = await client_on(stack.ws_url, replicas[0], name="carol", room=room)
    await alice.wait_for(lambda o: o["type"] == "presence" and o["name"] == "carol")
    about_bob = [o for o in alice.of_type("presence") if "bob" in o["joined"] + o["left"]]
    assert [o["joined"] for o in about_bob] == [["bob"]]
    # The list, page by page through nginx (either replica answers), the same as presence says.
    first = stack.get(f"/api/rooms/{room}/online", params={"limit": "2"})
    assert first.status_code == 200, first.text
    assert first.json() == {"room": room, "online": ["alice", "bob"], "online_count": 3, "next": "bob"}
    rest = stack.get(f"/api/rooms/{room}/online", params={"limit": "2", "after": "bob"}).json()
    assert rest == {"room": room, "online": ["carol"], "online_count": 3, "next": None}

    await bob.close()
    left = await alice.wait_for(lambda o: o["type"] == "presence" and o["event"] == "leave")
    assert left == {
        "type": "presence",
        "event": "leave",
        "name": "bob",
        "joined": [],
        "left": ["bob"],
        "online_count": 2,
    }
    heard_by_carol = await carol.wait_for(lambda o: o["type"] == "presence" and o["event"] == "leave")
    assert heard_by_carol == left
    await alice.close()
    await carol.close()


async def test_users_of_a_replica_that_dies_without_goodbye_leave_within_about_30_seconds(
    stack: Stack, replicas: list[str], room: str
) -> None:
    watcher = await client_on(stack.ws_url, replicas[0], name="watcher", room=room)
    victim = await client_on(stack.ws_url, replicas[1], name="victim", room=room)
    await watcher.wait_for(lambda o: o["type"] == "presence" and o["name"] == "victim")
    doomed = stack.web_containers()[1]
    assert stack.replica_name(doomed) == replicas[1]
    stack.docker("kill", doomed)
    killed_at = time.monotonic()
    try:
        left = await watcher.wait_for(
            lambda o: o["type"] == "presence" and o["event"] == "leave" and o["name"] == "victim", timeout=45
        )
        took = time.monotonic() - killed_at
        assert took < 40, f"the dead replica's user stayed online for {took:.0f} s"
        assert (left["left"], left["online_count"]) == (["victim"], 1)
        assert not watcher.closed
        assert await victim.wait_closed(timeout=30) != 1000
    finally:
        await asyncio.to_thread(stack.docker, "start", doomed)
        await asyncio.to_thread(stack.wait_healthy)
    await both_replicas_answer(stack, replicas)
    await watcher.close()


# The history API


async def test_the_api_pages_back_through_the_history(stack: Stack, replicas: list[str], room: str) -> None:
    said = await fill(stack, replicas, room, 30)
    pages: list[list[Obj]] = []
    more: list[bool] = []
    params: dict[str, Any] = {"limit": 12}
    while True:
        page = api(stack, room, **params)
        assert page["room"] == room
        pages.insert(0, page["messages"])
        more.append(page["more"])
        if not page["more"]:
            break
        params["before"] = page["messages"][0]["id"]
    assert [len(page) for page in pages] == [6, 12, 12]
    assert more == [True, True, False]
    assert [m for page in pages for m in page] == said
    assert api(stack, room, limit=100) == {"room": room, "messages": said, "more": False}
    assert api(stack, room, limit=1, before=said[0]["id"]) == {"room": room, "messages": [], "more": False}
    assert api(stack, room, before="0-0")["messages"] == []
    assert api(stack, room, before="00000-00", limit=1)["messages"] == []  # leading zeros are still an id
    assert api(stack, f"{room}-empty") == {"room": f"{room}-empty", "messages": [], "more": False}


def test_unknown_api_paths_are_404_with_a_json_error(stack: Stack) -> None:
    """Bad parameters (400) are in test_hostile.py."""
    with stack.http() as http:
        for path in ("/api/rooms/lobby", "/api/rooms/a/b/messages", "/api/nothing"):
            response = http.get(path)
            assert response.status_code == 404, path
            assert response.headers["content-type"] == "application/json"
            assert response.json()["error"] == "not_found"


def test_health_and_ready_through_nginx(stack: Stack, replicas: list[str]) -> None:
    health = stack.get("/health")
    assert health.status_code == 200
    assert health.json() == {"status": "ok", "replica": health.json()["replica"]}
    assert health.json()["replica"] in replicas
    ready = stack.get("/ready")
    assert ready.status_code == 200
    assert ready.json()["status"] == "ready"
    assert ready.json()["replica"] in replicas


def test_the_rooms_of_these_tests_covered_every_primary_of_the_cluster(cluster_stack: Stack) -> None:
    """The `room` fixture's rooms, as the cluster itself places them: each room's slot as CLUSTER KEYSLOT says (the
    same as the tests compute), and among their owners, as CLUSTER NODES says, every primary. Runs after the tests
    above, which hand them out."""
    rooms = HANDED_OUT.get(True, [])
    assert len(rooms) >= 3, "run this with the other tests of the module: they hand out the rooms it checks"
    primaries = cluster_stack.primaries()
    assert len(primaries) == 3
    owners = set()
    for room in rooms:
        slot = int(cluster_stack.redis_cli("cluster", "keyslot", f"chat:{{{room}}}:log"))
        assert slot == room_slot(room), room
        [owner] = [node.id for node in primaries if node.serves(slot)]
        owners.add(owner)
    assert owners == {node.id for node in primaries}
