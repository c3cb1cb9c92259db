"""Owned names (issue 16) on the real stack, through nginx, with people on both replicas: the first join claims a
name, and a join without its token gets `name_taken` on any replica, however the name is spelled (case, look-alike
letters); its owner may use it from several tabs at once and release it; what one address may claim is bounded. On
the single Redis and on the Redis Cluster."""

from __future__ import annotations

from infinite_chat.names import fold
from support.addresses import new_address
from support.chat import ChatClient, Obj, client_on, eventually
from support.names import remember, unique
from support.stack import Stack
from support.stacks import either_stack  # noqa: F401 (a fixture: each test on both layouts)

CYRILLIC_A = "\u0430"


async def join_as(client: ChatClient, name: str, room: str, token: str | None = None) -> Obj:
    """A join exactly as given (no token from the run's jar, though a welcome's goes into it): its welcome or its
    error."""
    frame: Obj = {"type": "join", "name": name, "room": room}
    if token is not None:
        frame["token"] = token
    start = len(client.objects)
    await client.send(frame)
    answer = await client.wait_for(lambda o: o["type"] in ("welcome", "error"), start=start)
    if answer["type"] == "welcome":
        remember(answer["name"], answer["token"])
    return answer


async def stranger_on(stack: Stack, replica: str, room: str) -> ChatClient:
    """Someone else, joined under a name of their own, on the given replica: their socket can try other names."""
    return await client_on(stack.ws_url, replica, name=unique("stranger"), room=room)


async def refused(client: ChatClient, frame: Obj) -> Obj:
    start = len(client.objects)
    await client.send(frame)
    return await client.wait_for(lambda o: o["type"] in ("error", "released", "welcome"), start=start)


async def test_a_name_is_its_claimers_on_every_replica(stack: Stack, replicas: list[str], room: str) -> None:
    name = unique("alice")
    owner = await ChatClient.open(stack.ws_url)
    welcome = await join_as(owner, name, room)
    assert welcome["type"] == "welcome", welcome
    token = welcome["token"]
    assert isinstance(token, str)
    assert len(token) >= 43
    other = replicas[1] if welcome["replica"] == replicas[0] else replicas[0]

    # On the other replica, nobody else may take it: no token, or a wrong one. The socket stays usable.
    candidate = await ChatClient.open(stack.ws_url)
    for attempt in (None, "not-her-token", token[:-1] + ("A" if token[-1] != "A" else "B")):
        answer = await join_as(candidate, name, room, attempt)
        assert (answer["type"], answer.get("code")) == ("error", "name_taken"), answer
    answer = await join_as(candidate, unique("carol"), room)
    assert answer["type"] == "welcome", answer

    # Her token works anywhere, and keeps the token she has.
    again = await client_on(stack.ws_url, other, name=name, room=room)
    assert again.welcome is not None
    assert (again.welcome["name"], again.welcome["token"]) == (name, token)
    for client in (owner, candidate, again):
        await client.close()


async def test_look_alike_names_are_one_name_under_its_first_spelling(
    stack: Stack, replicas: list[str], room: str
) -> None:
    name = unique("Alice")
    owner = await client_on(stack.ws_url, replicas[0], name=name, room=room)
    assert owner.welcome is not None
    token = owner.welcome["token"]
    stranger = await stranger_on(stack, replicas[1], room)
    look_alikes = [name.lower(), name.upper(), CYRILLIC_A + name[1:].lower(), f" {name} ", "\uff21" + name[1:]]
    for look_alike in look_alikes:
        assert fold(look_alike.strip()) == fold(name)
        other = await ChatClient.open(stack.ws_url)
        answer = await join_as(other, look_alike, room)
        assert (answer["type"], answer.get("code")) == ("error", "name_taken"), (look_alike, answer)
        await other.close()
    # Her token, with any spelling, is her under the first one: one name online, with her messages under it.
    spelled = await ChatClient.open(stack.ws_url)
    welcome = await join_as(spelled, name.upper(), room, token)
    assert welcome["type"] == "welcome", welcome
    assert welcome["name"] == name
    assert welcome["online"].count(name) == 1
    assert name.upper() not in welcome["online"]
    reply = await spelled.say_and_wait("same person", "r1")
    assert reply["name"] == name
    await stranger.wait_for(lambda o: o["type"] == "message" and o.get("ref") == "r1" and o["name"] == name)
    for client in (owner, stranger, spelled):
        await client.close()


async def test_two_tabs_with_one_token_are_one_person(stack: Stack, replicas: list[str], room: str) -> None:
    name = unique("tabs")
    first = await client_on(stack.ws_url, replicas[0], name=name, room=room)
    second = await client_on(stack.ws_url, replicas[1], name=name, room=room)  # the run's jar has her token
    assert first.welcome is not None
    assert second.welcome is not None
    assert first.welcome["token"] == second.welcome["token"]
    watcher = await client_on(stack.ws_url, replicas[0], name=unique("watcher"), room=room)
    assert watcher.welcome is not None
    assert watcher.welcome["online"].count(name) == 1
    # One's own message is one sent under the same claimed name: the other tab may edit it.
    said = await first.say_and_wait("typed in one tab", "t1")
    start = len(watcher.objects)
    await second.send({"type": "edit", "id": said["id"], "text": "fixed in the other", "ref": "t2"})
    edit = await watcher.wait_for(lambda o: o.get("ref") == "t2", start=start)
    assert (edit["type"], edit["text"], edit["name"]) == ("edit", "fixed in the other", name)
    for client in (first, second, watcher):
        await client.close()


async def test_a_released_name_is_free_for_anyone_and_its_socket_is_closed(
    stack: Stack, replicas: list[str], room: str
) -> None:
    name = unique("leaver")
    owner = await client_on(stack.ws_url, replicas[0], name=name, room=room)
    tab = await client_on(stack.ws_url, replicas[1], name=name, room=room)
    assert owner.welcome is not None
    token = owner.welcome["token"]
    stranger = await stranger_on(stack, replicas[1], room)

    # A wrong token releases nothing.
    answer = await refused(stranger, {"type": "release", "name": name, "token": "guess"})
    assert (answer["type"], answer.get("code")) == ("error", "name_taken"), answer
    answer = await join_as(await ChatClient.open(stack.ws_url), name, room)
    assert answer.get("code") == "name_taken", answer

    answer = await refused(owner, {"type": "release", "name": name.upper(), "token": token})
    assert answer == {"type": "released", "name": name.upper()}
    assert await owner.wait_closed() == 1000
    assert owner.ws.close_reason == "name released"

    # Free for the next join, on the other replica, with a new token; the old one is worth nothing now.
    taker = await ChatClient.open(stack.ws_url)
    welcome = await join_as(taker, name, room)
    assert welcome["type"] == "welcome", welcome
    assert welcome["token"] != token
    late = await ChatClient.open(stack.ws_url)
    answer = await join_as(late, name, room, token)
    assert answer.get("code") == "name_taken", answer
    # The other tab was not the socket that released: it stays until it ends.
    assert not tab.closed
    for client in (tab, stranger, taker, late):
        await client.close()


async def test_an_address_may_claim_only_so_many_new_names_an_hour(stack: Stack, room: str) -> None:
    address = new_address()
    sockets: list[ChatClient] = []
    claimed: list[Obj] = []
    try:
        for n in range(30):  # ADDRESS_NAMES_PER_HOUR
            client = await ChatClient.open(stack.ws_url, address=address)
            sockets.append(client)
            claimed.append(await join_as(client, unique(f"claim{n}"), room))
            await client.close()
        assert all(welcome["type"] == "welcome" for welcome in claimed), claimed
        client = await ChatClient.open(stack.ws_url, address=address)
        sockets.append(client)
        answer = await join_as(client, unique("one-more"), room)
        assert (answer["type"], answer["code"]) == ("error", "too_many_names"), answer
        assert 60_000 <= answer["retry_after_ms"] <= 121_000  # one name's refill: an hour / 30
        # A name the address holds costs nothing.
        answer = await join_as(client, claimed[0]["name"], room, claimed[0]["token"])
        assert answer["type"] == "welcome", answer
    finally:
        for client in sockets:
            await client.close()


async def test_a_connection_gets_a_few_tries_of_a_name_then_one_a_second(stack: Stack, room: str) -> None:
    owner = await client_on(stack.ws_url, None, name=unique("popular"), room=room)
    assert owner.welcome is not None
    taken = owner.welcome["name"]
    guesser = await ChatClient.open(stack.ws_url)
    start = len(guesser.objects)
    for _ in range(6):
        await guesser.send({"type": "join", "name": taken, "room": room})

    def codes() -> list[str]:
        return [o["code"] for o in guesser.objects[start:] if o["type"] == "error"]

    await eventually(lambda: len(codes()) >= 6, timeout=10, what="an answer to each of the six joins")
    assert codes() == ["name_taken"] * 5 + ["rate_limited"], codes()
    assert guesser.objects[-1]["retry_after_ms"] > 0
    await owner.close()
    await guesser.close()
