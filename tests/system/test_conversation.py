"""Conversation (issue 15) on the real stack, through nginx, with members on both replicas: typing reaches the other
replica and ends (by itself, and at once with a message); edits, deletions and reactions reach everyone in one
order; a client that was away resumes with `since` and ends in the same state; a late joiner's history and the
scroll-back API show each message as it now is; every refusal has its code. On the single Redis and on the Redis
Cluster."""

from __future__ import annotations

import copy
import secrets
from typing import Any

from support.chat import ChatClient, Obj, client_on
from support.stack import Stack
from support.stacks import either_stack, room_on_a_primary  # noqa: F401 (fixtures: each test on both layouts)


def ref() -> str:
    return f"t{secrets.token_hex(6)}"


async def said(client: ChatClient, text: str) -> Obj:
    reply = await client.say_and_wait(text, ref())
    assert reply["type"] == "message", reply
    return reply


async def changed(client: ChatClient, frame: Obj) -> Obj:
    """Sends an edit, delete or react and returns its answer: the change itself, or an error."""
    mark = ref()
    start = len(client.objects)
    await client.send({**frame, "ref": mark})
    return await client.wait_for(lambda o: o.get("ref") == mark, start=start)


async def change_made(client: ChatClient, frame: Obj) -> Obj:
    answer = await changed(client, frame)
    assert answer["type"] == frame["type"].replace("react", "reaction"), answer
    return answer


def state(objects: list[Obj]) -> dict[str, dict[str, Any]]:
    """What a client that applies every object in order, as docs/protocol.md says, shows of each message."""
    shown: dict[str, dict[str, Any]] = {}

    def take(obj: Obj) -> None:
        kind = obj["type"]
        if kind == "message":
            shown[obj["id"]] = copy.deepcopy(obj)
            return
        target = shown.get(obj.get("target", ""))
        if target is None:
            return
        if kind == "edit":
            target["text"] = obj["text"]
            target["edited"] = obj["ts"]
        elif kind == "delete":
            for field in ("text", "mentions", "reactions"):
                target.pop(field, None)
            target["deleted"] = obj["ts"]
        elif kind == "reaction":
            reactions = target.setdefault("reactions", [])
            entry = next((r for r in reactions if r["emoji"] == obj["emoji"]), None)
            if entry is None:
                entry = {"emoji": obj["emoji"], "count": 0, "names": []}
                reactions.append(entry)
            entry["count"] = obj["count"]
            names = entry["names"]
            if obj["on"] and obj["name"] not in names:
                names.append(obj["name"])
            if not obj["on"] and obj["name"] in names:
                names.remove(obj["name"])
            target["reactions"] = [r for r in reactions if r["count"] > 0]
            if not target["reactions"]:
                del target["reactions"]

    for obj in objects:
        if obj["type"] == "welcome":
            for entry in obj["history"]:
                take(entry)
        else:
            take(obj)
    return shown


def comparable(message: dict[str, Any]) -> dict[str, Any]:
    """A message's fields that every client must agree on (the live copy has no `ref` of others' changes)."""
    return {key: message.get(key) for key in ("id", "text", "edited", "deleted", "reactions", "mentions")}


async def test_typing_reaches_the_other_replica_and_ends_by_itself(
    stack: Stack, replicas: list[str], room: str
) -> None:
    ann = await client_on(stack.ws_url, replicas[0], name="ann", room=room)
    bob = await client_on(stack.ws_url, replicas[1], name="bob", room=room)
    start = len(bob.objects)
    await ann.send({"type": "typing"})
    shown = await bob.wait_for(lambda o: o["type"] == "typing" and "ann" in o["names"], start=start)
    assert shown["count"] == 1
    assert shown["room"] == room
    # Without another notice, it ends by itself (5 s after the last, and the next list goes out within a second).
    ended = await bob.wait_for(lambda o: o["type"] == "typing" and o["count"] == 0, start=start, timeout=15)
    assert ended["names"] == []
    # Never stored: a joiner's history and a resume hold no typing.
    late = await client_on(stack.ws_url, None, name="late", room=room)
    assert late.welcome is not None
    assert late.welcome["history"] == []
    for client in (ann, bob, late):
        await client.close()


async def test_a_message_ends_its_senders_typing_at_once(stack: Stack, replicas: list[str], room: str) -> None:
    ann = await client_on(stack.ws_url, replicas[0], name="ann", room=room)
    bob = await client_on(stack.ws_url, replicas[1], name="bob", room=room)
    start = len(bob.objects)
    await ann.send({"type": "typing"})
    await bob.wait_for(lambda o: o["type"] == "typing" and "ann" in o["names"], start=start)
    message = await said(ann, "done typing")
    after = len(bob.objects)
    await bob.wait_for(lambda o: o.get("id") == message["id"], start=start)
    # Well before the 5 s it would take by itself: the message ends it, on every replica.
    ended = await bob.wait_for(lambda o: o["type"] == "typing" and "ann" not in o["names"], start=after, timeout=3)
    assert ended["count"] == 0
    for client in (ann, bob):
        await client.close()


async def test_typing_more_often_than_allowed_is_ignored_without_an_error(
    stack: Stack, replicas: list[str], room: str
) -> None:
    ann = await client_on(stack.ws_url, replicas[0], name="ann", room=room)
    start = len(ann.objects)
    for _ in range(10):
        await ann.send({"type": "typing"})
    # The first answer with a ref after them is the marker's: the notices themselves got none.
    marker = await ann.reply_to({"type": "marker", "ref": "after"})
    assert marker["code"] == "unknown_type"
    assert [o for o in ann.objects[start:] if o["type"] == "error" and o is not marker] == []
    lists = [o for o in ann.objects[start:] if o["type"] == "typing"]
    assert all(o["names"] in (["ann"], []) for o in lists)
    await ann.close()


async def test_typing_before_joining_is_not_joined(stack: Stack) -> None:
    client = await ChatClient.open(stack.ws_url)
    reply = await client.reply_to({"type": "typing"})
    assert reply["code"] == "not_joined"
    await client.close()


async def test_edits_deletions_and_reactions_reach_everyone_in_one_order(
    stack: Stack, replicas: list[str], room: str
) -> None:
    ann = await client_on(stack.ws_url, replicas[0], name="ann", room=room)
    bob = await client_on(stack.ws_url, replicas[1], name="bob", room=room)
    first = await said(ann, "first")
    second = await said(ann, "second")
    edit = await change_made(ann, {"type": "edit", "id": first["id"], "text": "first, edited for @bob"})
    assert edit["target"] == first["id"]
    assert edit["mentions"] == ["bob"]
    await change_made(bob, {"type": "react", "id": first["id"], "emoji": "👍"})
    await change_made(ann, {"type": "react", "id": first["id"], "emoji": "👍"})
    await change_made(bob, {"type": "react", "id": second["id"], "emoji": "🎉"})
    await change_made(bob, {"type": "react", "id": second["id"], "emoji": "🎉", "on": False})
    last = await change_made(ann, {"type": "delete", "id": second["id"]})
    for client in (ann, bob):
        await client.wait_for(lambda o, last_id=last["id"]: o.get("id") == last_id)
    kinds = ("message", "edit", "delete", "reaction")
    seen = [[(o["type"], o["id"]) for o in client.objects if o["type"] in kinds] for client in (ann, bob)]
    assert seen[0] == seen[1]
    assert [kind for kind, _ in seen[0]] == ["message"] * 2 + ["edit"] + ["reaction"] * 4 + ["delete"]
    # The log's order: ids only grow.
    assert [entry_id for _, entry_id in seen[0]] == sorted(
        (entry_id for _, entry_id in seen[0]), key=lambda i: tuple(map(int, i.split("-")))
    )
    counts = [o["count"] for o in ann.objects if o["type"] == "reaction"]
    assert counts == [1, 2, 1, 0]
    shown = [state(client.objects) for client in (ann, bob)]
    assert shown[0][first["id"]]["text"] == "first, edited for @bob"
    assert shown[0][first["id"]]["reactions"] == [{"emoji": "👍", "count": 2, "names": ["bob", "ann"]}]
    assert "text" not in shown[0][second["id"]]
    assert {k: comparable(v) for k, v in shown[0].items()} == {k: comparable(v) for k, v in shown[1].items()}
    for client in (ann, bob):
        await client.close()


async def test_a_client_away_during_changes_resumes_with_since_and_ends_in_the_same_state(
    stack: Stack, replicas: list[str], room: str
) -> None:
    ann = await client_on(stack.ws_url, replicas[0], name="ann", room=room)
    bob = await client_on(stack.ws_url, replicas[1], name="bob", room=room)
    before = await said(ann, "said before carol left")
    carol = await client_on(stack.ws_url, replicas[1], name="carol", room=room)
    kept = carol.messages()
    assert kept[-1]["id"] == before["id"]
    await carol.close()
    during = await said(ann, "said while carol was away")
    await change_made(ann, {"type": "edit", "id": before["id"], "text": "edited while carol was away"})
    await change_made(bob, {"type": "react", "id": before["id"], "emoji": "❤️"})
    await change_made(bob, {"type": "react", "id": during["id"], "emoji": "🔥"})
    last = await change_made(ann, {"type": "delete", "id": during["id"]})
    back = await client_on(stack.ws_url, replicas[0], name="carol", room=room, since=before["id"])
    assert back.welcome is not None
    assert back.welcome["resumed"] is True
    history = back.welcome["history"]
    assert [o["type"] for o in history] == ["message", "edit", "reaction", "reaction", "delete"]
    # The message said while away is in the resume as it now is: deleted, its text not sent again.
    assert history[0]["id"] == during["id"]
    assert "text" not in history[0]
    assert history[-1]["id"] == last["id"]
    resumed = state([{"type": "welcome", "history": kept}, *back.objects])
    await ann.wait_for(lambda o: o.get("id") == last["id"])
    everyone = state(ann.objects)
    assert comparable(resumed[before["id"]]) == comparable(everyone[before["id"]])
    assert resumed[before["id"]]["text"] == "edited while carol was away"
    assert resumed[before["id"]]["reactions"] == [{"emoji": "❤️", "count": 1, "names": ["bob"]}]
    assert "text" not in resumed[during["id"]]
    for client in (ann, bob, back):
        await client.close()


async def test_a_late_joiners_history_and_the_scroll_back_show_messages_as_they_now_are(
    stack: Stack, replicas: list[str], room: str
) -> None:
    ann = await client_on(stack.ws_url, replicas[0], name="ann", room=room)
    bob = await client_on(stack.ws_url, replicas[1], name="bob", room=room)
    edited = await said(ann, "to be edited, @carol")
    deleted = await said(ann, "to be deleted")
    liked = await said(bob, "to be liked")
    edit = await change_made(ann, {"type": "edit", "id": edited["id"], "text": "edited, no mention now"})
    deletion = await change_made(ann, {"type": "delete", "id": deleted["id"]})
    for client in (ann, bob):
        await change_made(client, {"type": "react", "id": liked["id"], "emoji": "👍"})
    late = await client_on(stack.ws_url, None, name="late", room=room)
    assert late.welcome is not None
    history = late.welcome["history"]
    page = stack.get(f"/api/rooms/{room}/messages").json()["messages"]
    for messages in (history, page):
        assert [m["type"] for m in messages] == ["message"] * 3  # changes are applied, not listed
        first, second, third = messages
        assert first["text"] == "edited, no mention now"
        assert first["edited"] == edit["ts"]
        assert "mentions" not in first
        assert second["deleted"] == deletion["ts"]
        assert {"text", "mentions", "reactions"}.isdisjoint(second)
        assert third["text"] == "to be liked"
        assert third["reactions"] == [{"emoji": "👍", "count": 2, "names": ["ann", "bob"]}]
    assert history == page
    for client in (ann, bob, late):
        await client.close()


async def test_mentions_are_recognised_by_the_server(stack: Stack, replicas: list[str], room: str) -> None:
    ann = await client_on(stack.ws_url, replicas[0], name="ann", room=room)
    message = await said(ann, "@bob and @carol, thanks! (cc @bob, ann@example.org, @" + "x" * 33 + ")")
    assert message["mentions"] == ["bob", "carol"]
    plain = await said(ann, "no mentions here")
    assert "mentions" not in plain
    await ann.close()


async def test_every_refused_change_has_its_code_and_changes_nothing(
    stack: Stack, replicas: list[str], room: str
) -> None:
    ann = await client_on(stack.ws_url, replicas[0], name="ann", room=room)
    bob = await client_on(stack.ws_url, replicas[1], name="bob", room=room)
    mine = await said(ann, "ann's")
    cases: list[tuple[ChatClient, Obj, str]] = [
        (bob, {"type": "edit", "id": mine["id"], "text": "bob was here"}, "not_yours"),
        (bob, {"type": "delete", "id": mine["id"]}, "not_yours"),
        (ann, {"type": "edit", "id": "1-1", "text": "x"}, "unknown_message"),
        (ann, {"type": "edit", "id": "not an id", "text": "x"}, "invalid_id"),
        (ann, {"type": "delete"}, "invalid_id"),
        (ann, {"type": "edit", "id": mine["id"], "text": "  "}, "invalid_text"),
        (ann, {"type": "edit", "id": mine["id"], "text": "x" * 2001}, "too_long"),
        (ann, {"type": "edit", "id": mine["id"], "text": "ann's"}, "no_change"),
        (ann, {"type": "react", "id": mine["id"], "emoji": "🦄"}, "invalid_reaction"),
        (ann, {"type": "react", "id": mine["id"], "emoji": "👍", "on": "yes"}, "invalid_reaction"),
        (ann, {"type": "react", "id": mine["id"], "emoji": "👍", "on": False}, "no_change"),
    ]
    for client, frame, code in cases:
        answer = await changed(client, frame)
        assert answer.get("code") == code, (frame, answer)
    reaction = await change_made(bob, {"type": "react", "id": mine["id"], "emoji": "👍"})
    assert (await changed(bob, {"type": "react", "id": mine["id"], "emoji": "👍"}))["code"] == "no_change"
    assert (await changed(bob, {"type": "react", "id": reaction["id"], "emoji": "👍"}))["code"] == "unknown_message"
    await change_made(ann, {"type": "delete", "id": mine["id"]})
    for frame, code in (
        ({"type": "delete", "id": mine["id"]}, "no_change"),
        ({"type": "edit", "id": mine["id"], "text": "back again"}, "message_deleted"),
        ({"type": "react", "id": mine["id"], "emoji": "🎉"}, "message_deleted"),
    ):
        assert (await changed(ann, frame))["code"] == code
    # Nothing refused reached anyone: bob saw the message, one reaction and the deletion.
    await bob.wait_for(lambda o: o["type"] == "delete")
    kinds = [o["type"] for o in bob.objects if o["type"] in ("message", "edit", "delete", "reaction")]
    assert kinds == ["message", "reaction", "delete"]
    for client in (ann, bob):
        await client.close()


async def test_a_change_before_joining_is_not_joined(stack: Stack) -> None:
    client = await ChatClient.open(stack.ws_url)
    for frame in (
        {"type": "edit", "id": "1-1", "text": "x", "ref": "a"},
        {"type": "delete", "id": "1-1", "ref": "b"},
        {"type": "react", "id": "1-1", "emoji": "👍", "ref": "c"},
    ):
        reply = await client.reply_to(frame)
        assert (reply["code"], reply["ref"]) == ("not_joined", frame["ref"])
    await client.close()
