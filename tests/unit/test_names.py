"""Owned names in one process (names.py, the in-memory broker, the replica through Quart's test client): which names
are one name, and what a join, a second join and a release get. The same through nginx, on both replicas and on
Redis: tests/system/test_owned_names.py."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import jwt
import pytest

from infinite_chat import Settings, create_app
from infinite_chat.broker import MemoryBroker
from infinite_chat.config import Secret
from infinite_chat.names import Claims, NameTaken, TooManyNames, fold, new_token, token_hash
from support.asgi import AsgiSocket
from support.chat import ChatClient

Obj = dict[str, Any]


@pytest.mark.parametrize(
    ("one", "other"),
    [
        ("Alice", "alice"),
        ("ALICE", "alice"),
        ("\u0430lice", "alice"),  # Cyrillic а
        ("\uff21lice", "alice"),  # fullwidth Ａ
        ("𝐀lice", "alice"),  # mathematical bold A
        ("bob0", "bobo"),  # a zero reads as an o
        ("rn", "m"),
        ("Straße", "strasse"),
        ("Ünïcode", "ünïcode"),
        ("Страна", "страна"),  # Cyrillic, in either case
        ("ﬁsh", "fish"),  # the ligature
    ],
)
def test_names_that_read_alike_are_one_name(one: str, other: str) -> None:
    assert fold(one) == fold(other)


@pytest.mark.parametrize(
    ("one", "other"),
    [("alice", "alicia"), ("bob", "rob"), ("ann", "anne"), ("李雷", "李蕾"), ("😀", "😃"), ("AIice", "Alice")],
)
def test_names_that_read_differently_are_two(one: str, other: str) -> None:
    # The last: capital I and small l are told apart once case is folded (docs/protocol.md, "Names", says so).
    assert fold(one) != fold(other)


@pytest.mark.parametrize("name", ["Alice", "\u0430lice", "ǅemal", "ﷺ", "x\u0301", "Ⅻ", "㍿"])
def test_a_fold_is_its_own_fold(name: str) -> None:
    assert fold(fold(name)) == fold(name)


def test_a_token_is_random_and_only_its_hash_is_kept() -> None:
    tokens = {new_token() for _ in range(100)}
    assert len(tokens) == 100
    assert all(len(token) == 43 for token in tokens)
    token = tokens.pop()
    assert token_hash(token) == token_hash(token)
    assert token not in token_hash(token)


async def test_a_claim_charges_the_address_once_and_returning_costs_nothing() -> None:
    claims = Claims(MemoryBroker(Settings(address_names_per_hour=2)))
    name, token = await claims.claim("Alice", None, "198.18.0.1")
    assert name == "Alice"
    for _ in range(5):  # her own name, however often and however spelled: no charge
        assert await claims.claim("alice", token, "198.18.0.1") == ("Alice", token)
    with pytest.raises(NameTaken):
        await claims.claim("ALICE", None, "198.18.0.1")
    with pytest.raises(NameTaken):
        await claims.claim("alice", new_token(), "198.18.0.2")
    await claims.claim("bob", None, "198.18.0.1")
    with pytest.raises(TooManyNames) as refused:
        await claims.claim("carol", None, "198.18.0.1")
    assert refused.value.retry_after_ms == pytest.approx(1_800_000, rel=0.02)
    # A stale token on a free name: a new claim, with a new token.
    name, fresh = await claims.claim("dave", token, "198.18.0.3")
    assert (name, fresh != token) == ("dave", True)


@pytest.fixture
async def chat() -> AsyncIterator[Any]:
    app = create_app(Settings(replica_name="unit-names"))
    async with app.test_app():
        opened: list[ChatClient] = []

        async def socket() -> ChatClient:
            client = ChatClient.over(await AsgiSocket.open(app))  # type: ignore[arg-type]
            opened.append(client)
            return client

        yield socket
        for client in opened:
            if not client.closed:
                await client.close()


async def answer_to(client: ChatClient, frame: Obj) -> Obj:
    start = len(client.objects)
    await client.send(frame)
    return await client.wait_for(lambda o: o["type"] in ("welcome", "error", "released"), start=start, timeout=2)


async def test_a_join_claims_its_name_and_a_release_frees_it(chat: Any) -> None:
    owner = await chat()
    welcome = await answer_to(owner, {"type": "join", "name": "Zoë", "room": "names"})
    token = welcome["token"]
    intruder = await chat()
    taken = await answer_to(intruder, {"type": "join", "name": "ZOË", "room": "names"})
    assert (taken["type"], taken["code"]) == ("error", "name_taken")
    bad = await answer_to(intruder, {"type": "join", "name": "x", "room": "names", "token": 5})
    assert bad["code"] == "invalid_token"
    assert (await answer_to(intruder, {"type": "release", "name": "zoë", "token": "guess"}))["code"] == "name_taken"
    assert (await answer_to(intruder, {"type": "release", "name": "zoë"}))["code"] == "invalid_token"

    released = await answer_to(owner, {"type": "release", "name": "zoë", "token": token})
    assert released == {"type": "released", "name": "zoë"}
    assert await owner.wait_closed(timeout=2) == 1000
    # Free: the intruder's socket (refused before) may take it now, under its own spelling.
    welcome = await answer_to(intruder, {"type": "join", "name": "ZOË", "room": "names"})
    assert (welcome["type"], welcome["name"]) == ("welcome", "ZOË")
    assert welcome["token"] != token


# ---- signed-in deployments: the name comes from the token, and is owned by its subject ------------------------------

SECRET = "a-secret-of-at-least-32-bytes-for-hs256!"


def signed(subject: str, name: str, **claims: Any) -> str:
    now = int(time.time())
    return jwt.encode({"sub": subject, "name": name, "exp": now + 300, "iat": now, **claims}, SECRET, "HS256")


@pytest.fixture
async def signed_in_chat() -> AsyncIterator[Any]:
    app = create_app(Settings(replica_name="unit-jwt", auth_mode="jwt", auth_jwt_secret=Secret(SECRET)))
    async with app.test_app():
        opened: list[ChatClient] = []

        async def socket(query: str = "") -> ChatClient:
            client = ChatClient.over(await AsgiSocket.open(app, query=query))  # type: ignore[arg-type]
            opened.append(client)
            return client

        yield socket
        for client in opened:
            if not client.closed:
                await client.close()


async def test_a_signed_in_join_takes_its_name_from_the_token_and_owns_it(signed_in_chat: Any) -> None:
    ann = await signed_in_chat()
    missing = await answer_to(ann, {"type": "join", "name": "ann", "room": "jwt"})
    assert missing["code"] == "sign_in_required"
    forged = await answer_to(ann, {"type": "join", "name": "x", "room": "jwt", "token": signed("u1", "Ann")[:-2]})
    assert forged["code"] == "invalid_token"
    welcome = await answer_to(ann, {"type": "join", "name": "whatever", "room": "jwt", "token": signed("u1", "Ann")})
    assert (welcome["type"], welcome["name"]) == ("welcome", "Ann")
    assert "token" not in welcome  # nothing for the client to keep: the sign-in is the proof
    # The same person elsewhere, with the token in the socket's URL; someone else signed in as "ann" may not.
    again = await signed_in_chat(f"token={signed('u1', 'ann')}")
    assert (await answer_to(again, {"type": "join", "name": "-", "room": "jwt"}))["name"] == "Ann"
    other = await signed_in_chat()
    taken = await answer_to(other, {"type": "join", "name": "-", "room": "jwt", "token": signed("u2", "ANN")})
    assert taken["code"] == "name_taken"
