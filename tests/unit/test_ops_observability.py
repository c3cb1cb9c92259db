"""What an operator sees of one replica: its JSON log lines and its Prometheus metrics, after a real conversation
through the replica's ASGI chat endpoint (in-memory broker; tests/system/test_operations.py does it with Redis)."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import secrets
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import REGISTRY, generate_latest

from infinite_chat import logs
from infinite_chat.app import create_app
from infinite_chat.config import Secret, Settings

PASSWORD = "hunter2-" + secrets.token_hex(8)


class AsgiChat:
    """One chat socket driven straight through the replica's ASGI endpoint, as Hypercorn would drive it."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.sent: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.task: asyncio.Task[None] | None = None

    async def open(self) -> None:
        scope = {
            "type": "websocket",
            "path": "/ws",
            "headers": [],
            "asgi": {"version": "3.0"},
            "scheme": "ws",
            "query_string": b"",
            "root_path": "",
            "subprotocols": [],
        }
        self.task = asyncio.create_task(self.app.asgi_app(scope, self.inbox.get, self.sent.put))
        await self.inbox.put({"type": "websocket.connect"})
        assert (await self.next())["type"] == "websocket.accept"

    async def next(self) -> dict[str, Any]:
        return await asyncio.wait_for(self.sent.get(), 5)

    async def send(self, obj: dict[str, Any]) -> list[dict[str, Any]]:
        """Sends a frame and returns the objects of the next frame the replica writes."""
        await self.inbox.put({"type": "websocket.receive", "text": json.dumps(obj)})
        frame = await self.next()
        return [json.loads(line) for line in frame["text"].split("\n")]

    async def close(self) -> None:
        await self.inbox.put({"type": "websocket.disconnect", "code": 1000})
        assert self.task is not None
        await asyncio.wait_for(self.task, 5)


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


class LogOutput:
    """The replica's log as configured in production (JSON lines, here at debug level), written to a buffer."""

    def __init__(self) -> None:
        self.buffer = io.StringIO()

    def text(self) -> str:
        return self.buffer.getvalue()

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.text().splitlines()]


@pytest.fixture
def log() -> Iterator[LogOutput]:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    logs.configure("replica-1", "debug")
    output = LogOutput()
    [handler] = root.handlers
    assert isinstance(handler, logging.StreamHandler)
    # configure() writes to stdout, which pytest owns; the same handler and formatter, pointed at a buffer.
    handler.setStream(output.buffer)
    yield output
    root.handlers[:], root.level = saved


async def converse(text: str) -> None:
    app = create_app(Settings(replica_name="replica-1", redis_password=Secret(PASSWORD)))
    replica = app.extensions["replica"]
    await replica.start()
    try:
        chat = AsgiChat(app)
        await chat.open()
        welcome = await chat.send({"type": "join", "name": "ann", "room": "ops-room"})
        assert welcome[0]["type"] == "welcome"
        [echo] = await chat.send({"type": "say", "text": text, "ref": "r1"})
        assert echo["type"] == "message"
        assert echo["text"] == text
        [refused] = await chat.send({"type": "say", "text": "x" * 100_000, "ref": "r2"})
        assert refused["type"] == "error"
        await chat.close()
    finally:
        await replica.stop()


async def test_log_lines_are_json_with_the_fields_operators_filter_on(log: LogOutput) -> None:
    await converse("hello")
    lines = log.lines()
    assert lines, "the replica logged nothing"
    for line in lines:
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["ts"]), line
        assert line["level"] in ("debug", "info", "warning", "error", "critical")
        assert line["replica"] == "replica-1"
        assert isinstance(line["event"], str)
        assert line["event"]
    [join] = [line for line in lines if line["event"] == "join"]
    assert join["level"] == "info"
    assert join["room"] == "ops-room"
    assert isinstance(join["connection"], str)
    assert join["connection"]
    assert {"started", "join"} <= {line["event"] for line in lines}


async def test_message_text_and_secrets_never_reach_the_log(log: LogOutput) -> None:
    text = "confidential-" + secrets.token_hex(8)
    await converse(text)
    logging.getLogger("infinite_chat").info("settings", extra={"event": "settings", "settings": Settings()})
    logging.getLogger("infinite_chat").info("with password", extra={"event": "check", "password": Secret(PASSWORD)})
    lines = log.lines()
    assert lines
    assert PASSWORD not in log.text()
    for line in lines:
        if line["level"] != "debug":
            assert text not in json.dumps(line), line


def test_a_library_line_without_an_event_still_has_one(log: LogOutput) -> None:
    logging.getLogger("hypercorn.error").info("Running on http://0.0.0.0:8000 (CTRL + C to quit)")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("infinite_chat.replica").exception("task failed", extra={"event": "task_failed"})
    lines = log.lines()
    assert lines[0]["event"] == "log"
    assert lines[0]["logger"] == "hypercorn.error"
    assert lines[1]["event"] == "task_failed"
    assert "RuntimeError: boom" in lines[1]["error"]


async def test_metrics_count_a_conversation() -> None:
    names = {
        "joins": "chat_joins_total",
        "received": "chat_messages_received_total",
        "accepted": "chat_messages_accepted_total",
        "deliveries": "chat_deliveries_total",
        "frames": "chat_frames_sent_total",
        "latency": "chat_fanout_latency_seconds_count",
    }
    before = {key: sample(name) for key, name in names.items()}
    refused_before = sample("chat_messages_refused_total", code="too_long")
    await converse("counted")
    after = {key: sample(name) for key, name in names.items()}
    assert after["joins"] - before["joins"] == 1
    # "received" counts well-formed say frames; the oversized one was refused while being parsed.
    assert after["received"] - before["received"] == 1
    assert after["accepted"] - before["accepted"] == 1
    assert sample("chat_messages_refused_total", code="too_long") - refused_before == 1
    # welcome + own presence, the echo, the error: four objects in three frames; one of them carried a message.
    assert after["deliveries"] - before["deliveries"] == 4
    assert after["frames"] - before["frames"] == 3
    assert after["latency"] - before["latency"] == 1
    assert sample("chat_connections") == 0


def test_metrics_page_lists_every_metric_the_docs_promise() -> None:
    text = generate_latest().decode()
    for family in (
        "chat_connections",
        "chat_joins_total",
        "chat_resumes_total",
        "chat_messages_received_total",
        "chat_messages_accepted_total",
        'chat_messages_refused_total{code="rate_limited"}',
        "chat_slow_consumers_total",
        "chat_frames_sent_total",
        "chat_deliveries_total",
        "chat_outbox_messages",
        "chat_outbox_max_messages",
        'chat_redis_errors_total{kind="command"}',
        'chat_redis_errors_total{kind="subscribe"}',
        "chat_redis_reconnects_total",
        'chat_fanout_latency_seconds_bucket{le="0.005"}',
        'chat_fanout_latency_seconds_bucket{le="+Inf"}',
        "chat_fanout_latency_seconds_sum",
        "chat_fanout_latency_seconds_count",
    ):
        assert re.search(rf"^{re.escape(family)}[ {{]", text, re.M), family
