"""Owned names: the first join with a name claims it for whoever holds its token (docs/protocol.md, "Names").

A claim is kept in Redis under the name's folded form, so that names which read alike are one name: compared after
NFKC, case folding and Unicode's confusables (UTS #39's skeleton), "Alice", "ALICE" and "аlice" (a Cyrillic а) are
all "alice". The token is 32 random bytes; only its SHA-256 is stored (a fast hash is enough for a secret of that
size: there is nothing to guess), and the name's first spelling is what everyone sees, whichever spelling its
owner types.
"""

from __future__ import annotations

import functools
import hashlib
import json
import secrets
import unicodedata
from enum import StrEnum
from importlib.resources import files
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .broker import Broker

# Wraps right-to-left characters in confusable_homoglyphs' data, for display: not part of the character.
_LEFT_TO_RIGHT_MARK = "\u200e"


class Claim(StrEnum):
    """What a join found of its name."""

    CLAIMED = "claimed"  # the name was free: it is this token's now
    OWNED = "owned"  # the name is this token's already
    TAKEN = "taken"  # the name is someone else's
    FREE = "free"  # only asked, not claimed: nobody holds it
    BANNED = "banned"  # a moderator banned it from the whole chat


def new_token() -> str:
    return secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def fold(name: str) -> str:
    """The form under which a name is claimed: two names with one fold are one name."""
    folded = unicodedata.normalize("NFKC", name).casefold()
    prototypes = _prototypes()
    # The skeleton works on decomposed text, so that a look-alike accent folds like a look-alike letter.
    skeleton = "".join(prototypes.get(char, char) for char in unicodedata.normalize("NFD", folded))
    return unicodedata.normalize("NFKC", skeleton).casefold()


@functools.cache
def _prototypes() -> dict[str, str]:
    """Each confusable character and the one its group reads as (the group's prototype in Unicode's confusables.txt,
    which the data lists with every member of its group).

    confusable_homoglyphs keeps, for each character, the characters it may be confused with: a prototype lists its
    whole group, a member lists its prototype. So the groups are the connected parts of that graph, and in each the
    prototype is the one with the most neighbours."""
    data = json.loads(files("confusable_homoglyphs").joinpath("confusables.json").read_text(encoding="utf-8"))
    parent: dict[str, str] = {}
    neighbours: dict[str, int] = {}

    def root(item: str) -> str:
        while parent.setdefault(item, item) != item:
            parent[item] = parent[parent[item]]
            item = parent[item]
        return item

    for raw, alikes in data.items():
        char = _clean(raw)
        for alike in alikes:
            other = _clean(alike["c"])
            neighbours[char] = neighbours.get(char, 0) + 1
            neighbours[other] = neighbours.get(other, 0) + 1
            a, b = root(char), root(other)
            if a != b:
                parent[a] = b
    groups: dict[str, list[str]] = {}
    for item in list(parent):
        groups.setdefault(root(item), []).append(item)
    prototypes: dict[str, str] = {}
    for members in groups.values():
        prototype = max(members, key=lambda member: (neighbours[member], -len(member), -ord(member[0])))
        for member in members:
            if len(member) == 1 and member != prototype:
                prototypes[member] = prototype
    return prototypes


def _clean(chars: str) -> str:
    return chars.strip(_LEFT_TO_RIGHT_MARK) if len(chars) > 1 else chars


class NameTaken(Exception):
    """The name (as folded) is held by another token."""


class NameBanned(Exception):
    """The name is banned from the whole chat until `until` (ms since the epoch; broker.FOREVER)."""

    def __init__(self, until: int) -> None:
        super().__init__(until)
        self.until = until


class TooManyNames(Exception):
    """The address has claimed as many new names as it may this hour."""

    def __init__(self, retry_after_ms: int) -> None:
        super().__init__(retry_after_ms)
        self.retry_after_ms = retry_after_ms


class Claims:
    """A join's name, checked against its claim: the replica's side of claim.lua."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker

    async def claim(self, name: str, token: str | None, address: str, *, issue: bool = True) -> tuple[str, str]:
        """The name as claimed and its token, for a join offering `token` (or none): the name is the token's
        already, or it was free and is a new token's now (with `issue`; without, the offered token's: a signed-in
        person's). A new name is charged to the address (TooManyNames); NameTaken when it is someone else's;
        NameBanned when a moderator banned it from the chat."""
        folded = fold(name)
        offered = token_hash(token) if token else ""
        fresh = new_token() if issue or not token else token
        # A returning name costs one call; only a name nobody holds is charged to the address and then claimed.
        verdict, held, banned = await self.broker.claim(folded, name, offered, token_hash(fresh), take=False)
        if verdict is Claim.FREE:
            refusal = await self.broker.charge(address, 0, new_room=False, new_name=True)
            if refusal is not None:
                raise TooManyNames(refusal.retry_after_ms)
            verdict, held, banned = await self.broker.claim(folded, name, offered, token_hash(fresh), take=True)
        if verdict is Claim.BANNED:
            raise NameBanned(banned)
        if verdict is Claim.CLAIMED:
            return held, fresh
        if verdict is Claim.OWNED and token is not None:
            return held, token
        raise NameTaken(held)

    async def release(self, name: str, token: str) -> bool:
        """Gives the name up, if it is the token's (or nobody's); False when it is someone else's."""
        return await self.broker.release(fold(name), token_hash(token))
