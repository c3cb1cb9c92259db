"""One generator process: its share of the clients, their sends, and what each of them receives.

The parent (runner.py) drives it step by step over a pipe. The receive path is the hot one: a frame is never
JSON-parsed when it carries the step's marker; the marker's fields are read from the bytes (as fanout.mjs does).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import heapq
import math
import os
import random
import resource
from array import array
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from time import monotonic_ns
from typing import Any
from urllib.parse import urlsplit

import orjson
import uvloop
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.frames import Frame, Opcode
from websockets.protocol import Event
from websockets.typing import Origin

from chatbench.accounting import ClientLog, Message
from chatbench.storm import WELCOME_TIMEOUT_S, Outage, Traffic, reconnect_delay_s, tally

PAD = " the quick brown fox jumps over the lazy dog" * 60
ERROR_TYPE = b'"type":"error"'
TYPING_TYPE = b'"type":"typing"'  # never inside a text, where a quote is escaped
TYPING_LINE = b'{"type":"typing"'  # how the server starts a typing object (its type first, as every object)
TYPING_NOTICE = '{"type":"typing"}'
ID_FIELD = b'"id":"'  # a message's id; never inside a text, where a quote is escaped
SAMPLES = 5  # error and disconnect samples kept, per process
FRAME_OPCODES = (Opcode.TEXT, Opcode.BINARY, Opcode.CONT)


# ---------------------------------------------------------------- what the parent and a worker say


@dataclass(frozen=True, slots=True)
class Setup:
    proc: int
    url: str
    origin: str
    clients: list[tuple[int, int]]  # (client index, room index), this process's share
    room_prefix: str
    name_prefix: str
    connect_concurrency: int
    connect_timeout_s: float
    size: int
    track_ids: bool = False  # remember each client's newest message id, for `since` (the storm scenario)


@dataclass(frozen=True, slots=True)
class Connect:
    pass


@dataclass(slots=True)
class Connected:
    attempted: int = 0
    connected: int = 0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    connect_ms: list[float] = field(default_factory=list)
    replicas: dict[int, str] = field(default_factory=dict)  # client index -> the replica its welcome named
    resumed: dict[int, bool] = field(default_factory=dict)  # client index -> its welcome's `resumed`


@dataclass(frozen=True, slots=True)
class Settle:
    max_s: float
    quiet_ms: float = 300


@dataclass(frozen=True, slots=True)
class Settled:
    quiet: bool
    late: int  # deliveries of the last closed step that arrived after it closed
    late_max_ms: float


@dataclass(frozen=True, slots=True)
class StartStep:
    tag: str
    slots: list[tuple[int, int]]  # (global slot number, client index): one poisson/uniform sender each
    total_slots: int
    rate_per_sender: float
    arrival: str  # poisson, uniform or aligned
    seed: int
    t0_ns: int
    measure_from_ns: int
    measure_to_ns: int
    typing_s: float = 0  # > 0: every connected client sends a typing notice this often, from t0 to measure_to


@dataclass(frozen=True, slots=True)
class Poll:
    pass


@dataclass(frozen=True, slots=True)
class Progress:
    sending_done: bool
    sent_by_room: dict[int, int]  # measured messages sent, per room
    open_by_room: dict[int, int]  # this process's clients open now, per room
    open_clients: list[tuple[int, int]]  # (client index, room) of those open now
    received: int  # measured deliveries so far, duplicates included


@dataclass(frozen=True, slots=True)
class Close:
    pass


@dataclass(slots=True)
class TypingCount:
    """Typing notices sent and typing objects received by this process's clients in a step's measured window."""

    sent: int = 0
    objects: int = 0
    frames: int = 0  # frames holding at least one typing object
    bytes: int = 0  # the typing objects' own bytes (their lines of a frame)


@dataclass(slots=True)
class StepData:
    proc: int
    messages: list[Message]
    clients: list[ClientLog]  # clients open when the step began
    lag_ns: array[int]  # how late each measured message was sent against its schedule
    errors: dict[str, int]  # error frames by code during the step
    send_failures: int  # sends on a socket that had closed
    typing: TypingCount = field(default_factory=TypingCount)


@dataclass(frozen=True, slots=True)
class Report:
    pass


@dataclass(slots=True)
class Frames:
    """Every frame received during the run, by kind (fanout.mjs `frames`)."""

    total: int = 0
    message: int = 0  # deliveries carrying the current step's marker
    foreign: int = 0  # `message` objects without it (an earlier step's, or someone else's)
    malformed: int = 0
    by_type: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    error_samples: list[dict[str, Any]] = field(default_factory=list)


@dataclass(slots=True)
class Finished:
    frames: Frames
    disconnects: int
    disconnect_samples: list[dict[str, int | None]]


@dataclass(frozen=True, slots=True)
class StormArm:
    """From now on a client whose socket closes reconnects by itself (the web client's backoff, `since` = the
    newest message id it saw) until `deadline_ns`, and what every client receives is counted by object type."""

    deadline_ns: int
    seed: int


@dataclass(frozen=True, slots=True)
class StormPoll:
    pass


@dataclass(frozen=True, slots=True)
class StormProgress:
    live: int  # clients welcomed and open now
    clients: int  # clients that were live when the storm was armed (one that never connected is not waited for)
    reconnecting: int  # clients waiting for or trying a reconnect
    last_presence_ns: int  # when the last frame holding a presence event arrived (0: none since armed)
    last_welcome_ns: int  # when the last reconnect was welcomed (0: none)
    frames: int
    bytes: int
    presence: int  # presence objects received since armed


@dataclass(frozen=True, slots=True)
class StormCount:
    pass


@dataclass(slots=True)
class StormTraffic:
    """What this process's clients received between StormArm and StormCount."""

    traffic: Traffic
    per_client: list[tuple[int, int, int]]  # (client index, frames, bytes)


@dataclass(frozen=True, slots=True)
class StormDisarm:
    pass


@dataclass(slots=True)
class StormOutages:
    outages: list[Outage]
    errors: dict[str, int]  # failed reconnect attempts, by kind (HTTP 503, timeout, ...)
    error_samples: list[str]


@dataclass(frozen=True, slots=True)
class Stop:
    pass


@dataclass(frozen=True, slots=True)
class Failed:
    error: str


# ---------------------------------------------------------------- the process


class FrameCallbackConnection(ClientConnection):
    """A connection that hands each data frame to `on_frame` as soon as it is parsed, instead of queueing it.

    `recv()` costs a queue, a future and a task switch per frame, on the path every delivery takes; here there is
    nothing between the parser and the counting. (Against `recv()` the gain was within this machine's noise, see
    docs/performance.md; the path is shorter and no slower.) The server never fragments a frame; a fragment would
    reach `on_frame` as it is and count as malformed.
    """

    on_frame: Callable[[bytes], None] | None = None

    def process_event(self, event: Event) -> None:
        on_frame = self.on_frame
        if on_frame is not None and isinstance(event, Frame) and event.opcode in FRAME_OPCODES:
            on_frame(bytes(event.data))
            return
        super().process_event(event)


class Client:
    __slots__ = (
        "closed_ns",
        "in_step",
        "index",
        "keys",
        "last_id",
        "latencies",
        "name",
        "ready",
        "room",
        "rx_bytes",
        "rx_frames",
        "token",
        "ws",
    )

    def __init__(self, index: int, room: int, name: str) -> None:
        self.index = index
        self.room = room
        self.name = name
        self.token: str | None = None
        self.ws: FrameCallbackConnection | None = None
        self.ready = False
        self.in_step = False
        self.closed_ns: int | None = None
        self.keys: array[int] = array("q")
        self.latencies: array[int] = array("q")
        self.last_id: bytes | None = None  # the newest message id it saw (with Setup.track_ids)
        self.rx_frames = 0  # what it received while a storm is counted
        self.rx_bytes = 0


class Step:
    __slots__ = (
        "closed",
        "errors",
        "lag_ns",
        "late",
        "late_max_ns",
        "mark",
        "measure_from",
        "measure_to",
        "messages",
        "received",
        "send_failures",
        "sending",
        "sent_by_room",
        "tag",
        "typing",
        "typing_task",
    )

    def __init__(self, tag: str, measure_from: int, measure_to: int) -> None:
        self.tag = tag
        self.mark = f"~{tag}:".encode()
        self.measure_from = measure_from
        self.measure_to = measure_to
        self.messages: list[Message] = []
        self.sent_by_room: dict[int, int] = {}
        self.lag_ns: array[int] = array("q")
        self.received = 0
        self.closed = False
        self.late = 0
        self.late_max_ns = 0
        self.errors: dict[str, int] = {}
        self.send_failures = 0
        self.sending: asyncio.Task[None] | None = None
        self.typing = TypingCount()
        self.typing_task: asyncio.Task[None] | None = None


class Worker:
    def __init__(self, conn: Connection, setup: Setup) -> None:
        self.conn = conn
        self.setup = setup
        self.proc = setup.proc
        self.clients = [Client(i, r, f"{setup.name_prefix}{i}") for i, r in setup.clients]
        self.by_index = {c.index: c for c in self.clients}
        self.frames = Frames()
        self.step: Step | None = None
        self.stopping = False
        self.disconnects = 0
        self.disconnect_samples: list[dict[str, int | None]] = []
        self.tasks: set[asyncio.Task[None]] = set()
        self.track_ids = setup.track_ids
        # the storm: reconnecting closed clients, counting what every client receives
        self.storm: StormArm | None = None
        self.storm_members = 0
        self.counting = False
        self.traffic = Traffic()
        self.last_presence_ns = 0
        self.last_welcome_ns = 0
        self.outages: list[Outage] = []
        self.reconnect_errors: dict[str, int] = {}
        self.reconnect_samples: list[str] = []
        self.reconnects: set[asyncio.Task[None]] = set()
        self.rng = random.Random(setup.proc)

    # ---- command loop

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        with ThreadPoolExecutor(1) as reader:
            while True:
                command = await loop.run_in_executor(reader, self.conn.recv)
                try:
                    reply = await self.handle(command)
                except Exception as error:  # the parent must hear about it, not wait forever
                    reply = Failed(f"{type(error).__name__}: {error}")
                self.conn.send(reply)
                if isinstance(command, Stop):
                    return

    async def handle(self, command: object) -> object:
        match command:
            case Connect():
                return await self.connect_all()
            case Settle(max_s=max_s, quiet_ms=quiet_ms):
                return await self.settle(max_s, quiet_ms)
            case StartStep():
                self.start_step(command)
                return None
            case Poll():
                return self.progress()
            case Close():
                return await self.close_step()
            case Report():
                return Finished(self.frames, self.disconnects, self.disconnect_samples)
            case StormArm():
                self.arm(command)
                return None
            case StormPoll():
                return self.storm_progress()
            case StormCount():
                self.counting = False
                return StormTraffic(self.traffic, [(c.index, c.rx_frames, c.rx_bytes) for c in self.clients])
            case StormDisarm():
                return await self.disarm()
            case Stop():
                await self.close_all()
                return None
        raise ValueError(f"unknown command {command!r}")

    # ---- connecting

    async def connect_all(self) -> Connected:
        report = Connected()
        gate = asyncio.Semaphore(max(1, self.setup.connect_concurrency))

        async def one(client: Client) -> None:
            async with gate:
                await self.connect_one(client, report)

        await asyncio.gather(*(one(c) for c in self.clients))
        return report

    async def connect_one(self, client: Client, report: Connected) -> None:
        report.attempted += 1
        started = monotonic_ns()
        try:
            ws = await self.open_joined(client, report, since=None, timeout_s=self.setup.connect_timeout_s)
        except Exception as error:
            report.errors += 1
            if len(report.error_samples) < SAMPLES:
                report.error_samples.append(f"{self.setup.url} {client.name}: {type(error).__name__}: {error}")
            return
        self.adopt(client, ws)
        report.connected += 1
        report.connect_ms.append((monotonic_ns() - started) / 1e6)

    async def open_joined(
        self, client: Client, report: Connected, since: bytes | None, timeout_s: float
    ) -> FrameCallbackConnection:
        """Opens a socket and joins the client's room (with `since` when given); returns the socket once the
        welcome arrived within `timeout_s`, or raises why not (the socket aborted)."""
        setup = self.setup
        ws: FrameCallbackConnection | None = None
        join = {"type": "join", "name": client.name, "room": f"{setup.room_prefix}-{client.room}"}
        if since:
            join["since"] = since.decode()
        if client.token:
            join["token"] = client.token  # the name's claim, from its first welcome: a reconnect is the same person
        try:
            async with asyncio.timeout(timeout_s):
                opened = await connect(
                    setup.url,
                    origin=Origin(setup.origin),
                    compression=None,
                    proxy=None,
                    open_timeout=None,
                    ping_interval=None,  # the server pings; the generator's own pings would only add frames
                    close_timeout=2,
                    max_size=2**24,
                    user_agent_header="chatbench",
                    create_connection=FrameCallbackConnection,
                )
                assert isinstance(opened, FrameCallbackConnection)
                ws = opened
                answer: asyncio.Future[str] = asyncio.get_running_loop().create_future()
                ws.on_frame = functools.partial(self.handshake_frame, client, ws, report, answer)
                await ws.send(orjson.dumps(join).decode())
                closed = asyncio.ensure_future(ws.wait_closed())
                try:
                    await asyncio.wait((answer, closed), return_when=asyncio.FIRST_COMPLETED)
                finally:
                    closed.cancel()
                if not answer.done():
                    raise ConnectionError(f"closed before the welcome (code {ws.close_code})")
            if verdict := answer.result():
                raise ConnectionError(verdict)
        except BaseException:  # cancelled too: a socket half-joined is not left open
            if ws is not None:
                ws.transport.abort()
            raise
        return ws

    def adopt(self, client: Client, ws: FrameCallbackConnection) -> None:
        """A welcomed socket becomes the client's; its end is watched."""
        client.ws = ws
        client.ready = True
        task = asyncio.get_running_loop().create_task(self.watch(client, ws))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def handshake_frame(
        self,
        client: Client,
        ws: FrameCallbackConnection,
        report: Connected,
        answer: asyncio.Future[str],
        data: bytes,
    ) -> None:
        """Frames before the welcome: answers "" once welcomed (or why the join failed). A welcome during a step
        (a reconnect) brings in its history what the client missed: those deliveries count like live ones."""
        now = monotonic_ns()
        if self.counting:
            self.count(client, data, now)
        self.frames.total += 1
        for obj in self.objects(data):
            kind = str(obj.get("type")) if isinstance(obj, dict) else "non_object"
            self.frames.by_type[kind] = self.frames.by_type.get(kind, 0) + 1
            if kind == "welcome" and isinstance(obj, dict):
                report.replicas[client.index] = str(obj.get("replica", ""))
                report.resumed[client.index] = obj.get("resumed") is True
                token = obj.get("token")
                if isinstance(token, str):
                    client.token = token
                if self.track_ids:
                    self.note_id(client, data)
                step = self.step
                if step is not None and client.in_step:
                    at = data.find(step.mark)
                    if at >= 0:
                        self.deliveries(client, step, data, at, now)
                # From the next frame on (even one in the same read), deliveries are counted.
                ws.on_frame = functools.partial(self.on_frame, client)
                if not answer.done():
                    answer.set_result("")
                return
            if kind == "error" and isinstance(obj, dict) and not answer.done():
                answer.set_result(f"error {obj.get('code')}: {obj.get('detail', '')}")

    # ---- receiving

    async def watch(self, client: Client, ws: FrameCallbackConnection) -> None:
        """Frames arrive through `on_frame`; this only notices the socket's end (and, in a storm, reconnects:
        the client then stays one of the step's members, expected to get every message)."""
        await ws.wait_closed()
        if client.ready and client.ws is ws:
            client.ready = False
            now = monotonic_ns()
            if not self.stopping:
                self.disconnects += 1
                if len(self.disconnect_samples) < SAMPLES:
                    self.disconnect_samples.append({"client": client.index, "code": ws.close_code})
            if self.storm is not None and not self.stopping:
                task = asyncio.get_running_loop().create_task(self.reconnect(client, ws.close_code, now))
                self.reconnects.add(task)
                task.add_done_callback(self.reconnects.discard)
            else:
                client.closed_ns = now

    def on_frame(self, client: Client, data: bytes) -> None:
        """Called by the connection for each data frame as it is parsed (the hot path)."""
        now = monotonic_ns()
        if self.counting:
            self.count(client, data, now)
        if self.track_ids:
            self.note_id(client, data)
        self.frames.total += 1
        step = self.step
        # Before the first step there is no marker: an empty one would match everywhere (the fanout.mjs bug).
        at = data.find(step.mark) if step is not None else -1
        if TYPING_TYPE in data:  # typing objects may share a frame with deliveries, as errors may
            self.typing_received(step, data, now, parsed=at < 0 or step is None)
        if at < 0 or step is None:
            self.other_frame(client, data)
            return
        self.deliveries(client, step, data, at, now)
        if ERROR_TYPE in data:  # an error reply may share a frame with deliveries
            for obj in self.objects(data):
                if isinstance(obj, dict) and obj.get("type") == "error":
                    self.other_object(client, obj)

    def deliveries(self, client: Client, step: Step, data: bytes, at: int, now: int) -> None:
        """Records every delivery of the step's messages in a frame, from the first marker at `at` on."""
        frames = self.frames
        mark = step.mark
        skip = len(mark)
        low, high = step.measure_from, step.measure_to
        keys, latencies = client.keys, client.latencies
        while at >= 0:
            start = at + skip
            end = data.find(b"~", start)
            if end < 0:
                frames.malformed += 1
                break
            fields = data[start:end].split(b":")
            at = data.find(mark, end)
            try:
                proc, idx, sent = int(fields[0]), int(fields[1]), int(fields[2])
            except (ValueError, IndexError):
                frames.malformed += 1
                continue
            frames.message += 1
            if sent < low or sent >= high:
                continue  # sent during the warm-up: not counted
            if step.closed:
                step.late += 1
                step.late_max_ns = max(step.late_max_ns, now - sent)
                continue
            step.received += 1
            keys.append(proc << 32 | idx)
            latencies.append(now - sent)

    def typing_received(self, step: Step | None, data: bytes, now: int, parsed: bool) -> None:
        """Counts a frame's typing objects: by type over the run (a frame without the step's marker has its objects
        counted by type when it is parsed), and with their bytes when they arrive in the step's measured window."""
        objects, size = typing_objects(data)
        if not parsed:
            self.frames.by_type["typing"] = self.frames.by_type.get("typing", 0) + objects
        if step is not None and not step.closed and step.measure_from <= now < step.measure_to and objects:
            step.typing.objects += objects
            step.typing.frames += 1
            step.typing.bytes += size

    @staticmethod
    def note_id(client: Client, data: bytes) -> None:
        """The newest message id in a frame (the last one: a frame and a welcome's history are oldest first)."""
        at = data.rfind(ID_FIELD)
        if at >= 0:
            start = at + len(ID_FIELD)
            end = data.find(b'"', start)
            if end > start:
                client.last_id = data[start:end]

    def count(self, client: Client, data: bytes, now: int) -> None:
        client.rx_frames += 1
        client.rx_bytes += len(data)
        if "presence" in tally(self.traffic, data):
            self.last_presence_ns = now

    @staticmethod
    def objects(data: bytes) -> list[object]:
        """A server frame holds one or more JSON objects, one per line."""
        out: list[object] = []
        for line in data.split(b"\n"):
            if line.strip():
                try:
                    out.append(orjson.loads(line))
                except orjson.JSONDecodeError:
                    out.append(None)
        return out

    def other_frame(self, client: Client, data: bytes) -> None:
        for obj in self.objects(data):
            self.other_object(client, obj)

    def other_object(self, client: Client, obj: object) -> None:
        frames = self.frames
        if obj is None:
            frames.malformed += 1
            return
        kind = str(obj.get("type")) if isinstance(obj, dict) else "non_object"
        frames.by_type[kind] = frames.by_type.get(kind, 0) + 1
        if kind == "message":
            frames.foreign += 1
        elif kind == "error" and isinstance(obj, dict):
            code = str(obj.get("code"))
            frames.errors[code] = frames.errors.get(code, 0) + 1
            if self.step is not None and not self.step.closed:
                self.step.errors[code] = self.step.errors.get(code, 0) + 1
            if len(frames.error_samples) < SAMPLES:
                frames.error_samples.append({"client": client.index, **obj})

    # ---- settling

    async def settle(self, max_s: float, quiet_ms: float) -> Settled:
        """Waits until no frame arrived for `quiet_ms` (at most `max_s`), so a step does not inherit a backlog."""
        deadline = monotonic_ns() + int(max_s * 1e9)
        last, quiet_since = self.frames.total, monotonic_ns()
        quiet = False
        while monotonic_ns() < deadline:
            await asyncio.sleep(0.05)
            if self.frames.total != last:
                last, quiet_since = self.frames.total, monotonic_ns()
            elif monotonic_ns() - quiet_since >= quiet_ms * 1e6:
                quiet = True
                break
        step = self.step
        late, late_max = (step.late, step.late_max_ns / 1e6) if step is not None else (0, 0.0)
        return Settled(quiet, late, round(late_max, 1))

    # ---- sending

    def start_step(self, command: StartStep) -> None:
        step = Step(command.tag, command.measure_from_ns, command.measure_to_ns)
        for client in self.clients:
            client.in_step = client.ready
            client.closed_ns = None
            client.keys = array("q")
            client.latencies = array("q")
        self.step = step
        step.sending = asyncio.get_running_loop().create_task(self.send_loop(step, command))
        if command.typing_s > 0:
            step.typing_task = asyncio.get_running_loop().create_task(self.typing_loop(step, command))

    async def send_loop(self, step: Step, command: StartStep) -> None:
        """One timer for all of this process's senders, like fanout.mjs: each slot is an independent sender."""
        rng = random.Random(command.seed * 1000 + self.proc)
        period = 1e9 / command.rate_per_sender if command.rate_per_sender > 0 else math.inf
        poisson = command.arrival == "poisson"

        def gap() -> float:
            return -math.log(1.0 - rng.random()) * period if poisson else period

        slots = [(self.by_index[c], k) for k, c in command.slots]
        due: list[float] = []
        for _, k in slots:
            offset = gap() if poisson else (k / command.total_slots * period if command.arrival == "uniform" else 0)
            due.append(command.t0_ns + offset)
        mine = command.rate_per_sender * len(slots)
        interval = min(5.0, max(1.0, 500 / max(1.0, mine))) / 1000
        end = command.measure_to_ns
        delay = (command.t0_ns - monotonic_ns()) / 1e9
        if delay > 0:
            await asyncio.sleep(delay)
        while True:
            now = monotonic_ns()
            if now >= end:
                return
            for n, (client, _) in enumerate(slots):
                while due[n] <= now and due[n] < end:
                    scheduled = due[n]
                    due[n] += gap()
                    if client.ready:
                        await self.send_one(step, client, scheduled)
            await asyncio.sleep(interval)

    async def send_one(self, step: Step, client: Client, scheduled: float) -> None:
        idx = len(step.messages)
        now = monotonic_ns()
        mark = f"~{step.tag}:{self.proc}:{idx}:{now}~"
        size = self.setup.size
        text = mark + PAD[: size - len(mark)] if size > len(mark) else mark
        measured = step.measure_from <= now < step.measure_to
        step.messages.append(Message(self.proc << 32 | idx, client.room, client.index, now, measured))
        if measured:
            step.sent_by_room[client.room] = step.sent_by_room.get(client.room, 0) + 1
            step.lag_ns.append(max(0, now - int(scheduled)))
        assert client.ws is not None
        try:
            # A ref of its own for every message of every run: the server stores a say whose name and ref it saw
            # within RETRY_WINDOW_SECONDS once, as a retry (the clock makes runs and steps differ, the rest sends).
            await client.ws.send(f'{{"type":"say","text":"{text}","ref":"r{now:x}.{self.proc}.{idx}"}}')
        except ConnectionClosed:
            step.send_failures += 1

    async def typing_loop(self, step: Step, command: StartStep) -> None:
        """Every connected client sends a typing notice every `typing_s` seconds from t0 until the window ends, as
        the page does while someone composes; each client's first one comes at a random point of the first period,
        so the clients do not all send at the same instants."""
        period = int(command.typing_s * 1e9)
        rng = random.Random(command.seed * 1000 + self.proc + 500)  # not the senders' sequence
        due = typing_schedule([c.index for c in self.clients], command, rng)
        heapq.heapify(due)
        while due and due[0][0] < command.measure_to_ns:
            at, index = due[0]
            delay = (at - monotonic_ns()) / 1e9
            if delay > 0:
                await asyncio.sleep(delay)
            heapq.heapreplace(due, (at + period, index))
            client = self.by_index[index]
            if not client.ready or client.ws is None:
                continue
            now = monotonic_ns()
            try:
                await client.ws.send(TYPING_NOTICE)
            except ConnectionClosed:
                step.send_failures += 1
                continue
            if step.measure_from <= now < step.measure_to:
                step.typing.sent += 1

    def progress(self) -> Progress:
        step = self.step
        opened: dict[int, int] = {}
        members = [(c.index, c.room) for c in self.clients if c.ready]
        for _, room in members:
            opened[room] = opened.get(room, 0) + 1
        if step is None:
            return Progress(True, {}, opened, members, 0)
        done = step.sending is None or step.sending.done()
        return Progress(done, dict(step.sent_by_room), opened, members, step.received)

    async def close_step(self) -> StepData:
        step = self.step
        if step is None:
            raise RuntimeError("no step to close")
        if step.sending is not None:
            await step.sending
        if step.typing_task is not None:
            await step.typing_task
        step.closed = True  # from here on, this step's deliveries only count as late
        logs = [ClientLog(c.index, c.room, c.keys, c.latencies, c.closed_ns) for c in self.clients if c.in_step]
        return StepData(self.proc, step.messages, logs, step.lag_ns, dict(step.errors), step.send_failures, step.typing)

    # ---- the storm

    def arm(self, command: StormArm) -> None:
        self.storm = command
        self.storm_members = sum(1 for c in self.clients if c.ready)
        self.rng = random.Random(command.seed * 1000 + self.proc)
        self.traffic = Traffic()
        for client in self.clients:
            client.rx_frames = client.rx_bytes = 0
        self.last_presence_ns = self.last_welcome_ns = 0
        self.outages = []
        self.reconnect_errors = {}
        self.reconnect_samples = []
        self.counting = True

    def storm_progress(self) -> StormProgress:
        traffic = self.traffic
        presence = traffic.by_type.get("presence")
        return StormProgress(
            live=sum(1 for c in self.clients if c.ready),
            clients=self.storm_members,
            reconnecting=len(self.reconnects),
            last_presence_ns=self.last_presence_ns,
            last_welcome_ns=self.last_welcome_ns,
            frames=traffic.frames,
            bytes=traffic.bytes,
            presence=presence.objects if presence else 0,
        )

    async def reconnect(self, client: Client, close_code: int | None, down_ns: int) -> None:
        """Reconnects one client as the web client does (its backoff, `since` = the newest id it saw), until it is
        welcomed or no attempt could start before the deadline."""
        storm = self.storm
        assert storm is not None
        outage = Outage(client.index, down_ns, close_code)
        self.outages.append(outage)
        while self.storm is storm and not self.stopping:
            delay = reconnect_delay_s(outage.attempts, close_code, self.rng)
            if monotonic_ns() + delay * 1e9 > storm.deadline_ns:
                return
            await asyncio.sleep(delay)
            if self.storm is not storm or self.stopping:
                return
            outage.attempts += 1
            report = Connected()
            try:
                ws = await self.open_joined(client, report, since=client.last_id, timeout_s=WELCOME_TIMEOUT_S)
            except Exception as error:
                kind = failure_kind(error)
                self.reconnect_errors[kind] = self.reconnect_errors.get(kind, 0) + 1
                if len(self.reconnect_samples) < SAMPLES:
                    self.reconnect_samples.append(f"{client.name}: {type(error).__name__}: {error}")
                continue
            outage.up_ns = self.last_welcome_ns = monotonic_ns()
            outage.resumed = report.resumed.get(client.index)
            outage.replica = report.replicas.get(client.index, "")
            self.adopt(client, ws)
            return

    async def disarm(self) -> StormOutages:
        """No more reconnects (those under way are cancelled); what the outages were."""
        self.storm = None
        self.counting = False
        pending = list(self.reconnects)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        return StormOutages(self.outages, dict(self.reconnect_errors), list(self.reconnect_samples))

    # ---- stopping

    async def close_all(self) -> None:
        self.stopping = True
        open_ = [c.ws for c in self.clients if c.ws is not None and c.ready]
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                await asyncio.gather(*(ws.close() for ws in open_), return_exceptions=True)
        for ws in open_:
            ws.transport.abort()


def typing_objects(data: bytes) -> tuple[int, int]:
    """How many typing objects a server frame holds (one object per line) and their bytes."""
    objects = size = 0
    for line in data.split(b"\n"):
        if line.startswith(TYPING_LINE):
            objects += 1
            size += len(line)
    return objects, size


def typing_schedule(clients: list[int], command: StartStep, rng: random.Random) -> list[tuple[int, int]]:
    """Each client's first typing notice, (monotonic ns, client index): at a random point of the first period after
    t0, the later ones every `typing_s` after it."""
    period = command.typing_s * 1e9
    return [(command.t0_ns + int(rng.random() * period), index) for index in clients]


def failure_kind(error: Exception) -> str:
    """A failed join in a few words, to count failures by kind: `HTTP 503`, `timeout`, `ConnectionError`, ..."""
    if isinstance(error, InvalidStatus):
        return f"HTTP {error.response.status_code}"
    if isinstance(error, TimeoutError):
        return "timeout"
    return type(error).__name__


def run(conn: Connection, setup: Setup) -> None:
    """The worker process's main: one uvloop event loop for its clients."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = len(setup.clients) + 256
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(want, soft)), hard))
    if urlsplit(setup.url).scheme not in ("ws", "wss"):
        raise ValueError(f"not a WebSocket URL: {setup.url}")
    profile = os.environ.get("CHATBENCH_PROFILE")  # where this process's own time goes (bench/README.md)
    if not profile:
        uvloop.run(Worker(conn, setup).serve())
        return
    import cProfile

    with cProfile.Profile() as profiler:
        uvloop.run(Worker(conn, setup).serve())
    profiler.dump_stats(f"{profile}.{setup.proc}")
