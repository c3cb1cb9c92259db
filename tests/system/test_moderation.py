"""Moderation (issue 16) on the real stack, through nginx, with the moderator and the people moderated on different
replicas: a moderator deletes anyone's message, mutes a name in a room, bans a name from a room or from the whole
chat, and sets slow mode; each holds on the other replica at once (the rules are in Redis, checked where messages
are stored, and the notice reaches every replica), survives a replica's restart, and is in the audit log. Whoever
is not a moderator gets `not_moderator`. On the single Redis and on the Redis Cluster."""

from __future__ import annotations

import asyncio
import secrets
import time

import httpx

from support.chat import ChatClient, Obj, client_on
from support.names import token_for, unique
from support.stack import Stack
from support.stacks import either_stack, room_on_a_primary  # noqa: F401 (fixtures: each test on both layouts)

# A moderator's rule reaches the other replica within this (a chat-wide ban: its replicas look twice a second).
WITHIN = 1.0


def ref() -> str:
    return f"m{secrets.token_hex(6)}"


async def moderator_on(stack: Stack, replica: str, room: str) -> ChatClient:
    mod = await client_on(stack.ws_url, replica, name=unique("mod"), room=room, moderator=stack.moderator_token)
    assert mod.welcome is not None
    assert mod.welcome["moderator"] is True
    return mod


async def answer(client: ChatClient, frame: Obj) -> Obj:
    """Sends a frame with a ref of its own and returns what answers it (an error, or the message or change)."""
    mark = ref()
    start = len(client.objects)
    await client.send({**frame, "ref": mark})
    return await client.wait_for(lambda o: o.get("ref") == mark, start=start)


async def act(mod: ChatClient, frame: Obj, *, heard_by: ChatClient | None = None) -> Obj:
    """A moderator's action; returns the `moderation` notice the moderator's room got (as `heard_by` saw it, within
    WITHIN of the moment it was sent)."""
    listener = heard_by or mod
    start = len(listener.objects)
    sent = time.monotonic()
    await mod.send(frame)
    notice = await listener.wait_for(
        lambda o: o["type"] in ("moderation", "error") and o.get("action", frame["type"]).startswith(frame["type"]),
        start=start,
    )
    assert notice["type"] == "moderation", notice
    assert time.monotonic() - sent < WITHIN, f"the notice took {time.monotonic() - sent:.2f} s"
    return notice


def audit(stack: Stack, token: str | None, **params: str) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return stack.get("/api/moderation/log", headers=headers, params=params)


async def test_a_moderator_deletes_anyones_message_and_everyone_sees_it_was_a_moderator(
    stack: Stack, replicas: list[str], room: str
) -> None:
    mod = await moderator_on(stack, replicas[0], room)
    ann = await client_on(stack.ws_url, replicas[1], name=unique("ann"), room=room)
    bob = await client_on(stack.ws_url, replicas[0], name=unique("bob"), room=room)
    spam = await ann.say_and_wait("buy cheap watches", ref())
    refused = await answer(bob, {"type": "delete", "id": spam["id"]})
    assert refused["code"] == "not_yours"

    deleted = await answer(mod, {"type": "delete", "id": spam["id"], "reason": "spam"})
    assert (deleted["type"], deleted["target"], deleted["moderated"], deleted["reason"]) == (
        "delete",
        spam["id"],
        True,
        "spam",
    )
    seen = await ann.wait_for(lambda o: o["type"] == "delete" and o["target"] == spam["id"])
    assert seen["moderated"] is True
    late = await client_on(stack.ws_url, None, name=unique("late"), room=room)
    assert late.welcome is not None
    [tombstone] = [m for m in late.welcome["history"] if m["id"] == spam["id"]]
    assert tombstone["moderated"] is True
    assert "text" not in tombstone

    log = audit(stack, stack.moderator_token).json()["entries"]
    entry = next(e for e in log if e.get("message") == spam["id"])
    assert (entry["action"], entry["by"], entry["room"], entry["reason"]) == (
        "delete",
        mod.welcome["name"],
        room,
        "spam",
    )
    for client in (mod, ann, bob, late):
        await client.close()


async def test_a_mute_holds_on_the_other_replica_at_once_and_can_be_lifted(
    stack: Stack, replicas: list[str], room: str
) -> None:
    mod = await moderator_on(stack, replicas[0], room)
    ann = await client_on(stack.ws_url, replicas[1], name=unique("ann"), room=room)
    said = await ann.say_and_wait("before", ref())
    name = ann.welcome["name"] if ann.welcome else ""

    notice = await act(mod, {"type": "mute", "name": name, "seconds": 60, "reason": "cool off"}, heard_by=ann)
    assert (notice["action"], notice["name"], notice["seconds"], notice["by"]) == (
        "mute",
        name,
        60,
        mod.welcome["name"],
    )
    refused = await answer(ann, {"type": "say", "text": "still here"})
    assert refused["code"] == "muted"
    assert 0 < refused["retry_after_ms"] <= 60_000
    assert (await answer(ann, {"type": "react", "id": said["id"], "emoji": "👍"}))["code"] == "muted"
    # Muted, not gone: she still reads the room, may delete her own messages, and a moderator is never muted.
    assert (await answer(ann, {"type": "delete", "id": said["id"]}))["type"] == "delete"
    assert (await answer(mod, {"type": "say", "text": "noted"}))["type"] == "message"
    # A rejoin knows it.
    again = await client_on(stack.ws_url, replicas[0], name=name, room=room)
    assert again.welcome is not None
    assert again.welcome["muted_until"] == notice["until"]

    await act(mod, {"type": "mute", "name": name, "seconds": 0}, heard_by=ann)
    assert (await answer(ann, {"type": "say", "text": "thanks"}))["type"] == "message"
    for client in (mod, ann, again):
        await client.close()


async def test_a_room_ban_closes_the_names_sockets_and_refuses_its_joins_there(
    stack: Stack, replicas: list[str], room: str
) -> None:
    mod = await moderator_on(stack, replicas[0], room)
    name = unique("troll")
    tabs = [await client_on(stack.ws_url, replica, name=name, room=room) for replica in replicas]
    watcher = await client_on(stack.ws_url, replicas[1], name=unique("watcher"), room=room)

    notice = await act(
        mod, {"type": "ban", "name": name.upper(), "seconds": 600, "reason": "trolling"}, heard_by=watcher
    )
    assert (notice["action"], notice["seconds"]) == ("ban", 600)
    for tab in tabs:
        assert await tab.wait_closed(timeout=WITHIN) == 4003
        assert tab.ws.close_reason == "banned by a moderator"
        assert any(o["type"] == "moderation" and o["action"] == "ban" for o in tab.objects)  # told why first
    refused = await ChatClient.open(stack.ws_url)
    start = len(refused.objects)
    # The troll itself, with its name's token (without, it is someone else: name_taken comes first).
    await refused.send({"type": "join", "name": name, "room": room, "token": token_for(name)})
    error = await refused.wait_for(lambda o: o["type"] == "error", start=start)
    assert error["code"] == "banned"
    assert 0 < error["retry_after_ms"] <= 600_000
    # Another room is open to the name.
    elsewhere = await client_on(stack.ws_url, None, name=name, room=f"{room}-2")
    await act(mod, {"type": "ban", "name": name, "seconds": 0}, heard_by=watcher)
    back = await client_on(stack.ws_url, None, name=name, room=room)
    for client in (mod, watcher, refused, elsewhere, back):
        await client.close()


async def test_a_chat_ban_closes_the_name_everywhere_and_rules_survive_a_replica_restart(
    stack: Stack, replicas: list[str], room: str
) -> None:
    mod = await moderator_on(stack, replicas[0], room)
    name = unique("spammer")
    muted = unique("muted")
    # The name in two other rooms, on both replicas: the moderator is in neither.
    far = [await client_on(stack.ws_url, replica, name=name, room=f"{room}-{n}") for n, replica in enumerate(replicas)]
    quiet = await client_on(stack.ws_url, replicas[1], name=muted, room=room)
    await act(mod, {"type": "mute", "name": muted, "seconds": 600}, heard_by=quiet)

    sent = time.monotonic()
    notice = await act(mod, {"type": "ban", "name": name, "scope": "chat", "seconds": None, "reason": "bot"})
    assert (notice["action"], notice["seconds"], notice["until"]) == ("ban_chat", None, None)
    for client in far:
        assert await client.wait_closed(timeout=WITHIN) == 4003
    assert time.monotonic() - sent < 2 * WITHIN

    # Every rule is in Redis: a restarted replica enforces them as the other does.
    restarted = stack.container_of(replicas[1])
    await asyncio.to_thread(stack.docker, "restart", restarted)
    await asyncio.to_thread(stack.wait_healthy)
    for _ in range(2):  # nginx sends each new socket to the replica with the fewest: both, in turn
        client = await ChatClient.open(stack.ws_url)
        start = len(client.objects)
        await client.send({"type": "join", "name": name, "room": f"{room}-x", "token": token_for(name)})
        error = await client.wait_for(lambda o: o["type"] == "error", start=start)
        assert error["code"] == "banned"
        assert error.get("retry_after_ms") is None  # for good
        await client.close()
    back = await client_on(stack.ws_url, replicas[1], name=muted, room=room)
    assert (await answer(back, {"type": "say", "text": "am I?"}))["code"] == "muted"

    await act(mod, {"type": "ban", "name": name, "scope": "chat", "seconds": 0})
    allowed = await client_on(stack.ws_url, None, name=name, room=room)
    for client in (mod, quiet, back, allowed):
        await client.close()


async def test_slow_mode_lets_each_person_send_one_message_per_interval(
    stack: Stack, replicas: list[str], room: str
) -> None:
    mod = await moderator_on(stack, replicas[0], room)
    ann = await client_on(stack.ws_url, replicas[1], name=unique("ann"), room=room)
    bob = await client_on(stack.ws_url, replicas[0], name=unique("bob"), room=room)
    notice = await act(mod, {"type": "slow", "seconds": 30, "reason": "busy"}, heard_by=ann)
    assert (notice["action"], notice["seconds"]) == ("slow", 30)
    assert (await answer(ann, {"type": "say", "text": "one"}))["type"] == "message"
    second = await answer(ann, {"type": "say", "text": "two"})
    assert second["code"] == "slow_mode"
    assert 0 < second["retry_after_ms"] <= 30_000
    assert (await answer(bob, {"type": "say", "text": "mine"}))["type"] == "message"  # per person
    assert (await answer(mod, {"type": "say", "text": "a"}))["type"] == "message"
    assert (await answer(mod, {"type": "say", "text": "b"}))["type"] == "message"  # moderators are not held
    late = await client_on(stack.ws_url, None, name=unique("late"), room=room)
    assert late.welcome is not None
    assert late.welcome["slow_seconds"] == 30
    await act(mod, {"type": "slow", "seconds": 0}, heard_by=ann)
    assert (await answer(ann, {"type": "say", "text": "three"}))["type"] == "message"
    for client in (mod, ann, bob, late):
        await client.close()


async def test_only_moderators_moderate_and_read_the_audit_log(stack: Stack, replicas: list[str], room: str) -> None:
    bob = await client_on(stack.ws_url, replicas[1], name=unique("bob"), room=room)
    victim = unique("victim")
    for frame in (
        {"type": "mute", "name": victim, "seconds": 60},
        {"type": "ban", "name": victim, "seconds": None},
        {"type": "slow", "seconds": 5},
    ):
        assert (await answer(bob, frame))["code"] == "not_moderator"
    impostor = await ChatClient.open(stack.ws_url)
    start = len(impostor.objects)
    await impostor.send({"type": "join", "name": unique("impostor"), "room": room, "moderator": "not-a-token"})
    assert (await impostor.wait_for(lambda o: o["type"] == "error", start=start))["code"] == "invalid_token"

    mod = await moderator_on(stack, replicas[0], room)
    await act(mod, {"type": "mute", "name": victim, "seconds": 120, "reason": "the audit test"})
    for token in (None, "not-a-token"):
        refused = audit(stack, token)
        assert (refused.status_code, refused.json()["error"]) == (401, "unauthorized")
    page = audit(stack, stack.moderator_token)
    assert page.status_code == 200
    newest = page.json()["entries"][0]
    assert {key: newest[key] for key in ("action", "by", "room", "name", "seconds", "reason")} == {
        "action": "mute",
        "by": mod.welcome["name"] if mod.welcome else "",
        "room": room,
        "name": victim,
        "seconds": 120,
        "reason": "the audit test",
    }
    assert newest["at"].endswith("Z")
    older = audit(stack, stack.moderator_token, before=newest["id"], limit="1")
    assert all(entry["id"] != newest["id"] for entry in older.json()["entries"])
    for client in (bob, impostor, mod):
        await client.close()


async def test_a_name_holds_only_so_many_sockets_in_a_room_unless_its_moderators_allow_more(
    stack: Stack, replicas: list[str], room: str
) -> None:
    name = unique("tabs")
    tabs = [await client_on(stack.ws_url, replicas[n % 2], name=name, room=room) for n in range(8)]  # NAME_SOCKETS
    one_more = await ChatClient.open(stack.ws_url)
    start = len(one_more.objects)
    await one_more.send({"type": "join", "name": name, "room": room, "token": token_for(name)})
    assert (await one_more.wait_for(lambda o: o["type"] == "error", start=start))["code"] == "too_many_sockets"
    elsewhere = await client_on(stack.ws_url, None, name=name, room=f"{room}-2")  # per room

    mod = await moderator_on(stack, replicas[0], room)
    notice = await act(mod, {"type": "limits", "sockets": 10, "reason": "a classroom"})
    assert (notice["action"], notice["sockets"]) == ("limits", 10)
    tabs.append(await client_on(stack.ws_url, None, name=name, room=room))
    for client in (*tabs, one_more, elsewhere, mod):
        await client.close()


async def test_a_name_may_create_only_so_many_rooms_an_hour(stack: Stack) -> None:
    name = unique("founder")
    prefix = f"t-{secrets.token_hex(4)}"
    answers = []
    for n in range(11):  # NAME_ROOMS_PER_HOUR is 10; each from an address of its own, so only the name counts
        client = await client_on(stack.ws_url, None, name=name, room=f"{prefix}-{n}")
        answers.append(await answer(client, {"type": "say", "text": "first!"}))
        await client.close()
    assert [a["type"] for a in answers[:10]] == ["message"] * 10
    assert answers[10]["code"] == "too_many_rooms"
    assert answers[10]["retry_after_ms"] > 0
