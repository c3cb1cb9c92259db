"""Runs one replica: Hypercorn on uvloop, and a graceful drain on SIGTERM (docker stop, ECS task stop)."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

import uvloop
from hypercorn.asyncio import serve
from hypercorn.config import Config
from quart import Quart

from . import hypercorn_internals, logs
from .app import create_app
from .config import ConfigError, Settings
from .replica import Replica


def hypercorn_config(settings: Settings) -> Config:
    config = Config()
    config.bind = [f"0.0.0.0:{settings.port}"]
    config.accesslog = None  # nginx writes the access log
    config.errorlog = logging.getLogger("hypercorn.error")
    config.websocket_max_message_size = settings.max_frame_bytes
    # Pings keep idle sockets alive through nginx and load balancers and make dead peers visible: a peer that
    # answers no ping for two intervals sends nothing, and the read timeout closes its connection.
    config.websocket_ping_interval = settings.ping_interval
    config.read_timeout = int(settings.ping_interval * 2 + 10)
    # By now the drain has closed every chat socket; what is left is idle keep-alive connections.
    config.graceful_timeout = 2.0
    # Room for a crowd reconnecting at once after the other replica restarts.
    config.backlog = 4096
    return config


async def serve_until_stopped(app: Quart, config: Config) -> None:
    replica: Replica = app.extensions["replica"]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    async def drained() -> None:
        await stop.wait()
        await replica.drain()

    await serve(app, config, shutdown_trigger=drained)


def main() -> None:
    try:
        settings = Settings.from_env()
    except ConfigError as error:
        print(f"infinite-chat: configuration error: {error}", file=sys.stderr)
        sys.exit(2)
    try:
        hypercorn_internals.install(settings.frame_rate, settings.frame_burst)
    except hypercorn_internals.InternalsChanged as error:
        print(f"infinite-chat: refusing to start: {error}", file=sys.stderr)
        sys.exit(3)
    logs.configure(settings.replica_name, settings.log_level)
    uvloop.run(serve_until_stopped(create_app(settings), hypercorn_config(settings)))
