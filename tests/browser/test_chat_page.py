"""The chat page in a real browser (Debian's Chromium), through nginx: people chatting across replicas, history and
scroll-back, text that stays text, the form's own validation, a burst past the rate limit, riding out a replica stop."""

from __future__ import annotations

import asyncio
import json
import re
import secrets
from pathlib import Path

from pages import PHONE, XSS, ChatPage, Gate, navigate, seed
from playwright.async_api import Browser, WebSocketRoute, expect

from support.addresses import forwarded
from support.chat import ChatClient
from support.stack import Stack


class HeldPresence:
    """Between a page and its replica, in the browser: passes every frame both ways, except that while `holding` it
    keeps presence events from the page (as the names a truncated event leaves out never reach it), and it can hand
    the page an object of its own."""

    def __init__(self) -> None:
        self.holding = False
        self.page_side: WebSocketRoute | None = None

    def route(self, socket: WebSocketRoute) -> None:
        self.page_side = socket
        server = socket.connect_to_server()

        def from_server(frame: str | bytes) -> None:
            if isinstance(frame, str) and self.holding:
                frame = "\n".join(line for line in frame.split("\n") if '"type":"presence"' not in line)
                if not frame:
                    return
            socket.send(frame)

        server.on_message(from_server)

    def send_to_page(self, obj: dict[str, object]) -> None:
        assert self.page_side is not None, "the page has no socket"
        self.page_side.send(json.dumps(obj))


async def test_two_people_on_different_replicas_chat_and_see_each_other(
    browser: Browser, stack: Stack, replicas: list[str], artifacts: Path
) -> None:
    room = f"team-{secrets.token_hex(2)}"  # unique, and reads well in the screenshot
    # Carol talks through the protocol and stays: her words are the history the two pages start with.
    carol = await ChatClient.open(stack.ws_url)
    await carol.join("carol", room)
    for i, text in enumerate(["Morning all!", "Deploy went out at 9, two replicas behind nginx."]):
        assert (await carol.say_and_wait(text, ref=f"c-{i}"))["type"] == "message"

    alice = await ChatPage.open(browser, stack, name="alice", room=room)
    bob = await ChatPage.open(browser, stack, name="bob", room=room)
    await bob.move_off(await alice.replica())
    assert {await alice.replica(), await bob.replica()} == set(replicas[:2])

    await alice.say("Hi Bob! Which replica are you on?")
    await expect(bob.message("Hi Bob! Which replica are you on?")).to_have_count(1)
    await bob.say("@alice The other one. Shift+Enter for a new line,\nEnter to send.")
    await expect(alice.message("@alice The other one. Shift+Enter for a new line,\nEnter to send.")).to_have_count(1)
    await alice.say("Scroll up and older messages keep coming.")
    await expect(bob.message("Scroll up and older messages keep coming.")).to_have_count(1)
    # The conversation's changes (docs/web-client.md, "Conversation"), which the screenshot shows too: an edit, a
    # deletion, reactions, a mention of alice, someone typing.
    final = "Scroll up and older messages keep coming: that's the infinite part."
    await alice.edit("Scroll up and older messages keep coming.", final)
    await bob.react("Hi Bob! Which replica are you on?", "🎉")
    await alice.react("Deploy went out at 9, two replicas behind nginx.", "🚀")
    oops = await carol.say_and_wait("oops, wrong room", ref="c-oops")
    await expect(alice.message("oops, wrong room")).to_have_count(1)
    await carol.send({"type": "delete", "id": oops["id"], "ref": "c-delete"})
    hi = await carol.wait_for(lambda o: o["type"] == "message" and o["text"].startswith("Hi Bob!"))
    await carol.send({"type": "react", "id": hi["id"], "emoji": "🎉", "ref": "c-react"})

    expected = [
        "Morning all!",
        "Deploy went out at 9, two replicas behind nginx.",
        "Hi Bob! Which replica are you on?",
        "@alice The other one. Shift+Enter for a new line,\nEnter to send.",
        final,
    ]
    for chat in (alice, bob):
        await expect(chat.texts).to_have_text(expected)
        await expect(chat.pending).to_have_count(0)
        # The history comes first, then a marker, then what was said since.
        await expect(chat.page.locator("#messages > li").nth(2)).to_have_class("divider")
        names = [f"{name} (you)" if name == chat.name else name for name in ("alice", "bob", "carol")]
        await expect(chat.page.locator("#online li")).to_have_text(names)
        await expect(chat.page.locator("#online-count")).to_have_text("3")
        await expect(chat.message(final).locator(".edited")).to_have_text("(edited)")
        await expect(chat.page.locator("#messages .msg.deleted")).to_have_text(["message deleted"])
        await expect(chat.reaction("Hi Bob! Which replica are you on?", "🎉")).to_have_text("🎉2")
    # Own messages are marked as one's own, and named.
    await expect(alice.message("Hi Bob! Which replica are you on?")).to_have_class("msg own")
    await expect(bob.message("Hi Bob! Which replica are you on?")).to_have_class("msg")
    await expect(bob.message("Hi Bob! Which replica are you on?").locator(".who")).to_have_text("alice")
    await expect(alice.message("Hi Bob! Which replica are you on?").locator("time")).to_have_text(re.compile(r"\d"))
    await expect(alice.message("@alice The other one. Shift+Enter for a new line,\nEnter to send.")).to_have_class(
        "msg mentions-me"
    )
    await carol.send({"type": "typing"})
    await expect(alice.typing).to_have_text("carol is typing…")
    await alice.page.mouse.move(0, 0)  # no message hovered: the picture shows the page at rest

    await alice.page.screenshot(path=artifacts / "chat-desktop.png")
    await alice.page.set_viewport_size(PHONE)
    await expect(alice.page.locator("#people-toggle")).to_have_text("3 online")
    await alice.page.screenshot(path=artifacts / "chat-phone.png")
    assert (artifacts / "chat-desktop.png").stat().st_size > 10_000

    # Presence follows people leaving, live.
    await carol.close()
    for chat in (alice, bob):
        await expect(chat.page.locator("#online li")).to_have_count(2)
    alice.assert_clean()
    bob.assert_clean()


async def test_the_online_list_follows_presence_and_reads_itself_again_after_a_truncated_event(
    browser: Browser, stack: Stack
) -> None:
    room = f"people-{secrets.token_hex(2)}"
    carol = await ChatClient.open(stack.ws_url)
    await carol.join("carol", room)
    between = HeldPresence()
    alice = await ChatPage.open(browser, stack, name="alice", room=room, socket_route=between.route)
    online, count = alice.page.locator("#online li"), alice.page.locator("#online-count")
    await expect(online).to_have_text(["alice (you)", "carol"])
    # Each event's change, live: dave comes, carol goes.
    dave = await ChatClient.open(stack.ws_url)
    await dave.join("dave", room)
    await expect(online).to_have_text(["alice (you)", "carol", "dave"])
    await expect(count).to_have_text("3")
    await carol.close()
    await expect(online).to_have_text(["alice (you)", "dave"])
    await expect(count).to_have_text("2")
    # Erin's event never reaches the page; then one that says more changed than it lists: the page reads the list.
    between.holding = True
    erin = await ChatClient.open(stack.ws_url)
    await erin.join("erin", room)
    await dave.wait_for(lambda o: o["type"] == "presence" and o["joined"] == ["erin"])
    between.send_to_page(
        {
            "type": "presence",
            "event": "join",
            "name": "erin",
            "joined": [],
            "left": [],
            "online_count": 3,
            "truncated": True,
        }
    )
    await expect(online).to_have_text(["alice (you)", "dave", "erin"])
    await expect(count).to_have_text("3")
    await expect(alice.page.locator("#online-more")).to_be_hidden()
    for client in (dave, erin):
        await client.close()
    alice.assert_clean()


async def test_late_joiner_sees_history_and_scrolls_back_to_the_first_message(
    browser: Browser, stack: Stack, room: str
) -> None:
    texts = [f"seed {i:02d}" for i in range(1, 81)]
    await seed(stack, room, texts)

    reader = await ChatPage.open(browser, stack, name="reader", room=room)
    await expect(reader.texts).to_have_text(texts[-25:])
    await expect(reader.page.locator("#messages > li").last).to_have_class("divider")

    # At the top, the page fetches the 50 before the oldest it has, and keeps the reader's place.
    await reader.scroll_to_top()
    await expect(reader.texts).to_have_text(texts[-75:])
    await expect(reader.message("seed 56")).to_be_in_viewport()
    assert await reader.page.locator("#log").evaluate("log => log.scrollTop") > 0

    await reader.scroll_to_top()
    await expect(reader.texts).to_have_text(texts)
    await expect(reader.page.locator("#older-text")).to_have_text(f"This is the beginning of #{room}.")

    # Reading up there, a new message does not yank the view: a pill says so, and takes the reader down.
    top = await reader.page.locator("#log").evaluate("log => log.scrollTop")
    await seed(stack, room, ["a new one"])
    pill = reader.page.locator("#new-pill")
    await expect(pill).to_have_text("1 new message ↓")
    await expect(reader.message("a new one")).not_to_be_in_viewport()
    assert await reader.page.locator("#log").evaluate("log => log.scrollTop") == top
    await pill.click()
    await expect(reader.message("a new one")).to_be_in_viewport()
    await expect(pill).to_be_hidden()
    await expect(reader.texts).to_have_count(81)
    reader.assert_clean()


async def test_markup_in_messages_and_names_is_shown_as_text_and_runs_nothing(
    browser: Browser, stack: Stack, room: str
) -> None:
    mallory = await ChatPage.open(browser, stack, name="<b>mallory</b>", room=room)
    victim = await ChatPage.open(browser, stack, name="victim", room=room)
    await mallory.say(XSS)
    await mallory.say("<script>alert(2)</script>")
    await mallory.say("plain words")

    async def shows_markup_as_text(chat: ChatPage) -> None:
        await expect(chat.texts).to_have_text([XSS, "<script>alert(2)</script>", "plain words"])
        await expect(chat.message(XSS).locator(".who")).to_have_text(re.compile(r"^<b>mallory</b>"))
        await expect(chat.page.locator("#online")).to_contain_text("<b>mallory</b>")
        # Had any of it gone in as HTML, these elements would exist.
        await expect(chat.page.locator("#chat-view img, #chat-view script, #chat-view b")).to_have_count(0)

    await shows_markup_as_text(victim)
    # The same messages through the welcome's history, as a late joiner gets them.
    await navigate(victim.page)
    await victim.wait_online()
    await shows_markup_as_text(victim)
    await shows_markup_as_text(mallory)
    # One more round trip after the markup was rendered, so an error handler would have had its chance.
    await victim.say("nothing happened")
    await expect(mallory.message("nothing happened")).to_have_count(1)
    mallory.assert_clean()
    victim.assert_clean()

    # Second line of defence: the page may run only its own script and talk only to its own origin.
    policy = stack.get("/").headers["content-security-policy"]
    host = f"127.0.0.1:{stack.http_port}"
    assert "default-src 'self'" in policy
    assert "script-src 'self';" in policy
    assert f"connect-src 'self' ws://{host} wss://{host};" in policy


async def test_the_page_checks_what_the_server_would_refuse(browser: Browser, stack: Stack, room: str) -> None:
    context = await browser.new_context(viewport=PHONE, base_url=stack.base_url, extra_http_headers=forwarded())
    page = await context.new_page()
    await navigate(page, f"/#{room}")
    name = page.get_by_label("Your name", exact=True)
    room_box = page.get_by_label("Room", exact=True)
    join = page.get_by_role("button", name="Join")

    await join.click()
    await expect(page.locator("#name-error")).to_have_text("Pick a name.")
    await expect(name).to_be_focused()
    await name.fill("x" * 33)
    await join.click()
    await expect(page.locator("#name-error")).to_have_text("A name has at most 32 characters.")
    await name.fill("  dora  ")
    await room_box.fill("Team Room!")
    await room_box.press("Enter")
    await expect(page.locator("#name-error")).to_be_empty()
    await expect(page.locator("#room-error")).to_have_text("A room name uses only a-z, 0-9, - and _ (no spaces).")
    await expect(room_box).to_have_attribute("aria-invalid", "true")
    await room_box.fill(room)
    await room_box.press("Enter")
    await expect(page.locator("#status")).to_have_attribute("data-state", "online")
    await expect(page.locator("#room-title")).to_have_text(f"#{room}")
    assert page.url.endswith(f"/#{room}")

    box = page.get_by_label("Message", exact=True)
    await box.fill("y" * 2001)
    await expect(page.locator("#counter")).to_have_text("2001 / 2000")
    await expect(page.locator("#counter")).to_have_class("counter over")
    await box.press("Enter")
    await expect(page.locator("#text-error")).to_have_text(
        "Too long: a message has at most 2000 characters (this one has 2001)."
    )
    await expect(page.locator("#pending .msg, #messages .msg")).to_have_count(0)

    await box.fill("first line")
    await box.press("Shift+Enter")
    await box.press_sequentially("second line")
    await expect(page.locator("#counter")).to_be_hidden()
    await expect(page.locator("#text-error")).to_be_empty()
    await box.press("Enter")
    await expect(page.locator("#messages .msg .text")).to_have_text(["first line\nsecond line"])
    assert await page.locator("#messages .msg .text").evaluate("text => text.textContent") == "first line\nsecond line"
    await expect(page.locator("#messages .msg .who")).to_have_text(["dora (you)"])

    # The address follows the room: changing it moves the page to the room it names.
    await page.goto("/#another-room")
    await expect(page.locator("#room-title")).to_have_text("#another-room")
    await expect(page.locator("#status")).to_have_attribute("data-state", "online")
    await expect(page.locator("#messages .msg")).to_have_count(0)

    # The name is remembered: the next visit goes straight into the room in the address.
    again = await context.new_page()
    await navigate(again, f"/#{room}")
    await expect(again.locator("#room-title")).to_have_text(f"#{room}")
    await expect(again.locator("#status")).to_have_attribute("data-state", "online")
    await expect(again.locator("#messages .msg .who")).to_have_text(["dora (you)"])
    await context.close()


async def test_sending_faster_than_the_rate_limit_delivers_everything_once_in_order(
    browser: Browser, stack: Stack, room: str
) -> None:
    writer = await ChatPage.open(browser, stack, name="writer", room=room)
    reader = await ChatClient.open(stack.ws_url)
    await reader.join("reader", room)
    texts = [f"burst {i:02d}" for i in range(1, 21)]
    # As fast as a paste: twice the server's burst of 10, through the page's own form.
    await writer.page.evaluate(
        """texts => {
            const box = document.getElementById("text");
            for (const text of texts) { box.value = text; box.form.requestSubmit(); }
        }""",
        texts,
    )
    await expect(writer.pending.locator(".note").first).to_contain_text("Slow down")
    await expect(writer.texts).to_have_text(texts)
    await expect(writer.pending).to_have_count(0)
    await reader.wait_for(lambda o: o["type"] == "message" and o["text"] == texts[-1], timeout=30)
    assert [m["text"] for m in reader.of_type("message")] == texts
    await reader.close()
    writer.assert_clean()


async def test_a_page_rides_out_its_replica_stopping_and_misses_nothing(
    browser: Browser, stack: Stack, room: str, replicas: list[str]
) -> None:
    async with Gate(stack.http_port) as gate:
        alice = await ChatPage.open(browser, stack, name="alice", room=room, base_url=gate.base_url)
        bob = await ChatPage.open(browser, stack, name="bob", room=room)
        await bob.move_off(await alice.replica())
        stopped, survivor = await alice.replica(), await bob.replica()
        container = stack.web_containers()[replicas.index(stopped)]

        await alice.say("before the restart")
        await expect(bob.message("before the restart")).to_have_count(1)

        # Alice's network refuses new connections: when her replica goes, her page cannot come back until the
        # test lets it, so bob's message is certain to be sent while she is away.
        gate.shut = True
        await asyncio.to_thread(stack.docker, "stop", container)
        try:
            await expect(alice.status).to_have_attribute("data-state", "reconnecting")
            await expect(alice.status).to_contain_text("Reconnecting")
            await expect(alice.page.locator("#messages .system")).to_have_text(["Connection lost. Reconnecting…"])

            await bob.say("sent while alice was away")
            await expect(bob.message("sent while alice was away")).to_have_count(1)
            await alice.say("typed while away")
            await expect(alice.pending).to_have_count(1)
            await expect(alice.pending.locator(".note")).to_have_text("Waiting for the connection…")

            gate.shut = False
            await alice.wait_online()
            assert await alice.replica() == survivor != stopped
            await expect(alice.pending).to_have_count(0)
            expected = ["before the restart", "sent while alice was away", "typed while away"]
            for chat in (alice, bob):
                await expect(chat.texts).to_have_text(expected)
            await expect(alice.page.locator("#messages .system")).to_have_text(
                [re.compile(r"^Connection lost for \d+ s; reconnected\.$")]
            )
            # Nothing arrives twice later either: one more round trip, and the lists are still exact.
            await bob.say("all good?")
            for chat in (alice, bob):
                await expect(chat.texts).to_have_text([*expected, "all good?"])
        finally:
            gate.shut = False
            await asyncio.to_thread(stack.docker, "start", container)
            await asyncio.to_thread(stack.wait_healthy)
        alice.assert_clean()
        bob.assert_clean()
