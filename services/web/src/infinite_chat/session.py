"""One client's conversation with this replica: join once, then say. A bad frame gets an error and the
conversation goes on; only a broken socket or a restart ends it."""

from __future__ import annotations

import contextlib
import logging

from . import metrics
from .allowances import Allowances
from .broker import Broker, BrokerUnavailable, Delivery, Online, QuotaRefusal, presence_entry
from .config import Settings
from .connection import CLOSE_TRY_AGAIN, Connection, State
from .protocol import (
    Join,
    ProtocolError,
    Say,
    error_frame,
    message_body,
    parse_client_frame,
    parse_message_id,
    welcome_frame,
)
from .ratelimit import TokenBucket
from .rooms import Rooms

log = logging.getLogger(__name__)


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
    ) -> None:
        self.connection = connection
        self.rooms = rooms
        self.broker = broker
        self.settings = settings
        # The client's address as addresses.py keys it: what its allowance in Redis is counted against.
        self.address = address
        self.allowances = allowances
        self.rate = TokenBucket(settings.rate_limit, settings.rate_burst)
        self.present = False
        # Whether this connection's first message would create its room (the log was empty at the join). Other
        # clients may create it meanwhile; then the address is charged a room it did not create, once.
        self.room_is_new = False

    @property
    def joined(self) -> bool:
        return self.connection.room is not None

    async def handle(self, data: str | bytes) -> None:
        if self.connection.state is State.CLOSING:
            return
        try:
            command = parse_client_frame(data)
            if isinstance(command, Say):
                await self._say(command)
            else:
                await self._join(command)
        except ProtocolError as error:
            self._refuse(error)

    def _refuse(self, error: ProtocolError, *, retry_after_ms: int | None = None) -> None:
        metrics.MESSAGES_REFUSED.labels(error.code).inc()
        self.connection.reply(error_frame(error, retry_after_ms=retry_after_ms))

    async def _join(self, join: Join) -> None:
        if self.joined:
            raise ProtocolError("already_joined", "You are already in a room; open another connection for another.")
        connection = self.connection
        self.rooms.enter(join.room, connection, join.name)
        entry = presence_entry(connection.id, join.name)
        try:
            online = await self.broker.join(join.room, entry)
            self.present = True
            history, resumed = await self._history(join)
        except BrokerUnavailable:
            self.rooms.remove(connection)
            self._refuse(ProtocolError("unavailable", "The chat is unavailable for a moment; reconnecting."))
            connection.close(CLOSE_TRY_AGAIN, "storage unavailable")
            return
        joined_at = history[-1].id if history else (parse_message_id(join.since) if resumed and join.since else None)
        self.room_is_new = joined_at is None
        connection.go_live(self._welcome(join, online, [d.frame for d in history], resumed), joined_at)
        metrics.JOINS.inc()
        if resumed:
            metrics.RESUMES.inc()
        log.info(
            "joined",
            extra={"event": "join", "room": join.room, "connection": connection.id, "resumed": resumed},
        )

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
        return await self.broker.recent(join.room, self.settings.history_size), False

    def _welcome(self, join: Join, online: Online, history: list[bytes], resumed: bool) -> bytes:
        return welcome_frame(
            replica=self.settings.replica_name,
            room=join.room,
            name=join.name,
            history=history,
            online=online.names,
            online_count=online.count,
            resumed=resumed,
        )

    async def _say(self, say: Say) -> None:
        metrics.MESSAGES_RECEIVED.inc()
        connection = self.connection
        if connection.room is None or connection.name is None:
            raise ProtocolError("not_joined", 'Join a room first: {"type": "join", "name": ...}.', say.ref)
        wait = self.rate.take()
        if wait > 0:
            self._refuse(
                ProtocolError("rate_limited", "Slow down: you are sending messages too fast.", say.ref),
                retry_after_ms=max(1, round(wait * 1000)),
            )
            return
        body = message_body(connection.room, connection.name, say.text, say.ref)
        try:
            refusal = await self.allowances.take(self.address, len(body), new_room=self.room_is_new)
            if refusal is not None:
                self._refuse(_quota_error(refusal, say.ref), retry_after_ms=refusal.retry_after_ms)
                return
            await self.broker.append(connection.room, body)
        except BrokerUnavailable:
            detail = "Not sent: the chat cannot store messages right now. Try again."
            raise ProtocolError("unavailable", detail, say.ref) from None
        self.room_is_new = False
        metrics.MESSAGES_ACCEPTED.inc()

    async def end(self) -> None:
        """The socket is gone: leave the room, and say goodbye in presence (best effort; the TTL is the backstop)."""
        connection = self.connection
        self.rooms.remove(connection)
        if self.present and connection.room is not None and connection.name is not None:
            self.present = False
            with contextlib.suppress(BrokerUnavailable):
                await self.broker.leave(connection.room, presence_entry(connection.id, connection.name))


def _quota_error(refusal: QuotaRefusal, ref: str | None) -> ProtocolError:
    if refusal.code == "too_many_rooms":
        detail = "Not sent: your address has started too many new rooms this hour. Use an existing room, or wait."
    else:
        detail = "Not sent: your address has sent too much this hour. Wait a little."
    return ProtocolError(refusal.code, detail, ref)
