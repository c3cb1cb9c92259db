"""Faults, caused on purpose on the real stack: replicas restarted and killed, Redis stopped, a client that stops
reading, thousands of idle sockets. Each test counts what users would see (lost, repeated, reordered messages) and
leaves the stack healthy again, whatever happens. Figures from these tests are in docs/reliability.md."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import time
from collections.abc import Iterator
from functools import partial

import pytest
import websockets

from support.addresses import forwarded
from support.chat import ChatClient, client_on, eventually, eventually_async
from support.figures import report, seconds
from support.names import remember, unique
from support.rawws import RawSocket
from support.resilient import ResilientClient, keep_saying, settle, start_all
from support.stack import Stack

OUTBOX_LIMIT = 1000  # the stack's defaults (docker-compose.yml)
OUTBOX_LIMIT_BYTES = 1024 * 1024
RESUME_MAX_BYTES = 512 * 1024
HISTORY_SIZE = 25
PRESENCE_TTL = 20.0
OUTAGE_SECONDS = 6.0


# ---- helpers ------------------------------------------------------------------------------------------------------


def inspect(stack: Stack, container: str, template: str) -> str:
    return stack.docker("inspect", "--format", template, container).stdout.strip()


@contextlib.contextmanager
def restored(stack: Stack) -> Iterator[None]:
    """Whatever a test stopped or killed is started again and the whole stack is healthy before the next test."""
    try:
        yield
    finally:
        for service in ("redis", "web", "nginx"):
            for container in stack.containers(service, all_states=True):
                if inspect(stack, container, "{{.State.Running}}") != "true":
                    stack.docker("start", container)
        stack.wait_healthy()


def assert_exactly_once(clients: list[ResilientClient], ids: list[str], refs_sent: set[str]) -> None:
    """Every client got every accepted message once, in log order; every message sent was accepted once.

    `ids` is the room's log as it is now. When a run sends more than `RETAIN` messages (the hour-long soak sends
    21,600) the oldest are trimmed from it: the log is then the tail of what every client holds, the clients must
    hold the same messages in the same order, and the first client's messages are exactly those sent, once each.
    """
    assert len(set(ids)) == len(ids)
    first = clients[0].delivered
    for client in clients:
        lost = set(ids) - set(client.delivered)
        repeated = len(client.delivered) - len(set(client.delivered))
        assert not lost, f"{client.name} lost {len(lost)} messages"
        assert repeated == 0, f"{client.name} was sent {repeated} messages twice"
        held = client.delivered
        assert held[len(held) - len(ids) :] == ids, f"{client.name} got the messages in another order than the log"
        assert held == first, f"{client.name} and {clients[0].name} hold different messages or orders"
    stored_refs = [message.get("ref") for message in clients[0].messages]
    assert len(stored_refs) == len(set(stored_refs)), "a message was stored twice"
    assert set(stored_refs) == refs_sent, f"not stored: {sorted(refs_sent - set(stored_refs))[:10]}"


def refs_of(clients: list[ResilientClient]) -> set[str]:
    return {ref for client in clients for ref in client.sent_at}


def resumed_elsewhere(clients: list[ResilientClient], replica: str) -> bool:
    return all(client.live and client.replica != replica for client in clients)


def grew_by(client: ResilientClient, count: int, more: int) -> bool:
    return len(client.messages) >= count + more


# ---- replicas going away ------------------------------------------------------------------------------------------


async def test_rolling_restart_loses_and_repeats_nothing(stack: Stack, room: str) -> None:
    """docker restart (SIGTERM) of each replica in turn while 50 clients chat: 1012, resume with since, no loss."""
    clients = [ResilientClient(stack.ws_url, f"user-{i}", room) for i in range(50)]
    await start_all(clients)
    first = {client.name: client.replica for client in clients}
    assert len(set(first.values())) == 2, "the 50 clients should be spread over both replicas"
    senders = clients[:10]
    stop = asyncio.Event()
    tasks = [asyncio.create_task(keep_saying(sender, stop, every=0.5)) for sender in senders]
    restart_seconds: list[float] = []
    with restored(stack):
        try:
            for container in stack.web_containers():
                replica = stack.replica_name(container)
                on_it = [client for client in clients if client.replica == replica]
                before = sum(len(client.closes) for client in clients)
                started = time.monotonic()
                await asyncio.to_thread(stack.docker, "restart", container)
                await asyncio.to_thread(stack.wait_healthy)
                restart_seconds.append(time.monotonic() - started)
                # Its clients were all moved, and chat went on meanwhile.
                await eventually(
                    partial(resumed_elsewhere, on_it, replica),
                    timeout=60,
                    what=f"the clients of {container} resumed on the other replica",
                )
                assert sum(len(client.closes) for client in clients) - before == len(on_it)
        finally:
            stop.set()
            await asyncio.gather(*tasks)
        ids = await settle(stack, room, clients)
    await asyncio.gather(*(client.stop() for client in clients))

    codes = [code for client in clients for _, code in client.closes]
    assert set(codes) == {1012}, f"close codes: {sorted(set(codes))}"
    assert all(client.closes for client in clients)
    assert_exactly_once(clients, ids, refs_of(senders))
    reconnects = [value for client in clients for value in client.reconnect_seconds]
    report(
        "rolling_restart",
        clients=len(clients),
        messages=len(ids),
        sockets_closed=len(codes),
        close_codes=sorted(set(codes)),
        reconnect_seconds=seconds(reconnects),
        resent_after_resume=sum(len(client.resent) for client in senders),
        restart_until_healthy_seconds=[round(value, 1) for value in restart_seconds],
        lost=0,
        duplicated=0,
    )


async def test_replica_crash_loses_nothing_and_its_users_leave_presence(
    stack: Stack, room: str, replicas: list[str]
) -> None:
    """docker kill (SIGKILL) of one replica: its clients resume on the other without loss; users whose sockets
    died with it and who do not come back leave presence within about PRESENCE_TTL."""
    victim_replica = replicas[0]
    victim = stack.container_of(victim_replica)
    ghosts = [
        await client_on(stack.ws_url, victim_replica, name=f"ghost-{i}", room=room, attempts=60) for i in range(3)
    ]
    clients = [ResilientClient(stack.ws_url, f"user-{i}", room) for i in range(20)]
    await start_all(clients)
    on_victim = [client for client in clients if client.replica == victim_replica]
    observers = [client for client in clients if client.replica != victim_replica]
    assert on_victim
    assert observers
    senders = on_victim[:3] + observers[:3]
    stop = asyncio.Event()
    tasks = [asyncio.create_task(keep_saying(sender, stop, every=0.5)) for sender in senders]

    ghost_names = {f"ghost-{i}" for i in range(3)}

    def ghosts_gone(observer: ResilientClient) -> bool:
        # Presence events are coalesced (one per room per PRESENCE_INTERVAL_MS): the list kept from them counts.
        return bool(observer.presence) and not observer.online & ghost_names

    with restored(stack):
        try:
            await eventually(lambda: all(len(s.messages) >= 5 for s in senders), timeout=30, what="chat going")
            killed_at = time.monotonic()
            await asyncio.to_thread(stack.docker, "kill", victim)
            await eventually(
                partial(resumed_elsewhere, on_victim, victim_replica),
                timeout=60,
                what="the victim's clients resumed on the other replica",
            )
            resumed_in = time.monotonic() - killed_at
            # Nobody said goodbye for the ghosts: their entries expire, and the survivors' sweep announces it.
            await eventually(
                lambda: all(ghosts_gone(observer) for observer in observers),
                timeout=PRESENCE_TTL + 25,
                what="the ghosts leaving presence",
                interval=0.2,
            )
            presence_gone = observers[0].presence[-1][0] - killed_at
            last_online = observers[0].online
            assert not last_online & ghost_names
            assert {client.name for client in clients} <= last_online
            for ghost in ghosts:
                assert await ghost.wait_closed(15) == 1006
            await asyncio.to_thread(stack.docker, "start", victim)
            await asyncio.to_thread(stack.wait_healthy)
        finally:
            stop.set()
            await asyncio.gather(*tasks)
        ids = await settle(stack, room, clients)
    await asyncio.gather(*(client.stop() for client in clients))

    assert all(code == 1006 for client in on_victim for _, code in client.closes)
    assert not any(client.closes for client in observers)
    assert_exactly_once(clients, ids, refs_of(senders))
    reconnects = [value for client in on_victim for value in client.reconnect_seconds]
    report(
        "replica_crash",
        clients=len(clients),
        on_killed_replica=len(on_victim),
        messages=len(ids),
        reconnect_seconds=seconds(reconnects),
        all_resumed_after_kill_seconds=round(resumed_in, 2),
        presence_gone_after_kill_seconds=round(presence_gone, 1),
        resent_after_resume=sum(len(client.resent) for client in senders),
        lost=0,
        duplicated=0,
    )


# ---- Redis going away -------------------------------------------------------------------------------------------


def replica_states(stack: Stack) -> dict[str, str]:
    return {c: inspect(stack, c, "{{.RestartCount}} {{.State.StartedAt}}") for c in stack.web_containers()}


async def test_redis_outage_refuses_sends_and_chat_resumes_by_itself(stack: Stack, room: str) -> None:
    """Redis stopped for a few seconds: each send gets its echo or `unavailable`, /ready says 503, the replicas
    stay up, chat resumes by itself once Redis is back, and history from before is still there (AOF)."""
    redis = stack.containers("redis")[0]
    password = stack.env["REDIS_PASSWORD"]
    clients = [ResilientClient(stack.ws_url, f"user-{i}", room) for i in range(6)]
    await start_all(clients)
    assert len({client.replica for client in clients}) == 2
    for i, client in enumerate(clients):
        await client.say(f"before the outage {i}", ref=f"{client.name}-before")
    before = await settle(stack, room, clients)
    replicas_before = replica_states(stack)
    senders = clients[:4]
    stop = asyncio.Event()
    tasks = [asyncio.create_task(keep_saying(sender, stop, every=0.4)) for sender in senders]

    def refused() -> list[tuple[str, dict[str, object]]]:
        return [(ref, error) for sender in senders for ref, error in sender.refused.items()]

    with restored(stack):
        try:
            await eventually(lambda: all(len(s.messages) >= len(before) + 8 for s in senders), timeout=30, what="chat")
            stopped_at = time.monotonic()
            await asyncio.to_thread(stack.docker, "stop", redis)
            await eventually(lambda: len(refused()) >= len(senders) * 2, timeout=30, what="sends being refused")
            # Hold the outage for a few seconds (the subscriber's backoff grows meanwhile): a fault of known length.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.0, OUTAGE_SECONDS - (time.monotonic() - stopped_at)))
            assert {str(error["code"]) for _, error in refused()} == {"unavailable"}

            with stack.http() as http:
                for _ in range(4):  # both replicas (nginx alternates by fewest connections)
                    ready = http.get("/ready")
                    assert ready.status_code == 503
                    assert ready.json()["status"] == "unavailable"
                    assert password not in ready.text
            newcomer = await ChatClient.open(stack.ws_url)
            await newcomer.send({"type": "join", "name": unique("newcomer"), "room": room})
            error = await newcomer.wait_for(lambda o: o["type"] == "error")
            assert error["code"] == "unavailable"
            assert password not in json.dumps(error)
            assert await newcomer.wait_closed() == 1013

            started_at = time.monotonic()
            await asyncio.to_thread(stack.docker, "start", redis)
            outage = time.monotonic() - stopped_at

            def accepted_after_restart() -> list[float]:
                return [
                    sender.arrived[m["id"]] - started_at
                    for sender in senders
                    for m in sender.messages
                    if m["name"] == sender.name and sender.arrived[m["id"]] > started_at
                ]

            await eventually(lambda: bool(accepted_after_restart()), timeout=30, what="chat resuming by itself")
            resumed_in = min(accepted_after_restart())
            await eventually(
                lambda: stack.get("/ready").status_code == 200, timeout=30, what="/ready turning 200", interval=0.2
            )
            await eventually(
                partial(grew_by, senders[0], len(senders[0].messages), 10), timeout=30, what="chat going again"
            )
        finally:
            stop.set()
            await asyncio.gather(*tasks)
        ids = await settle(stack, room, clients)
    await asyncio.gather(*(client.stop() for client in clients))

    assert replica_states(stack) == replicas_before, "a replica exited or restarted"
    assert ids[: len(before)] == before, "history from before the outage is gone"
    assert not any(client.closes for client in clients), "a connected client was disconnected"
    # No silent loss: every send was echoed or refused, and what was refused is not in the log.
    refused_refs = {ref for ref, _ in refused()}
    sent = refs_of(senders)
    accepted = {m.get("ref") for m in clients[0].messages}
    assert sent <= accepted | refused_refs
    assert not refused_refs & accepted
    for client in clients:
        assert client.delivered == ids, f"{client.name} lost or repeated messages"
    report(
        "redis_outage",
        outage_seconds=round(outage, 1),
        sends_refused_unavailable=len(refused_refs),
        chat_resumed_after_redis_start_seconds=round(resumed_in, 2),
        messages=len(ids),
        lost=0,
        duplicated=0,
    )


async def test_lost_fanout_subscription_is_filled_from_the_log(stack: Stack, room: str) -> None:
    """Redis stays up but drops the replicas' pub/sub connections while messages flow: what was published while a
    replica was resubscribing reaches its clients from the log (Rooms.fill_gaps), once and in order."""
    redis = stack.containers("redis")[0]
    since = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(time.time() - 1))
    clients = [ResilientClient(stack.ws_url, f"user-{i}", room) for i in range(8)]
    await start_all(clients)
    assert len({client.replica for client in clients}) == 2
    stop = asyncio.Event()
    tasks = [asyncio.create_task(keep_saying(client, stop, every=0.22)) for client in clients]

    def filled() -> int:
        total = 0
        for container in stack.web_containers():
            for line in stack.docker("logs", "--since", since, container).stdout.splitlines():
                if '"gap_filled"' in line and room in line:
                    total += int(json.loads(line)["msg"].split()[2])
        return total

    kills = 0
    try:
        await eventually(lambda: len(clients[0].messages) >= 20, timeout=30, what="chat going")
        # Each kill opens a window of a few tens of milliseconds; repeat until messages fell into one.
        while kills < 15 and (kills == 0 or await asyncio.to_thread(filled) == 0):
            kills += 1
            await asyncio.to_thread(
                stack.exec, redis, "sh", "-c", 'REDISCLI_AUTH="$REDIS_PASSWORD" redis-cli client kill type pubsub'
            )
            await eventually(partial(grew_by, clients[0], len(clients[0].messages), 10), timeout=30, what="chat")
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    ids = await settle(stack, room, clients)
    await asyncio.gather(*(client.stop() for client in clients))
    gap_filled = await asyncio.to_thread(filled)
    assert gap_filled > 0, f"no message fell into a resubscription window in {kills} kills"
    assert not any(client.closes for client in clients)
    assert_exactly_once(clients, ids, refs_of(clients))
    report("lost_subscription", subscription_kills=kills, messages_filled_from_log=gap_filled, messages=len(ids))


# ---- a client that stops reading ----------------------------------------------------------------------------------


async def test_stalled_client_is_cut_off_without_slowing_anyone(stack: Stack, room: str) -> None:
    """A client that stops reading (tiny receive window): the others get everything while it is stalled, its
    replica's outbox for it stays within OUTBOX_LIMIT and OUTBOX_LIMIT_BYTES, memory stays bounded, and when it reads
    again it finds what was on its way and then a close 1013 (or the end of the connection, once the replica has
    dropped it), after which it resumes with since: everything it missed, or a fresh history when that is more than
    a resume brings."""
    stalled = await RawSocket.open("127.0.0.1", stack.http_port, receive_buffer=4096, read_limit=4096)
    await stalled.send_json({"type": "join", "name": unique("stalled"), "room": room})
    welcome = (await stalled.read_objects())[0]
    assert welcome["type"] == "welcome"
    remember(welcome["name"], welcome["token"])  # it comes back as itself
    replica = welcome["replica"]
    container = stack.container_of(replica)
    others = [ResilientClient(stack.ws_url, f"user-{i}", room) for i in range(20)]
    await start_all(others)
    metrics_before = stack.replica_metrics(container)
    rss_before = stack.rss_kib(container)
    slow_before = metrics_before.get("chat_slow_consumers_total", 0.0)

    # The largest message there is: 2,000 characters of 4 bytes each in UTF-8.
    text = "\U0001f600" * 2000
    stop = asyncio.Event()
    tasks = [asyncio.create_task(keep_saying(client, stop, every=0.21, text=text)) for client in others]
    samples: list[tuple[float, int]] = []

    async def overflowed() -> bool:
        metrics = await asyncio.to_thread(stack.replica_metrics, container)
        rss = await asyncio.to_thread(stack.rss_kib, container)
        samples.append((metrics["chat_outbox_max_messages"], metrics["chat_outbox_max_bytes"], rss))
        return metrics.get("chat_slow_consumers_total", 0.0) > slow_before

    try:
        await eventually_async(overflowed, timeout=120, what="the stalled client's outbox overflowing", interval=0.5)
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    # Everyone else has everything while the stalled client still reads nothing.
    ids = await settle(stack, room, others)
    assert_exactly_once(others, ids, refs_of(others))
    assert stalled.close_code is None
    outbox_peak = max(outbox for outbox, _, _ in samples)
    outbox_bytes_peak = max(size for _, size, _ in samples)
    rss_peak = max(rss for _, _, rss in samples)
    assert outbox_peak <= OUTBOX_LIMIT
    assert outbox_bytes_peak <= OUTBOX_LIMIT_BYTES
    # Bounded: OUTBOX_LIMIT_BYTES and a transport buffer of at most as much, with room for noise.
    assert rss_peak - rss_before < 32 * 1024, f"replica memory grew by {rss_peak - rss_before} KiB"

    # It reads again: what was on its way, then the close 1013, or the end of the connection when it did not read
    # within CLOSE_TIMEOUT (10 s) of that close and the replica dropped it.
    objects = await stalled.read_until_end(60)
    assert stalled.close_code in (1013, None)
    got = [obj["id"] for obj in objects if obj["type"] == "message"]
    assert got == ids[: len(got)], "the stalled client's messages are not a prefix of the log"
    assert len(got) < len(ids)
    await stalled.close()
    back = await ChatClient.open(stack.ws_url)
    resumed = await back.join(welcome["name"], room, since=got[-1] if got else None)
    missed = ids[len(got) :]
    if len(missed) * len(text.encode()) > RESUME_MAX_BYTES:
        # More than a resume brings: a fresh history, and the gap is for the HTTP API (as the page scrolls back).
        assert resumed["resumed"] is False
        assert [m["id"] for m in resumed["history"]] == ids[-HISTORY_SIZE:]
    else:
        assert resumed["resumed"] is True
        assert got + [m["id"] for m in resumed["history"]] == ids
    await back.close()

    await asyncio.gather(*(client.stop() for client in others))
    latencies = [
        client.arrived[m["id"]] - sender.sent_at[m["ref"]]
        for sender in others
        for m in sender.messages
        if m["name"] == sender.name
        for client in others
    ]
    report(
        "slow_consumer",
        messages=len(ids),
        message_bytes=len(text.encode()),
        stalled_got_before_close=len(got),
        close_code=stalled.close_code,
        outbox_peak=outbox_peak,
        outbox_limit=OUTBOX_LIMIT,
        outbox_bytes_peak=outbox_bytes_peak,
        replica_rss_before_mib=round(rss_before / 1024, 1),
        replica_rss_peak_mib=round(rss_peak / 1024, 1),
        others_latency_seconds=seconds(latencies),
    )


# ---- many connections -------------------------------------------------------------------------------------------

CROWD = 2000


async def test_one_replica_holds_two_thousand_idle_connections(stack: Stack, room: str) -> None:
    """With the other replica stopped, one replica holds 2,000 sockets through nginx (which holds two per socket),
    all in one room, and a message reaches every one of them."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < CROWD + 500:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, CROWD * 4), hard))
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] >= CROWD + 500, "this process may not open enough files"
    since = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(time.time() - 1))
    holder, other = stack.web_containers()[:2]
    frames: list[list[str]] = [[] for _ in range(CROWD)]
    sockets: list[websockets.ClientConnection] = []
    readers: list[asyncio.Task[None]] = []
    gate = asyncio.Semaphore(40)
    # The crowd's one name, claimed first: every socket of the crowd joins with its token. One name may hold
    # NAME_SOCKETS sockets in a room; a moderator of the room lets it hold the crowd.
    claimer = await ChatClient.open(stack.ws_url)
    claimed = await claimer.join(unique("crowd"), f"{room}-claim")  # a room of its own: nothing in the crowd's
    await claimer.close()
    crowd, token = claimed["name"], claimed["token"]
    moderator = await ChatClient.open(stack.ws_url)
    await moderator.join(unique("mod"), room, moderator=stack.moderator_token)
    await moderator.send({"type": "limits", "sockets": CROWD})
    await moderator.wait_for(lambda o: o["type"] == "moderation" and o["action"] == "limits")
    await moderator.close()

    async def read(index: int, ws: websockets.ClientConnection) -> None:
        with contextlib.suppress(websockets.ConnectionClosed):
            async for frame in ws:
                frames[index].append(str(frame))

    async def open_one(index: int) -> None:
        async with gate:
            ws = await websockets.connect(
                stack.ws_url, compression=None, open_timeout=60, ping_interval=None, additional_headers=forwarded()
            )
            sockets.append(ws)
            # One name for the whole crowd: presence changes once, not 2,000 times to 2,000 members.
            await ws.send(json.dumps({"type": "join", "name": crowd, "room": room, "token": token}))
            welcome = json.loads(str(await asyncio.wait_for(ws.recv(), 60)).split("\n")[0])
            assert welcome["type"] == "welcome"
            readers.append(asyncio.create_task(read(index, ws)))

    with restored(stack):
        await asyncio.to_thread(stack.docker, "stop", other)
        rss_before = stack.rss_kib(holder)
        started = time.monotonic()
        try:
            await asyncio.gather(*(open_one(i) for i in range(CROWD)))
            opened_in = time.monotonic() - started
            held = stack.replica_metrics(holder)["chat_connections"]
            assert held >= CROWD
            rss_held = stack.rss_kib(holder)
            speaker = await ChatClient.open(stack.ws_url)
            await speaker.join("speaker", room)
            sent_at = time.monotonic()
            echo = await speaker.say_and_wait("hello, crowd", ref="to-all")
            assert echo["type"] == "message"
            await eventually(
                lambda: all(any('"ref":"to-all"' in frame for frame in got) for got in frames),
                timeout=60,
                what="the message reaching all 2,000",
                interval=0.2,
            )
            reached_all_in = time.monotonic() - sent_at
            assert all(ws.close_code is None for ws in sockets), "a socket of the crowd was closed"
            await speaker.close()
        finally:
            closing = asyncio.Semaphore(100)

            async def close(ws: websockets.ClientConnection) -> None:
                async with closing:
                    await ws.close()

            await asyncio.gather(*(close(ws) for ws in sockets), return_exceptions=True)
            await asyncio.gather(*readers, return_exceptions=True)
    nginx_log = stack.docker("logs", "--since", since, stack.containers("nginx")[0]).stderr.splitlines()
    nginx_errors = [line for line in nginx_log if "worker_connections" in line or "Too many open files" in line]
    assert not nginx_errors, nginx_errors[:5]
    report(
        "many_connections",
        connections_on_one_replica=int(held),
        opened_in_seconds=round(opened_in, 1),
        message_reached_all_in_seconds=round(reached_all_in, 2),
        replica_rss_mib={"before": round(rss_before / 1024, 1), "holding": round(rss_held / 1024, 1)},
    )


# ---- long: soak ----------------------------------------------------------------------------------------------------


SOAK_SECONDS = float(os.environ.get("SOAK_SECONDS", "3600"))


@pytest.mark.long
# The suite's 900 s timeout would end an hour's soak at a quarter of it; the stack's own start counts too.
@pytest.mark.timeout(SOAK_SECONDS + 600)
async def test_soak_steady_chat_with_periodic_restarts(stack: Stack, room: str) -> None:
    """SOAK_SECONDS (default an hour) of steady chat, a replica restarted every SOAK_RESTART_EVERY seconds (every
    third time killed instead): nothing lost or repeated, and the replicas' memory does not keep growing."""
    duration = SOAK_SECONDS
    every = float(os.environ.get("SOAK_RESTART_EVERY", "300"))
    clients = [ResilientClient(stack.ws_url, f"user-{i}", room) for i in range(30)]
    await start_all(clients)
    senders = clients[:6]
    stop = asyncio.Event()
    tasks = [asyncio.create_task(keep_saying(sender, stop, every=1.0)) for sender in senders]
    rss: dict[str, list[int]] = {c: [] for c in stack.web_containers()}
    cycle = 0
    end = time.monotonic() + duration
    with restored(stack):
        try:
            while time.monotonic() < end:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), min(every, max(0.0, end - time.monotonic())))
                for container in rss:
                    rss[container].append(await asyncio.to_thread(stack.rss_kib, container))
                if time.monotonic() >= end:
                    break
                container = stack.web_containers()[cycle % 2]
                if cycle % 3 == 2:
                    await asyncio.to_thread(stack.docker, "kill", container)
                    await asyncio.to_thread(stack.docker, "start", container)
                else:
                    await asyncio.to_thread(stack.docker, "restart", container)
                await asyncio.to_thread(stack.wait_healthy)
                cycle += 1
        finally:
            stop.set()
            await asyncio.gather(*tasks)
        ids = await settle(stack, room, clients, timeout=180)
    await asyncio.gather(*(client.stop() for client in clients))
    assert_exactly_once(clients, ids, refs_of(senders))
    # A restarted replica starts from scratch, so compare samples between restarts of the same process loosely:
    # no sample more than 128 MiB above the first.
    for container, values in rss.items():
        assert max(values) - values[0] < 128 * 1024, f"{container} memory: {values}"
    reconnects = [value for client in clients for value in client.reconnect_seconds]
    report(
        "soak",
        seconds=duration,
        restarts=cycle,
        messages=len(ids),
        reconnect_seconds=seconds(reconnects),
        rss_mib={c: [round(v / 1024) for v in values] for c, values in rss.items()},
        lost=0,
        duplicated=0,
    )
