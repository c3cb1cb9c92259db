"""An honest user, measured while someone else attacks the stack: it says something every `every` seconds and
times each message from its send to its echo (the server's acknowledgement). What users feel is this latency.

It runs on an event loop of its own, in a thread: an attacker in the test's loop (masking frames as fast as it can)
would otherwise delay the honest user's own reading, and the test would measure itself."""

from __future__ import annotations

import asyncio
import statistics
import threading
import time

from .chat import client_on


class HonestUser:
    def __init__(self, url: str, replica: str | None, room: str, every: float) -> None:
        self.url = url
        self.replica = replica
        self.room = room
        self.every = every
        self.latencies: list[float] = []
        self.refused: list[dict[str, object]] = []
        self.failure: BaseException | None = None
        self._joined = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._talk()), daemon=True)

    @classmethod
    async def on(cls, url: str, replica: str | None, room: str, *, every: float = 0.25) -> HonestUser:
        """A user joined on that replica (any for None), talking from now on until `stop`."""
        user = cls(url, replica, room, every)
        user._thread.start()
        joined = await asyncio.to_thread(user._joined.wait, 60)
        if user.failure is not None:
            raise user.failure
        assert joined, "the honest user could not join within 60 s"
        return user

    async def _talk(self) -> None:
        try:
            client = await client_on(self.url, self.replica, name="honest", room=self.room)
        except BaseException as error:
            self.failure = error
            self._joined.set()
            return
        self._joined.set()
        n = 0
        try:
            while not self._stop.is_set():
                n += 1
                started = time.monotonic()
                answer = await client.say_and_wait(f"still here {n}", ref=f"honest-{n}", timeout=30)
                if answer["type"] == "message":
                    self.latencies.append(time.monotonic() - started)
                else:
                    self.refused.append(answer)
                await asyncio.sleep(max(0.0, self.every - (time.monotonic() - started)))
        except BaseException as error:
            self.failure = error
        finally:
            await client.close()

    async def stop(self) -> dict[str, float]:
        """Stops talking; the latency figures in milliseconds (p50, p95, max) and how many were measured."""
        self._stop.set()
        await asyncio.to_thread(self._thread.join, 60)
        if self.failure is not None:
            raise AssertionError(f"the honest user failed: {self.failure!r}") from self.failure
        ordered = sorted(self.latencies)
        assert ordered, "the honest user got no message through"
        return {
            "count": len(ordered),
            "p50_ms": round(statistics.median(ordered) * 1000, 1),
            "p95_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))] * 1000, 1),
            "max_ms": round(ordered[-1] * 1000, 1),
        }
