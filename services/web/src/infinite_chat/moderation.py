"""Moderators and what they do (docs/protocol.md, "Moderation"): who is one, each action as the rule it sets in Redis
(mutes, bans and slow mode, enforced by the scripts that store messages and by every replica's joins), the notice
the room's members get, and the audit log entry that records it."""

from __future__ import annotations

import time

import orjson

from .broker import FOREVER, Broker
from .config import Settings
from .names import fold, token_hash
from .protocol import Delete, Limits, Moderation, Mute, Scope, Slow, millis_time, moderation_frame


def is_moderator_token(settings: Settings, token: str) -> bool:
    return token_hash(token) in settings.moderator_tokens


def until_of(seconds: int | None) -> int:
    """Until when a rule of `seconds` holds (ms since the epoch): FOREVER for None, 0 (lifted) for 0."""
    if seconds is None:
        return FOREVER
    if seconds == 0:
        return 0
    return int(time.time() * 1000) + seconds * 1000


def until_text(until: int) -> str | None:
    return None if until in (0, FOREVER) else millis_time(until)


def wait_text(retry_after_ms: int) -> str:
    if retry_after_ms == FOREVER:
        return "until a moderator lifts it"
    seconds = max(1, round(retry_after_ms / 1000))
    return f"for {seconds} more second{'s' if seconds != 1 else ''}"


async def act(broker: Broker, room: str, by: str, action: Moderation) -> None:
    """Sets the rule a moderator asked for, tells the room (on every replica), and keeps it in the audit log."""
    if isinstance(action, Limits):
        frame = moderation_frame(
            "limits",
            room=room,
            name=None,
            seconds=None,
            until=None,
            by=by,
            reason=action.reason,
            sockets=action.sockets,
        )
        await broker.moderate(room, "sockets", "", action.sockets, frame, closes=False)
        await audit(broker, by, "limits", room=room, sockets=action.sockets, reason=action.reason)
        return
    if isinstance(action, Slow):
        frame = moderation_frame(
            "slow", room=room, name=None, seconds=action.seconds, until=None, by=by, reason=action.reason
        )
        await broker.moderate(room, "slow", "", action.seconds, frame, closes=False)
        await audit(broker, by, "slow", room=room, seconds=action.seconds, reason=action.reason)
        return
    folded = fold(action.name)
    seconds = action.seconds
    until = until_of(seconds)
    if isinstance(action, Mute):
        kind, rule = "mute", "mute"
    elif action.scope is Scope.ROOM:
        kind, rule = "ban", "ban"
    else:
        # On the name's claim, for every room; every replica looks for new bans twice a second and closes the
        # name's sockets. Announced in the moderator's room, whose sockets of the name close at once.
        kind, rule = "ban_chat", ""
        await broker.ban_everywhere(folded, until)
    frame = moderation_frame(
        kind, room=room, name=action.name, seconds=seconds, until=until_text(until), by=by, reason=action.reason
    )
    await broker.moderate(room, rule, folded, until, frame, closes=kind != "mute" and until != 0)
    await audit(broker, by, kind, room=room, name=action.name, seconds=seconds, reason=action.reason)


async def audit_delete(broker: Broker, room: str, by: str, delete: Delete) -> None:
    await audit(broker, by, "delete", room=room, message=delete.target, reason=delete.reason)


async def audit(broker: Broker, by: str, action: str, **fields: object) -> None:
    entry = {"at": millis_time(int(time.time() * 1000)), "by": by, "action": action, **fields}
    await broker.audit(orjson.dumps({key: value for key, value in entry.items() if value is not None}))
