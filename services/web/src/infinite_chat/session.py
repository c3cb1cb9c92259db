"""One client's conversation with this replica: join once (under a name it owns), then say, type, and edit, delete or
react to messages. A bad frame gets an error and the conversation goes on; only a broken socket, a restart or the
release of its name ends it."""

from __future__ import annotations

import contextlib
import logging
import time

from . import metrics, moderation
from .allowances import Allowances
from .broker import (
    FOREVER,
    Broker,
    BrokerUnavailable,
    ChangeRefused,
    Delivery,
    NotConfirmed,
    Online,
    QuotaRefusal,
    Refused,
    Rules,
)
from .config import Settings
from .connection import Connection
from .names import Claims, NameBanned, NameTaken, TooManyNames, fold
from .protocol import (
    CloseCode,
    Delete,
    Edit,
    ErrorCode,
    Join,
    Moderation,
    ProtocolError,
    React,
    Release,
    Say,
    Typing,
    change_body,
    error_frame,
    message_body,
    millis_time,
    parse_client_frame,
    parse_message_id,
    released_frame,
    welcome_frame,
)
from .ratelimit import TokenBucket
from .rooms import Member, Rooms
from .signin import Credentials, SignIn, SignInRefused
from .typists import TYPING_NOTICE_GAP

log = logging.getLogger(__name__)

# Joins and releases per connection: a few at once (a name taken, another tried), then one a second.
NAME_TRIES_PER_SECOND = 1.0
NAME_TRIES_BURST = 5
NO_CREDENTIALS = Credentials()


class Session:
    def __init__(
        self,
        connection: Connection,
        rooms: Rooms,
        broker: Broker,
        settings: Settings,
        *,
        address: str,
        allowances: Allowances,
        signin: SignIn,
        credentials: Credentials = NO_CREDENTIALS,
    ) -> None:
        self.connection = connection
        self.rooms = rooms
        self.broker = broker
        self.settings = settings
        # The client's address as addresses.py keys it: what its allowance in Redis is counted against.
        self.address = address
        self.allowances = allowances
        self.claims = Claims(broker)
        self.signin = signin
        self.credentials = credentials
        self.rate = TokenBucket(settings.rate_limit, settings.rate_burst)
        self.name_tries = TokenBucket(NAME_TRIES_PER_SECOND, NAME_TRIES_BURST)
        # Set by the join: this connection in its room.
        self.member: Member | None = None
        self.present = False
        # Whether this connection's first message would create its room (the log was empty at the join). Other
        # clients may create it meanwhile; then the address is charged a room it did not create, once.
        self.room_is_new = False
        self.typed_at = float("-inf")
        # Set by the join: a moderator's token, or a sign-in that says so.
        self.moderator = False

    async def handle(self, data: str | bytes) -> None:
        if self.connection.closing:
            return
        try:
            command = parse_client_frame(data)
            if isinstance(command, Say):
                await self._say(command)
            elif isinstance(command, Join):
                await self._join(command)
            elif isinstance(command, Typing):
                self._typing()
            elif isinstance(command, Release):
                await self._release(command)
            elif isinstance(command, Moderation):
                await self._moderate(command)
            else:
                await self._change(command)
        except ProtocolError as error:
            self._refuse(error)

    def _refuse(self, error: ProtocolError, *, retry_after_ms: int | None = None) -> None:
        metrics.MESSAGES_REFUSED.labels(error.code).inc()
        self.connection.reply(error_frame(error, retry_after_ms=retry_after_ms))

    async def _join(self, join: Join) -> None:
        if self.member is not None:
            raise ProtocolError(
                ErrorCode.ALREADY_JOINED, "You are already in a room; open another connection for another."
            )
        if not self._may_try_a_name():
            return
        connection = self.connection
        who = await self._who(join)
        if who is None:
            return
        name, token, moderator = who
        try:
            rules = await self.broker.rules(join.room, fold(name), name)
        except BrokerUnavailable:
            self._refuse(ProtocolError(ErrorCode.UNAVAILABLE, "The chat is unavailable for a moment; reconnecting."))
            connection.close(CloseCode.TRY_AGAIN, "storage unavailable")
            return
        if rules.banned_until is not None:
            self._refuse_banned("This name is banned from this room", rules.banned_until)
            return
        most = rules.sockets_per_name or self.settings.name_sockets
        if rules.sockets_open >= most:
            # Counted when the join looks, so joins at the same moment may pass it by a few.
            detail = f"This name has {most} sockets in this room already; close one first."
            raise ProtocolError(ErrorCode.TOO_MANY_SOCKETS, detail)
        self.moderator = moderator
        member = self.member = self.rooms.enter(join.room, connection, name)
        try:
            await self.rooms.hear(member)
            online = await self.broker.join(join.room, member.entry)
            self.present = True
            history, resumed = await self._history(join)
        except BrokerUnavailable:
            self.rooms.remove(connection)
            self._refuse(ProtocolError(ErrorCode.UNAVAILABLE, "The chat is unavailable for a moment; reconnecting."))
            connection.close(CloseCode.TRY_AGAIN, "storage unavailable")
            return
        joined_at = history[-1].id if history else (parse_message_id(join.since) if resumed and join.since else None)
        self.room_is_new = joined_at is None
        welcome = self._welcome(join, name, token, online, [d.frame for d in history], resumed, rules)
        self.rooms.welcome(member, welcome, joined_at)
        metrics.JOINS.inc()
        if resumed:
            metrics.RESUMES.inc()
        log.info(
            "joined",
            extra={"event": "join", "room": join.room, "connection": connection.id, "resumed": resumed},
        )

    async def _who(self, join: Join) -> tuple[str, str | None, bool] | None:
        """Who the join is from: the name as claimed (or as a sign-in gives it), the claim token for the client to
        keep (none when signed in), and whether a moderator; None when refused (the refusal is sent)."""
        try:
            signed_in = await self.signin.identify(
                token=join.token or self.credentials.token, alb_data=self.credentials.alb_data
            )
        except SignInRefused as refused:
            raise ProtocolError(refused.code, refused.detail) from None
        if signed_in is not None:
            moderator = signed_in.moderator
        elif join.moderator is not None:
            if not moderation.is_moderator_token(self.settings, join.moderator):
                raise ProtocolError(ErrorCode.INVALID_TOKEN, "That is not a moderator token of this chat.")
            moderator = True
        else:
            moderator = False
        try:
            if signed_in is None:
                name, token = await self.claims.claim(join.name, join.token, self.address)
            else:
                # The name the sign-in gives, owned by the person it signed in (by subject), so that someone else
                # whose sign-in gives the same name cannot speak as them; no token for the client to keep.
                subject = f"subject:{signed_in.subject}"
                name, _ = await self.claims.claim(signed_in.name, subject, self.address, issue=False)
                token = None
        except NameTaken:
            raise ProtocolError(
                ErrorCode.NAME_TAKEN,
                "That name is someone else's here (names are kept for whoever claimed them first). Pick another, "
                "or join with the name's token.",
            ) from None
        except NameBanned as banned:
            self._refuse_banned("This name is banned from the chat", banned.until)
            return None
        except TooManyNames as refused:
            detail = "Your address has claimed too many new names this hour. Use a name you have, or wait."
            self._refuse(ProtocolError(ErrorCode.TOO_MANY_NAMES, detail), retry_after_ms=refused.retry_after_ms)
            return None
        except BrokerUnavailable:
            self._refuse(ProtocolError(ErrorCode.UNAVAILABLE, "The chat is unavailable for a moment; reconnecting."))
            self.connection.close(CloseCode.TRY_AGAIN, "storage unavailable")
            return None
        return name, token, moderator

    async def _history(self, join: Join) -> tuple[list[Delivery], bool]:
        """What was missed since `since`, when all of it is within the resume bound; else the recent history."""
        since = parse_message_id(join.since) if join.since is not None else None
        if since is not None:
            settings = self.settings
            missed = await self.broker.read_after(
                join.room, since, max_messages=settings.resume_max_messages, max_bytes=settings.resume_max_bytes
            )
            if missed.found and missed.complete:
                return missed.deliveries, True
        recent = await self.broker.recent(join.room, self.settings.history_size)
        # The newest that fit the bound in bytes: a history of messages with many reactions can be large.
        size, bound, start = 0, self.settings.welcome_history_bytes, len(recent)
        while start > 0 and size + len(recent[start - 1].frame) <= bound:
            start -= 1
            size += len(recent[start].frame)
        return recent[start:], False

    def _welcome(
        self,
        join: Join,
        name: str,
        token: str | None,
        online: Online,
        history: list[bytes],
        resumed: bool,
        rules: Rules,
    ) -> bytes:
        return welcome_frame(
            replica=self.settings.replica_name,
            room=join.room,
            name=name,
            history=history,
            online=online.names,
            online_count=online.count,
            resumed=resumed,
            token=token,
            moderator=self.moderator,
            muted_until=None if rules.muted_until is None else millis_time(rules.muted_until),
            slow_seconds=rules.slow_seconds,
        )

    def _refuse_banned(self, what: str, until: int) -> None:
        wait = None if until == FOREVER else max(1, until - int(time.time() * 1000))
        when = "for good" if wait is None else f"until {millis_time(until)}"
        self._refuse(ProtocolError(ErrorCode.BANNED, f"{what} {when}."), retry_after_ms=wait)

    def _refuse_held_back(self, refused: Refused, ref: str | None) -> None:
        """A say or change that the room's rules hold back (muted, slow mode)."""
        wait = moderation.wait_text(refused.retry_after_ms)
        if refused.code is ErrorCode.MUTED:
            detail = f"A moderator muted you in this room, {wait}."
        else:
            detail = f"Slow mode: you may send your next message here {wait}."
        retry = None if refused.retry_after_ms == FOREVER else max(1, refused.retry_after_ms)
        self._refuse(ProtocolError(refused.code, detail, ref), retry_after_ms=retry)

    async def _moderate(self, action: Moderation) -> None:
        member = self._joined(action.ref)
        if not self.moderator:
            raise ProtocolError(ErrorCode.NOT_MODERATOR, "Only moderators can do that.", action.ref)
        if not self._within_rate(action.ref):
            return
        try:
            await moderation.act(self.broker, member.room, member.name, action)
        except BrokerUnavailable:
            detail = "Not done: the chat cannot reach its storage. Try again."
            raise ProtocolError(ErrorCode.UNAVAILABLE, detail, action.ref) from None

    def _may_try_a_name(self) -> bool:
        """A join or a release costs Redis a call or three, and a taken name may be tried again and again: a
        connection gets a few tries, then one a second."""
        wait = self.name_tries.take()
        if wait > 0:
            self._refuse(
                ProtocolError(ErrorCode.RATE_LIMITED, "Slow down: too many tries of a name."),
                retry_after_ms=max(1, round(wait * 1000)),
            )
            return False
        return True

    async def _release(self, release: Release) -> None:
        if not self._may_try_a_name():
            return
        try:
            released = await self.claims.release(release.name, release.token)
        except BrokerUnavailable:
            raise ProtocolError(
                ErrorCode.UNAVAILABLE, "Not released: the chat cannot reach its storage. Try again."
            ) from None
        if not released:
            raise ProtocolError(ErrorCode.NAME_TAKEN, "That is not the token of that name: it stays its owner's.")
        self.connection.reply(released_frame(release.name))
        member = self.member
        if member is not None and fold(member.name) == fold(release.name):
            # It is nobody's now, so this socket may not go on speaking under it.
            self.connection.close(CloseCode.NORMAL, "name released")

    def _joined(self, ref: str | None) -> Member:
        if self.member is None:
            raise ProtocolError(ErrorCode.NOT_JOINED, 'Join a room first: {"type": "join", "name": ...}.', ref)
        return self.member

    def _within_rate(self, ref: str | None) -> bool:
        """Takes one from the connection's token bucket (messages and changes share it); refuses when it is empty."""
        wait = self.rate.take()
        if wait > 0:
            self._refuse(
                ProtocolError(ErrorCode.RATE_LIMITED, "Slow down: you are sending messages too fast.", ref),
                retry_after_ms=max(1, round(wait * 1000)),
            )
            return False
        return True

    def _typing(self) -> None:
        member = self._joined(None)
        now = time.monotonic()
        if now - self.typed_at < TYPING_NOTICE_GAP:
            return  # more often than clients are asked to: ignored, not an error
        self.typed_at = now
        self.rooms.typists.typed(member.room, member.name)

    async def _change(self, change: Edit | Delete | React) -> None:
        member = self._joined(change.ref)
        if not self._within_rate(change.ref):
            return
        body = change_body(member.room, member.name, change)
        emoji, on = (change.emoji, change.on) if isinstance(change, React) else ("", True)
        try:
            refusal = await self.allowances.take(self.address, len(body), new_room=False)
            if refusal is not None:
                self._refuse(_quota_error(refusal, change.ref), retry_after_ms=refusal.retry_after_ms)
                return
            await self.broker.change(
                member.room,
                change.kind,
                change.target,
                body,
                name=member.name,
                emoji=emoji,
                on=on,
                folded=member.folded,
                moderator=self.moderator,
            )
            if self.moderator and isinstance(change, Delete):
                await moderation.audit_delete(self.broker, member.room, member.name, change)
        except Refused as refused:
            self._refuse_held_back(refused, change.ref)
            return
        except ChangeRefused as refused:
            raise ProtocolError(refused.code, _CHANGE_REFUSED[refused.code], change.ref) from None
        except NotConfirmed:
            detail = "Not confirmed: the chat could not make sure your change is kept. Send it again."
            raise ProtocolError(ErrorCode.UNAVAILABLE, detail, change.ref) from None
        except BrokerUnavailable:
            detail = "Not done: the chat cannot store changes right now. Try again."
            raise ProtocolError(ErrorCode.UNAVAILABLE, detail, change.ref) from None
        metrics.CHANGES_ACCEPTED.labels(change.kind.value).inc()

    async def _say(self, say: Say) -> None:
        metrics.MESSAGES_RECEIVED.inc()
        member = self._joined(say.ref)
        if not self._within_rate(say.ref):
            return
        self.rooms.typists.said(member.room, member.name)
        body = message_body(member.room, member.name, say.text, say.ref)
        try:
            refusal = await self.allowances.take(self.address, len(body), new_room=self.room_is_new)
            if refusal is None and self.room_is_new and not self.moderator:
                refusal = await self.broker.charge_room_of_name(member.folded)
                if refusal is not None:
                    detail = "Not sent: your name has started too many new rooms this hour. Use an existing room."
                    self._refuse(ProtocolError(refusal.code, detail, say.ref), retry_after_ms=refusal.retry_after_ms)
                    return
            if refusal is not None:
                self._refuse(_quota_error(refusal, say.ref), retry_after_ms=refusal.retry_after_ms)
                return
            appended = await self.broker.append(
                member.room, body, name=member.name, ref=say.ref, folded=member.folded, moderator=self.moderator
            )
        except Refused as refused:
            self._refuse_held_back(refused, say.ref)
            return
        except NotConfirmed:
            # Stored, but a failover now could lose it: not shown to anyone yet, and the sender may not count on it.
            detail = "Not confirmed: the chat could not make sure your message is kept. Send it again (same ref)."
            raise ProtocolError(ErrorCode.UNAVAILABLE, detail, say.ref) from None
        except BrokerUnavailable:
            detail = "Not sent: the chat cannot store messages right now. Try again."
            raise ProtocolError(ErrorCode.UNAVAILABLE, detail, say.ref) from None
        self.room_is_new = False
        if appended.retried:
            # Stored once, by an earlier try. If this connection's stream is past it (it was in the welcome, or fanned
            # out to it), it gets it again as the echo it waits for; otherwise it is on its way, as to everyone else.
            if appended.repeat is not None and self.rooms.has_passed(member, appended.repeat):
                self.connection.push(appended.repeat)
            return
        metrics.MESSAGES_ACCEPTED.inc()

    async def end(self) -> None:
        """The socket is gone: leave the room, and say goodbye in presence (best effort; the TTL is the backstop)."""
        self.rooms.remove(self.connection)
        member = self.member
        if self.present and member is not None:
            self.present = False
            with contextlib.suppress(BrokerUnavailable):
                await self.broker.leave(member.room, member.entry)


_CHANGE_REFUSED = {
    ErrorCode.UNKNOWN_MESSAGE: "There is no such message in this room (or it is too old to be kept).",
    ErrorCode.NOT_YOURS: "You can edit and delete only your own messages.",
    ErrorCode.EDIT_WINDOW_CLOSED: "That message is too old to edit now.",
    ErrorCode.MESSAGE_DELETED: "That message was deleted.",
    ErrorCode.NO_CHANGE: "Nothing to change: the message is like that already.",
    ErrorCode.TOO_MANY_REACTIONS: "That message has as many reactions as it can hold.",
}


def _quota_error(refusal: QuotaRefusal, ref: str | None) -> ProtocolError:
    if refusal.code is ErrorCode.TOO_MANY_ROOMS:
        detail = "Not sent: your address has started too many new rooms this hour. Use an existing room, or wait."
    else:
        detail = "Not sent: your address has sent too much this hour. Wait a little."
    return ProtocolError(refusal.code, detail, ref)
