"""Protocol v1: what clients may send, and the one place where server frames are built (docs/protocol.md)."""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum, StrEnum
from typing import ClassVar

import orjson

from .characters import name_problem, text_problem

DEFAULT_ROOM = "lobby"
NAME_MAX = 32
TEXT_MAX = 2000
REF_MAX = 64
# A join's token: a name's claim token, or a signed-in deployment's JWT (which can be long); longer is refused unread.
TOKEN_MAX = 8192
# Moderation: the longest mute or timed ban (30 days; a ban may also be for good), the slowest slow mode (an hour
# between one person's messages), and a moderator's reason.
MODERATION_SECONDS_MAX = 30 * 86_400
SLOW_SECONDS_MAX = 3_600
# The most sockets a moderator may let one name have in a room.
SOCKETS_PER_NAME_MAX = 10_000
REASON_MAX = 200
# Names a message lists as mentioned (`@name`), at most.
MENTIONS_MAX = 20
# The reactions there are: a fixed set, so that a message's reactions are bounded and every client can show them.
REACTIONS = ("👍", "👎", "❤️", "😂", "😮", "😢", "🎉", "🙏", "👀", "🔥", "✅", "🚀")
# Reactions (name and emoji pairs) one message may hold; and the names of each emoji a message object lists (its
# count is exact), so that a popular message's object stays small.
REACTIONS_PER_MESSAGE = 500
REACTION_NAMES_SHOWN = 10
# The most bytes these can take in a server frame's JSON: a name's characters at 4 bytes each and its quotes and
# comma; a message with the longest text, name and ref at their most escaped (a control character in a ref is 6
# bytes), its mentions, every reaction with the names it lists, and its fixed fields. Every bound in bytes is
# derived from these.
NAME_MAX_BYTES = NAME_MAX * 4 + 3
MESSAGE_MAX_BYTES = (
    TEXT_MAX * 4
    + NAME_MAX_BYTES * (1 + MENTIONS_MAX)
    + REF_MAX * 6
    + len(REACTIONS) * (REACTION_NAMES_SHOWN * NAME_MAX_BYTES + 48)
    + 320
)
ROOM_PATTERN = re.compile(r"[a-z0-9_-]{1,32}")
# Redis stream ids: "<milliseconds>-<sequence>", each part an unsigned 64-bit number. Anything else cannot be in a
# room's log. At most 19 digits, so that every string that matches is also one Redis accepts (2**64 has 20 digits):
# Redis answers a larger number with an error, which would look like an outage. [0-9], not \d: \d also matches
# other scripts' digits ("١-٠"), which Python's int() reads but Redis does not.
MESSAGE_ID_PATTERN = re.compile(r"([0-9]{1,19})-([0-9]{1,19})")
# A mention: "@" where a word does not go on (so not in "ann@example.org"), then everything up to the next space.
MENTION_PATTERN = re.compile(r"(?<!\w)@(\S+)")
# Left off the end of a mention: the punctuation that follows a name in a sentence ("thanks, @ann!").
MENTION_TRAILER = ".,;:!?)]}'\""

# A server frame may carry several objects, one per line; compact JSON never contains a raw newline.
FRAME_SEPARATOR = b"\n"


class ErrorCode(StrEnum):
    """The `code` of an `error` object: every one the server sends, defined here once (docs/protocol.md's table is
    checked against this list)."""

    BAD_JSON = "bad_json"
    UNKNOWN_TYPE = "unknown_type"
    NOT_JOINED = "not_joined"
    ALREADY_JOINED = "already_joined"
    INVALID_NAME = "invalid_name"
    INVALID_ROOM = "invalid_room"
    INVALID_SINCE = "invalid_since"
    INVALID_TEXT = "invalid_text"
    TOO_LONG = "too_long"
    INVALID_REF = "invalid_ref"
    RATE_LIMITED = "rate_limited"
    QUOTA_EXCEEDED = "quota_exceeded"
    TOO_MANY_ROOMS = "too_many_rooms"
    UNAVAILABLE = "unavailable"
    # Edits, deletions and reactions (the conversation's changes to a message).
    INVALID_ID = "invalid_id"
    INVALID_REACTION = "invalid_reaction"
    UNKNOWN_MESSAGE = "unknown_message"
    NOT_YOURS = "not_yours"
    EDIT_WINDOW_CLOSED = "edit_window_closed"
    MESSAGE_DELETED = "message_deleted"
    NO_CHANGE = "no_change"
    TOO_MANY_REACTIONS = "too_many_reactions"
    # Owned names.
    NAME_TAKEN = "name_taken"
    TOO_MANY_NAMES = "too_many_names"
    # Signing in (AUTH_MODE jwt or alb).
    SIGN_IN_REQUIRED = "sign_in_required"
    INVALID_TOKEN = "invalid_token"
    # Moderation.
    NOT_MODERATOR = "not_moderator"
    INVALID_MODERATION = "invalid_moderation"
    MUTED = "muted"
    BANNED = "banned"
    SLOW_MODE = "slow_mode"
    TOO_MANY_SOCKETS = "too_many_sockets"


class CloseCode(IntEnum):
    """The WebSocket close codes the server sends (docs/protocol.md); 1006 is no close frame at all."""

    NORMAL = 1000  # after `released`: the name this socket was joined under is no longer its own
    PROTOCOL_ERROR = 1002  # a frame that breaks RFC 6455 (wsproto's)
    INVALID_DATA = 1007  # a text frame that is not UTF-8 (wsproto's)
    TOO_MANY_FRAMES = 1008
    TOO_BIG = 1009
    RESTARTING = 1012
    TRY_AGAIN = 1013
    BANNED = 4003  # a moderator banned this name from the room or from the chat


class HttpError(StrEnum):
    """The `error` of an HTTP answer that is not a success: the API's, and a socket refused before it opens."""

    INVALID_ROOM = "invalid_room"
    INVALID_LIMIT = "invalid_limit"
    INVALID_BEFORE = "invalid_before"
    INVALID_AFTER = "invalid_after"
    UNAVAILABLE = "unavailable"
    NOT_FOUND = "not_found"
    UPGRADE_REQUIRED = "upgrade_required"
    FORBIDDEN_ORIGIN = "forbidden_origin"
    DRAINING = "draining"
    TOO_MANY_SOCKETS = "too_many_sockets"
    # The audit log (GET /api/moderation/log): no moderator's credentials, or someone else's.
    UNAUTHORIZED = "unauthorized"
    NOT_MODERATOR = "not_moderator"
    # nginx's own, past its per-address limits (services/nginx/nginx.conf).
    TOO_MANY_REQUESTS = "too_many_requests"


class ProtocolError(Exception):
    """A client frame the server refuses; becomes an `error` frame and the connection stays usable."""

    def __init__(self, code: ErrorCode, detail: str, ref: str | None = None) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.ref = ref


@dataclass(frozen=True, slots=True)
class Join:
    name: str
    room: str
    since: str | None
    token: str | None = None
    # A moderator token (MODERATOR_TOKENS), in a deployment where names are owned without signing in.
    moderator: str | None = None


@dataclass(frozen=True, slots=True)
class Release:
    """Gives up a claimed name, for whoever holds its token."""

    name: str
    token: str


@dataclass(frozen=True, slots=True)
class Say:
    text: str
    ref: str | None


@dataclass(frozen=True, slots=True)
class Typing:
    """The client's person is composing a message."""


class Change(StrEnum):
    """What a client can do to a message already in the log; each is an entry of the log after it."""

    EDIT = "edit"
    DELETE = "delete"
    REACT = "reaction"


@dataclass(frozen=True, slots=True)
class Edit:
    kind: ClassVar[Change] = Change.EDIT
    target: str
    text: str
    ref: str | None


@dataclass(frozen=True, slots=True)
class Delete:
    kind: ClassVar[Change] = Change.DELETE
    target: str
    ref: str | None
    # A moderator's reason, shown with the tombstone of someone else's message.
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class React:
    kind: ClassVar[Change] = Change.REACT
    target: str
    emoji: str
    on: bool
    ref: str | None


class Scope(StrEnum):
    ROOM = "room"
    CHAT = "chat"


@dataclass(frozen=True, slots=True)
class Mute:
    """A moderator stops a name from saying, editing or reacting in the room, for `seconds` (0: no longer)."""

    name: str
    seconds: int
    reason: str | None
    ref: str | None = None


@dataclass(frozen=True, slots=True)
class Ban:
    """A moderator bans a name from the room or from the whole chat, for `seconds` (None: for good; 0: no longer)."""

    name: str
    seconds: int | None
    scope: Scope
    reason: str | None
    ref: str | None = None


@dataclass(frozen=True, slots=True)
class Slow:
    """A moderator lets each person in the room send one message per `seconds` (0: off)."""

    seconds: int
    reason: str | None
    ref: str | None = None


@dataclass(frozen=True, slots=True)
class Limits:
    """A moderator lets each name have up to `sockets` sockets in the room (0: back to NAME_SOCKETS)."""

    sockets: int
    reason: str | None
    ref: str | None = None


Moderation = Mute | Ban | Slow | Limits
ClientFrame = Join | Say | Typing | Edit | Delete | React | Release | Mute | Ban | Slow | Limits


MessageId = tuple[int, int]


def parse_message_id(raw: str) -> MessageId | None:
    """The sortable form of a message id, or None when `raw` cannot be one."""
    match = MESSAGE_ID_PATTERN.fullmatch(raw)
    if match is None:
        return None
    return int(match.group(1)), int(match.group(2))


def is_name(raw: str) -> bool:
    """Whether `raw` is a name exactly as the server keeps one (a join's name after trimming): what the online list
    holds, and so what the HTTP API takes as `after`."""
    return 1 <= len(raw) <= NAME_MAX and raw == raw.strip() and name_problem(raw) is None


def mentions_in(text: str) -> list[str]:
    """The names a text mentions (docs/protocol.md, "Mentions"): as written, in order, without repeats, at most
    MENTIONS_MAX. A word after "@" that cannot be a name (too long, a character a name may not hold) is none."""
    found: list[str] = []
    for match in MENTION_PATTERN.finditer(text):
        name = match.group(1).rstrip(MENTION_TRAILER)
        if name and name not in found and is_name(name):
            found.append(name)
            if len(found) == MENTIONS_MAX:
                break
    return found


def parse_client_frame(data: str | bytes) -> ClientFrame:
    if isinstance(data, bytes):
        raise ProtocolError(ErrorCode.BAD_JSON, "Send text frames holding one JSON object; binary frames are not used.")
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise ProtocolError(ErrorCode.BAD_JSON, "That frame is not valid JSON.") from None
    if not isinstance(obj, dict):
        raise ProtocolError(ErrorCode.BAD_JSON, 'A frame must be one JSON object, like {"type": "say", ...}.')
    kind = obj.get("type")
    if kind == "say":
        return _parse_say(obj)
    if kind == "join":
        return _parse_join(obj)
    if kind == "typing":
        return Typing()
    if kind == "release":
        token = _parse_token(obj)
        if token is None:
            raise ProtocolError(ErrorCode.INVALID_TOKEN, 'Releasing a name takes its "token".')
        return Release(_parse_name(obj), token)
    if kind == "edit":
        ref = _parse_ref(obj)
        return Edit(_parse_target(obj, ref), _parse_text(obj, ref), ref)
    if kind == "delete":
        ref = _parse_ref(obj)
        return Delete(_parse_target(obj, ref), ref, _parse_reason(obj, ref))
    if kind in ("mute", "ban", "slow", "limits"):
        return _parse_moderation(kind, obj)
    if kind == "react":
        ref = _parse_ref(obj)
        target = _parse_target(obj, ref)
        emoji, on = obj.get("emoji"), obj.get("on", True)
        if not isinstance(emoji, str) or emoji not in REACTIONS or not isinstance(on, bool):
            detail = f'A reaction is one of {" ".join(REACTIONS)}, with "on" true or false.'
            raise ProtocolError(ErrorCode.INVALID_REACTION, detail, ref)
        return React(target, emoji, on, ref)
    raise ProtocolError(
        ErrorCode.UNKNOWN_TYPE,
        'The "type" must be "join", "say", "typing", "edit", "delete", "react", "release", "mute", "ban", "slow" '
        'or "limits".',
        _ref_if_valid(obj),
    )


def _parse_join(obj: dict[str, object]) -> Join:
    name = _parse_name(obj)
    room = obj.get("room", DEFAULT_ROOM)
    if room is None:
        room = DEFAULT_ROOM
    if not isinstance(room, str) or not ROOM_PATTERN.fullmatch(room):
        raise ProtocolError(ErrorCode.INVALID_ROOM, "A room name has 1 to 32 of a-z, 0-9, - and _.")
    since = obj.get("since")
    if since is not None and not isinstance(since, str):
        raise ProtocolError(ErrorCode.INVALID_SINCE, '"since" must be the id of a message, as a string.')
    moderator = obj.get("moderator")
    if moderator is not None and not (isinstance(moderator, str) and len(moderator) <= TOKEN_MAX):
        raise ProtocolError(ErrorCode.INVALID_TOKEN, f'"moderator" must be a string of at most {TOKEN_MAX} characters.')
    return Join(name=name, room=room, since=since or None, token=_parse_token(obj), moderator=moderator or None)


def _parse_moderation(kind: str, obj: dict[str, object]) -> Moderation:
    ref = _parse_ref(obj)
    try:
        if kind == "slow":
            return Slow(_parse_seconds(obj, SLOW_SECONDS_MAX, ref), _parse_reason(obj, ref), ref)
        if kind == "limits":
            sockets = obj.get("sockets")
            if not isinstance(sockets, int) or isinstance(sockets, bool) or not 0 <= sockets <= SOCKETS_PER_NAME_MAX:
                detail = f'"sockets" must be a whole number from 0 to {SOCKETS_PER_NAME_MAX}.'
                raise ProtocolError(ErrorCode.INVALID_MODERATION, detail, ref)
            return Limits(sockets, _parse_reason(obj, ref), ref)
        name = _parse_name(obj)
        if kind == "mute":
            return Mute(name, _parse_seconds(obj, MODERATION_SECONDS_MAX, ref), _parse_reason(obj, ref), ref)
        scope = obj.get("scope", Scope.ROOM.value)
        if scope not in (Scope.ROOM.value, Scope.CHAT.value):
            raise ProtocolError(ErrorCode.INVALID_MODERATION, 'A ban\'s "scope" is "room" or "chat".', ref)
        forever = obj.get("seconds") is None
        seconds = None if forever else _parse_seconds(obj, MODERATION_SECONDS_MAX, ref)
        return Ban(name, seconds, Scope(scope), _parse_reason(obj, ref), ref)
    except ProtocolError as error:
        # The name's errors are a join's, without a ref: this one has its frame's.
        raise ProtocolError(error.code, error.detail, ref) from None


def _parse_seconds(obj: dict[str, object], most: int, ref: str | None) -> int:
    seconds = obj.get("seconds")
    # bool is an int in Python: true is not a duration.
    if not isinstance(seconds, int) or isinstance(seconds, bool) or not 0 <= seconds <= most:
        raise ProtocolError(ErrorCode.INVALID_MODERATION, f'"seconds" must be a whole number from 0 to {most}.', ref)
    return seconds


def _parse_reason(obj: dict[str, object], ref: str | None = None) -> str | None:
    reason = obj.get("reason")
    if reason is None or reason == "":
        return None
    if not isinstance(reason, str) or len(reason) > REASON_MAX or text_problem(reason.strip()) is not None:
        detail = f'A "reason" is a text of at most {REASON_MAX} characters, or none.'
        raise ProtocolError(ErrorCode.INVALID_MODERATION, detail, ref)
    return reason.strip() or None


def _parse_token(obj: dict[str, object]) -> str | None:
    token = obj.get("token")
    if token is None:
        return None
    if not isinstance(token, str) or len(token) > TOKEN_MAX:
        raise ProtocolError(ErrorCode.INVALID_TOKEN, f'"token" must be a string of at most {TOKEN_MAX} characters.')
    return token or None


def _parse_name(obj: dict[str, object]) -> str:
    name = obj.get("name")
    if not isinstance(name, str):
        raise ProtocolError(ErrorCode.INVALID_NAME, "Pick a name: 1 to 32 characters.")
    name = name.strip()
    if not name or len(name) > NAME_MAX:
        raise ProtocolError(ErrorCode.INVALID_NAME, f"A name has 1 to {NAME_MAX} characters.")
    problem = name_problem(name)
    if problem is not None:
        raise ProtocolError(ErrorCode.INVALID_NAME, problem)
    return name


def _parse_say(obj: dict[str, object]) -> Say:
    ref = _parse_ref(obj)
    return Say(text=_parse_text(obj, ref), ref=ref)


def _parse_ref(obj: dict[str, object]) -> str | None:
    ref = obj.get("ref")
    if ref is not None and not (isinstance(ref, str) and len(ref) <= REF_MAX):
        raise ProtocolError(ErrorCode.INVALID_REF, f'"ref" must be a string of at most {REF_MAX} characters.')
    return ref


def _parse_target(obj: dict[str, object], ref: str | None) -> str:
    target = obj.get("id")
    if not isinstance(target, str) or parse_message_id(target) is None:
        raise ProtocolError(ErrorCode.INVALID_ID, '"id" must be the id of a message, as a string.', ref)
    return target


def _parse_text(obj: dict[str, object], ref: str | None) -> str:
    text = obj.get("text")
    if not isinstance(text, str):
        raise ProtocolError(ErrorCode.INVALID_TEXT, "A message needs some text.", ref)
    text = text.strip()
    if not text:
        raise ProtocolError(ErrorCode.INVALID_TEXT, "A message needs some text.", ref)
    if len(text) > TEXT_MAX:
        raise ProtocolError(ErrorCode.TOO_LONG, f"A message has at most {TEXT_MAX} characters.", ref)
    problem = text_problem(text)
    if problem is not None:
        raise ProtocolError(ErrorCode.INVALID_TEXT, problem, ref)
    return text


def _ref_if_valid(obj: dict[str, object]) -> str | None:
    ref = obj.get("ref")
    return ref if isinstance(ref, str) and len(ref) <= REF_MAX else None


# Server frames: the one place where each is built. A message or presence event is built once per replica, as it
# arrives from Redis, and reaches every recipient there as the same bytes.


def message_body(room: str, name: str, text: str, ref: str | None) -> bytes:
    """The fields of a message that the sender decides, as the tail of a JSON object: `"room":...}`.

    The broker puts `{"type":"message","id":...,"ts":...,` in front once it knows the id.
    """
    fields: dict[str, object] = {"room": room, "name": name, "text": text}
    if ref is not None:
        fields["ref"] = ref
    mentions = mentions_in(text)
    if mentions:
        fields["mentions"] = mentions
    return orjson.dumps(fields)[1:]


def change_body(room: str, name: str, change: Edit | Delete | React) -> bytes:
    """An edit, a deletion or a reaction as the tail of its log entry's JSON object, like `message_body`. A
    reaction's `count` is added by the broker, which alone knows it (it ends the object)."""
    fields: dict[str, object] = {"room": room, "name": name, "target": change.target}
    if isinstance(change, Edit):
        fields["text"] = change.text
        mentions = mentions_in(change.text)
        if mentions:
            fields["mentions"] = mentions
    elif isinstance(change, React):
        fields["emoji"] = change.emoji
        fields["on"] = change.on
    elif change.reason is not None:
        fields["reason"] = change.reason
    if change.ref is not None:
        fields["ref"] = change.ref
    return orjson.dumps(fields)[1:]


def id_time(message_id: str) -> str:
    """The time in a log entry's id (Redis's clock when it was stored), as every `ts` is written."""
    millis = int(message_id.partition("-")[0])
    seconds, millis = divmod(millis, 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


def entry_frame(kind: str, entry_id: str, body: bytes) -> bytes:
    """An object of a room's log (a message, or a change to one) from its id and stored body (`message_body`,
    `change_body`); its time is the id's. Written by hand: the body is already JSON, spliced in as it is."""
    return f'{{"type":"{kind}","id":"{entry_id}","ts":"{id_time(entry_id)}",'.encode() + body


def message_frame(message_id: str, body: bytes) -> bytes:
    return entry_frame("message", message_id, body)


@dataclass(frozen=True, slots=True)
class Changes:
    """What edits, a deletion and reactions made of a message, as the broker keeps it."""

    edit_id: str | None = None  # the latest edit's entry, and its body (`change_body`)
    edit_body: bytes | None = None
    deleted_id: str | None = None
    reactions: Sequence[tuple[str, Sequence[str]]] = ()  # each emoji, in the order first used, and who, in order
    moderated: bool = False  # the deletion was a moderator's, of someone else's message


def message_as_now(message_id: str, body: bytes, changes: Changes) -> bytes:
    """A stored message as its changes left it: edited text, a tombstone without text, its reactions."""
    fields: dict[str, object] = orjson.loads(b"{" + body)
    if changes.deleted_id is not None:
        for field in ("text", "mentions"):
            fields.pop(field, None)
        fields["deleted"] = id_time(changes.deleted_id)
        if changes.moderated:
            fields["moderated"] = True
        return message_frame(message_id, orjson.dumps(fields)[1:])
    if changes.edit_id is not None and changes.edit_body is not None:
        edit = orjson.loads(b"{" + changes.edit_body)
        fields["text"] = edit["text"]
        fields.pop("mentions", None)
        if "mentions" in edit:
            fields["mentions"] = edit["mentions"]
        fields["edited"] = id_time(changes.edit_id)
    if changes.reactions:
        fields["reactions"] = [
            {"emoji": emoji, "count": len(names), "names": list(names[:REACTION_NAMES_SHOWN])}
            for emoji, names in changes.reactions
        ]
    return message_frame(message_id, orjson.dumps(fields)[1:])


def typing_frame(room: str, names: Sequence[str], count: int) -> bytes:
    """Who is typing in a room now: a few of the names, most recent first, and how many."""
    return orjson.dumps({"type": "typing", "room": room, "names": list(names), "count": count})


def presence_frame(
    event: str, name: str, joined: Sequence[str], left: Sequence[str], online_count: int, *, truncated: bool
) -> bytes:
    """A room's presence change since its previous event: the names that came online and went (each list sorted and
    at most PRESENCE_LIST_MAX long; `truncated` when more changed than they hold), the last change as `event` and
    `name`, and how many names are online now."""
    frame: dict[str, object] = {
        "type": "presence",
        "event": event,
        "name": name,
        "joined": list(joined),
        "left": list(left),
        "online_count": online_count,
    }
    if truncated:
        frame["truncated"] = True
    return orjson.dumps(frame)


def welcome_frame(
    *,
    replica: str,
    room: str,
    name: str,
    history: Sequence[bytes],
    online: Sequence[str],
    online_count: int,
    resumed: bool,
    token: str | None,
    moderator: bool = False,
    muted_until: str | None = None,
    slow_seconds: int = 0,
) -> bytes:
    frame: dict[str, object] = {
        "type": "welcome",
        "replica": replica,
        "room": room,
        "name": name,
        # Stored messages are already JSON: spliced in as they are, never parsed and re-encoded.
        "history": [orjson.Fragment(message) for message in history],
        "online": list(online),
        "online_count": online_count,
        "resumed": resumed,
    }
    if token is not None:
        frame["token"] = token
    # The room's rules for this member, only when they apply: most welcomes have none.
    if moderator:
        frame["moderator"] = True
    if muted_until is not None:
        frame["muted_until"] = muted_until
    if slow_seconds:
        frame["slow_seconds"] = slow_seconds
    return orjson.dumps(frame)


def moderation_frame(
    action: str,
    *,
    room: str,
    name: str | None,
    seconds: int | None,
    until: str | None,
    by: str,
    reason: str | None,
    sockets: int | None = None,
) -> bytes:
    """A moderator's rule for a room (or the chat), as the room's members see it: `action` is "mute", "ban",
    "ban_chat", "slow" or "limits" (with `sockets`); `seconds` 0 lifts it; `until` None with seconds None is for
    good."""
    frame: dict[str, object] = {
        "type": "moderation",
        "action": action,
        "room": room,
        "name": name,
        "seconds": seconds,
        "until": until,
        "by": by,
        "reason": reason,
    }
    if sockets is not None:
        frame["sockets"] = sockets
    return orjson.dumps(frame)


def millis_time(millis: int) -> str:
    """Milliseconds since the epoch, written as every `ts` is."""
    return id_time(f"{millis}-0")


def released_frame(name: str) -> bytes:
    return orjson.dumps({"type": "released", "name": name})


def error_frame(error: ProtocolError, *, retry_after_ms: int | None = None) -> bytes:
    frame: dict[str, object] = {"type": "error", "code": error.code, "detail": error.detail, "ref": error.ref}
    if retry_after_ms is not None:
        frame["retry_after_ms"] = retry_after_ms
    return orjson.dumps(frame)
