"""What the browser tests share: one person's page (ChatPage: what they see, what they do with keyboard, mouse and
touch), navigation that survives Docker's network changes, a TCP relay that can keep a page away (Gate), and seeding a
room's history through the protocol.

Names are owned (docs/web-client.md, "Names"), and the whole run shares one stack: a page opened for a name that an
earlier test (or a system test's client) claimed starts with the claim token the run holds for it (support/names.py),
as that person's browser would, and a page's welcome puts its token there for the next one."""

from __future__ import annotations

import asyncio
import json
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from playwright.async_api import (
    Browser,
    BrowserContext,
    ConsoleMessage,
    Dialog,
    Locator,
    Page,
    ViewportSize,
    WebSocketRoute,
    expect,
)
from playwright.async_api import Error as PlaywrightError

from support import names
from support.addresses import forwarded
from support.chat import ChatClient
from support.stack import Stack

DESKTOP: ViewportSize = {"width": 1100, "height": 720}
PHONE: ViewportSize = {"width": 390, "height": 760}
XSS = "<img src=x onerror=alert(1)>"
# Chromium aborts loads in flight when the host's network interfaces change, which Docker does whenever a stack
# (anyone's, on this shared machine) starts or stops. The page retries its own requests; navigations are retried here.
NETWORK_CHANGED = "net::ERR_NETWORK_CHANGED"
# Where the page keeps its claim tokens: {name.normalize("NFKC").toLowerCase(): token} (app.js).
TOKENS_KEY = "infinite-chat:tokens"
TOKENS = f"""() => {{
    try {{
        return JSON.parse(localStorage.getItem({json.dumps(TOKENS_KEY)}) || "{{}}");
    }} catch {{
        return {{}};
    }}
}}"""
# Runs before the page's own script, on every load of the context: puts the token in once, so that a reload or a
# new tab later finds what the page itself kept (a newer token, or none after a release), not the seed again.
SEED_TOKEN = """([key, name, token]) => {
    try {
        if (localStorage.getItem("infinite-chat-test:seeded")) return;
        localStorage.setItem("infinite-chat-test:seeded", "1");
        const tokens = JSON.parse(localStorage.getItem(key) || "{}");
        tokens[name.normalize("NFKC").toLowerCase()] = token;
        localStorage.setItem(key, JSON.stringify(tokens));
    } catch {
        // about:blank and other opaque origins have no storage.
    }
}"""


async def hold_token(context: BrowserContext, name: str, token: str) -> None:
    """The context's browser holds `token` for `name` from its first page load on."""
    await context.add_init_script(f"({SEED_TOKEN})({json.dumps([TOKENS_KEY, name, token])})")


async def navigate(page: Page, url: str | None = None) -> None:
    """Loads `url` (or reloads), once more if the host's network changed under the load."""
    for attempt in range(3):
        try:
            await (page.goto(url) if url is not None else page.reload())
            return
        except PlaywrightError as error:
            if NETWORK_CHANGED not in str(error) or attempt == 2:
                raise


@dataclass
class ChatPage:
    """One person's page: what they see, and what they do with keyboard and mouse."""

    page: Page
    name: str
    dialogs: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @classmethod
    async def open(
        cls,
        browser: Browser,
        stack: Stack,
        *,
        name: str,
        room: str,
        viewport: ViewportSize = DESKTOP,
        base_url: str | None = None,
        socket_route: Callable[[WebSocketRoute], None] | None = None,
    ) -> ChatPage:
        """The person's page, joined to `room` as `name` (with the run's token for it, if a claim was made)."""
        chat = await cls.arrive(
            browser, stack, name=name, room=room, viewport=viewport, base_url=base_url, socket_route=socket_route
        )
        await chat.join()
        await chat.joined()
        return chat

    @classmethod
    async def arrive(
        cls,
        browser: Browser,
        stack: Stack,
        *,
        name: str,
        room: str,
        viewport: ViewportSize = DESKTOP,
        base_url: str | None = None,
        socket_route: Callable[[WebSocketRoute], None] | None = None,
        token: str | None = None,
        carry_token: bool = True,
    ) -> ChatPage:
        """The person's page at the join form of `room`, not joined yet. Their browser holds `token` for `name`, or
        else (unless `carry_token` is false: someone else) the token the run holds for it."""
        # Each person of the test from an address of their own, as in life (support/addresses.py).
        context = await browser.new_context(
            viewport=viewport, base_url=base_url or stack.base_url, extra_http_headers=forwarded()
        )
        held = token if token is not None else names.token_for(name) if carry_token else None
        if held is not None:
            await hold_token(context, name, held)
        chat = cls(await context.new_page(), name)
        if socket_route is not None:
            await chat.page.route_web_socket("**/ws", socket_route)
        await navigate(chat.page, f"/#{room}")
        await expect(chat.page.get_by_label("Room", exact=True)).to_have_value(room)
        return chat

    def __post_init__(self) -> None:
        async def on_dialog(dialog: Dialog) -> None:
            self.dialogs.append(dialog.message)
            await dialog.dismiss()

        def on_console(message: ConsoleMessage) -> None:
            # Chromium logs each failed socket attempt while the network is down (the page retries), and loads cut
            # by a network change (the page retries those too); anything else the page logs is a finding.
            if message.type == "error" and not any(noise in message.text for noise in ("WebSocket", NETWORK_CHANGED)):
                self.errors.append(message.text)

        self.page.on("dialog", on_dialog)
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))
        self.page.on("console", on_console)

    async def join(self, name: str | None = None) -> None:
        """Fills in the join form (with `name`, which becomes the page's, or the page's name) and joins; waits for
        nothing."""
        if name is not None:
            self.name = name
        await self.page.get_by_label("Your name", exact=True).fill(self.name)
        await self.page.get_by_role("button", name="Join").click()

    async def joined(self) -> None:
        """Waits for the welcome, and keeps the token it gave for the run's next page or client of this name."""
        await self.wait_online()
        token = await self.token()
        if token is not None:
            names.remember(self.name, token)

    async def tokens(self) -> dict[str, str]:
        """The claim tokens the page keeps, by its key of each name."""
        tokens: dict[str, str] = await self.page.evaluate(TOKENS)
        return tokens

    async def token(self, name: str | None = None) -> str | None:
        """The token the page keeps for `name` (by default its own)."""
        key: str = await self.page.evaluate('name => name.normalize("NFKC").toLowerCase()', name or self.name)
        return (await self.tokens()).get(key)

    async def tab(self) -> ChatPage:
        """Another tab of the same browser (same storage: the same name and token), at this page's address; it goes
        in by itself, as a returning visitor does."""
        other = type(self)(await self.page.context.new_page(), self.name)
        await navigate(other.page, self.page.url)
        await other.joined()
        return other

    @property
    def status(self) -> Locator:
        return self.page.locator("#status")

    @property
    def name_field(self) -> Locator:
        return self.page.get_by_label("Your name", exact=True)

    @property
    def name_error(self) -> Locator:
        return self.page.locator("#name-error")

    @property
    def texts(self) -> Locator:
        return self.page.locator("#messages .msg .text")

    @property
    def pending(self) -> Locator:
        return self.page.locator("#pending .msg")

    def message(self, text: str) -> Locator:
        """Shown messages (not pending ones) whose text is exactly `text`."""
        return self.page.locator("#messages .msg").filter(
            has=self.page.locator(".text").filter(has_text=re.compile(f"^{re.escape(text)}$"))
        )

    async def wait_online(self) -> None:
        await expect(self.status).to_have_attribute("data-state", "online")
        await expect(self.status).to_have_text("Connected")

    async def replica(self) -> str:
        await expect(self.page.locator("#replica")).to_be_visible()
        replica = await self.page.locator("#replica").get_attribute("data-replica")
        assert replica
        return replica

    async def say(self, text: str) -> None:
        box = self.page.get_by_label("Message", exact=True)
        await box.fill(text)
        await box.press("Enter")
        await expect(box).to_have_value("")

    async def move_off(self, replica: str, attempts: int = 10) -> None:
        """Reloads (the page joins again by itself) until nginx puts this page on another replica."""
        for _ in range(attempts):
            if await self.replica() != replica:
                return
            await navigate(self.page)
            await self.wait_online()
        raise AssertionError(f"{self.name}'s page stayed on replica {replica} after {attempts} reloads")

    @property
    def typing(self) -> Locator:
        """The "… is typing" line under the conversation."""
        return self.page.locator("#typing")

    @property
    def box(self) -> Locator:
        return self.page.get_by_label("Message", exact=True)

    @property
    def menu(self) -> Locator:
        return self.page.locator("#menu")

    def reaction(self, text: str, emoji: str) -> Locator:
        """The reaction chip `emoji` under the message `text`."""
        return self.message(text).locator(f'.reaction[data-emoji="{emoji}"]')

    async def open_menu(self, text: str) -> None:
        """Opens the message's menu as a mouse user does: hover, then its "⋯" button."""
        message = self.message(text)
        await message.hover()
        await message.locator(".more").click()
        await expect(self.menu).to_be_visible()

    async def react(self, text: str, emoji: str) -> None:
        await self.open_menu(text)
        await self.menu.get_by_role("button", name=f"React with {emoji}").click()
        await expect(self.menu).to_be_hidden()

    async def edit(self, text: str, new_text: str) -> None:
        await self.open_menu(text)
        await self.page.locator("#menu-edit").click()
        await expect(self.page.locator("#editing")).to_be_visible()
        await expect(self.box).to_have_value(text)
        await self.box.fill(new_text)
        await self.box.press("Enter")
        await expect(self.page.locator("#editing")).to_be_hidden()

    async def delete(self, text: str) -> None:
        await self.open_menu(text)
        delete = self.page.locator("#menu-delete")
        await delete.click()
        await expect(delete).to_have_text("Yes, delete")
        await delete.click()
        await expect(self.menu).to_be_hidden()

    async def set_hidden(self, hidden: bool) -> None:
        """The tab goes to the background (or comes back), as far as the page can tell: headless Chromium keeps every
        page visible (bring_to_front of another page changes nothing), so document.hidden and visibilityState are
        overridden and visibilitychange is dispatched, as the browser does."""
        await self.page.evaluate(
            """hidden => {
                Object.defineProperty(document, "hidden", { configurable: true, get: () => hidden });
                const state = hidden ? "hidden" : "visible";
                Object.defineProperty(document, "visibilityState", { configurable: true, get: () => state });
                document.dispatchEvent(new Event("visibilitychange"));
            }""",
            hidden,
        )

    async def scroll_to_top(self) -> None:
        await self.page.locator("#log").evaluate("log => { log.scrollTop = 0; }")

    def assert_clean(self) -> None:
        assert self.dialogs == [], f"{self.name}'s page opened dialogs: {self.dialogs}"
        assert self.errors == [], f"{self.name}'s page had errors: {self.errors}"


class Gate:
    """A TCP relay in front of nginx for one page: it passes everything through, and while shut it refuses new
    connections (a network that is down), so a page stays away exactly as long as a test needs. Connections
    already open are left alone."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.shut = False
        self.server: asyncio.Server | None = None
        self.pipes: set[asyncio.Task[None]] = set()
        self.writers: set[asyncio.StreamWriter] = set()

    @property
    def base_url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aenter__(self) -> Gate:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for pipe in self.pipes:
            pipe.cancel()
        await asyncio.gather(*self.pipes, return_exceptions=True)

    def cut(self) -> None:
        """Drops every connection through the relay, without a close frame: a network that went away."""
        for writer in self.writers:
            writer.close()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.shut:
            writer.close()
            return
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.port)
        for one in (writer, upstream_writer):
            self.writers.add(one)
        for source, sink in ((reader, upstream_writer), (upstream_reader, writer)):
            task = asyncio.create_task(self._pipe(source, sink))
            self.pipes.add(task)
            task.add_done_callback(self.pipes.discard)

    async def _pipe(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
        except ConnectionError:
            pass
        finally:
            sink.close()
            self.writers.discard(sink)


def joins_of(page: Page) -> list[dict[str, Any]]:
    """Every join the page sends, from now on, in order."""
    joins: list[dict[str, Any]] = []

    def on_socket(socket: Any) -> None:
        def on_sent(payload: str | bytes) -> None:
            if isinstance(payload, str) and '"type":"join"' in payload:
                joins.append(json.loads(payload))

        socket.on("framesent", on_sent)

    page.on("websocket", on_socket)
    return joins


async def seed(stack: Stack, room: str, texts: list[str]) -> None:
    """Puts `texts` in the room's history, in order. The rate limit allows a burst of 10 per connection: one
    connection per ten messages."""
    for start in range(0, len(texts), 10):
        client = await ChatClient.open(stack.ws_url)
        try:
            await client.join(f"seeder-{start // 10 + 1}", room)
            for i, text in enumerate(texts[start : start + 10]):
                # A ref of its own: a second seed of the same room would otherwise repeat a seeder's name and ref,
                # which the server takes for a retry of the first (stored once).
                reply = await client.say_and_wait(text, ref=f"seed-{start + i}-{secrets.token_hex(4)}")
                assert reply["type"] == "message", reply
        finally:
            await client.close()
