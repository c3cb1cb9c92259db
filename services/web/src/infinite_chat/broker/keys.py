"""Where the chat keeps things in Redis: every key and channel name, in one place (docs/architecture.md, "Key
layout").

Every key of a room carries the room in a hash tag (`chat:{lobby}:log`), so that a room's log, presence and channel
are in one cluster slot: the append script (store and publish) and the presence script run on one node.
"""

from __future__ import annotations

from redis.crc import key_slot


def log_key(room: str) -> str:
    return f"chat:{{{room}}}:log"


def confirmed_key(room: str) -> str:
    """The newest message of the room that its primary's replicas are known to have (REDIS_CONFIRM_REPLICAS): what
    readers of the log may show. Messages after it are held back until a confirmation passes them."""
    return f"chat:{{{room}}}:confirmed"


def changes_keys(room: str) -> list[str]:
    """The room's changed messages (change.lua: message id -> what edits, a deletion and reactions made of it) and
    the same ids by time, so that the states of messages trimmed from the log are forgotten."""
    return [f"chat:{{{room}}}:changes", f"chat:{{{room}}}:changed"]


def retry_keys(room: str) -> list[str]:
    """The refs of the room's messages of this retry window and of the one before (append.lua: "<name>\n<ref>" ->
    message id), so that a retried say is stored once."""
    return [f"chat:{{{room}}}:refs", f"chat:{{{room}}}:refs:before"]


def retry_field(name: str, ref: str) -> str:
    return f"{name}\n{ref}"


# A room's presence keys, in the order presence.lua takes them (KEYS[1] to KEYS[6]; docs/architecture.md has the
# layout): its connection entries by expiry, each name's count of them, the names online in order, the change since
# the last event, when each of those changes was made as against the list's reads, and the room's last event.
PRESENCE_PARTS = ("connections", "counts", "names", "changes", "change-reads", "events")


def presence_keys(room: str) -> list[str]:
    return [f"chat:{{{room}}}:presence:{part}" for part in PRESENCE_PARTS]


def channel_key(room: str) -> str:
    return f"chat:{{{room}}}:channel"


def room_of_channel(channel: bytes) -> str:
    return channel.decode()[len("chat:{") : -len("}:channel")]


def listening_key(tag: int) -> str:
    """A channel on which nothing is published. Each subscription connection holds one (on a cluster, one whose
    slot its node serves), so that the connection stays subscribed, and watched, while it carries no room."""
    return f"chat:listening:{{{tag}}}"


def is_listening_key(channel: bytes) -> bool:
    return channel.startswith(b"chat:listening:")


def old_log_key(room: str) -> str:
    """Where a room's log was before its keys had a hash tag (up to the release with issue 12)."""
    return f"chat:room:{room}:log"


def quota_key(address: str) -> str:
    return f"chat:address:{address}:quota"


def rules_keys(room: str) -> list[str]:
    """A room's moderation (moderation.lua): its rules (mutes, bans, slow mode), and each name's last message while
    slow mode is on."""
    return [f"chat:{{{room}}}:rules", f"chat:{{{room}}}:spoke"]


# Names banned from the whole chat, scored by when (ms): what every replica looks at twice a second to close their
# sockets. And the audit log of every moderator's action (a stream). One key each, for the whole chat.
BANS_KEY = "chat:bans"
AUDIT_KEY = "chat:audit"


def name_quota_key(folded: str) -> str:
    """A name's allowance of new rooms (quota.lua's hash, as an address's)."""
    return f"chat:name-quota:{folded}"


def name_key(folded: str) -> str:
    """A claimed name (claim.lua), under its folded form (names.fold); one key, so any slot will do."""
    return f"chat:name:{folded}"


def slot_of(key: str | bytes) -> int:
    """The cluster slot of a key or shard channel (Redis's CRC16 of its hash tag)."""
    return key_slot(key.encode() if isinstance(key, str) else key)
