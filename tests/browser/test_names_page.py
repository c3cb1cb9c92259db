"""Owned names on the page (issue 16), in Chromium through nginx: a reload and another replica keep one's name (its
token goes with every join), someone else typing the name or a look-alike of it gets the form back with the reason,
releasing a name frees it for the next person, and two tabs of one browser are one name online."""

from __future__ import annotations

import json
import secrets
from pathlib import Path

from pages import PHONE, ChatPage, joins_of, navigate
from playwright.async_api import Browser, WebSocket, WebSocketRoute, expect

from support.names import unique
from support.stack import Stack

CYRILLIC_A = "\u0430"


async def refused_as_taken(chat: ChatPage, typed: str) -> None:
    """The page is back at the join form, the name field marked with the reason, and stays there."""
    await expect(chat.page.locator("#join-view")).to_be_visible()
    await expect(chat.name_error).to_have_text(f"“{typed}” is someone else's name here. Pick another one.")
    await expect(chat.name_field).to_have_attribute("aria-invalid", "true")
    await expect(chat.name_field).to_have_value(typed)
    await expect(chat.name_field).to_be_focused()
    await expect(chat.status).to_have_attribute("data-state", "offline")


async def test_a_reload_and_another_replica_keep_the_name_and_any_spelling_of_it_is_welcomed_as_claimed(
    browser: Browser, stack: Stack, room: str
) -> None:
    name = unique("rhea")
    rhea = await ChatPage.open(browser, stack, name=name, room=room)
    token = await rhea.token()
    assert token, f"the page kept no claim token: {await rhea.tokens()}"
    assert len(token) >= 40, token
    await rhea.say("before the reload")
    joins = joins_of(rhea.page)

    # Reloads (the page goes in by itself) until nginx puts it on the other replica: each join carries the token,
    # each is welcomed, on both replicas.
    first = await rhea.replica()
    await navigate(rhea.page)
    await rhea.wait_online()
    await rhea.move_off(first)
    assert joins, "the page did not join again"
    assert all(join["name"] == name for join in joins), joins
    assert all(join.get("token") == token for join in joins), joins
    await expect(rhea.name_error).to_be_empty()
    await expect(rhea.message("before the reload")).to_have_class("msg own")
    await expect(rhea.page.locator("#online li.me")).to_have_text(f"{name} (you)")
    await expect(rhea.page.get_by_role("button", name="Release my name")).to_be_visible()

    # Her browser elsewhere (her token), typing the name in capitals: welcomed as the name was claimed, and her
    # messages are her own there too.
    shouting = await ChatPage.open(browser, stack, name=name.upper(), room=room)
    await expect(shouting.page.locator("#online li.me")).to_have_text(f"{name} (you)")
    await expect(shouting.message("before the reload")).to_have_class("msg own")
    await shouting.say("from the other browser")
    await expect(rhea.message("from the other browser")).to_have_class("msg own")
    await expect(rhea.page.locator("#online li")).to_have_text([f"{name} (you)"])
    rhea.assert_clean()
    shouting.assert_clean()


async def test_someone_else_taking_the_name_or_a_look_alike_gets_the_form_back_and_can_join_under_another(
    browser: Browser, stack: Stack, room: str
) -> None:
    name = unique("alice")
    alice = await ChatPage.open(browser, stack, name=name, room=room)
    # Someone else: a browser of their own, which never held the name's token (only a made-up one, which the page
    # sends and must forget when it is refused).
    made_up = secrets.token_urlsafe(32)
    mallory = await ChatPage.arrive(browser, stack, name=name, room=room, token=made_up)
    joins = joins_of(mallory.page)

    await mallory.join()
    await refused_as_taken(mallory, name)
    assert await mallory.tokens() == {}, "the refused token was kept"
    for look_alike in (name.capitalize(), CYRILLIC_A + name[1:]):
        await mallory.join(look_alike)
        await refused_as_taken(mallory, look_alike)
    # Typing clears the mark; another name goes in.
    await mallory.name_field.press_sequentially("x")
    await expect(mallory.name_error).to_be_empty()
    await expect(mallory.name_field).not_to_have_attribute("aria-invalid", "true")
    other = unique("mallory")
    await mallory.join(other)
    await mallory.joined()
    await mallory.move_off(await alice.replica())
    await mallory.say("hello, under my own name")
    await expect(alice.message("hello, under my own name").locator(".who")).to_have_text(other)
    await expect(alice.page.locator("#online li")).to_have_text([f"{name} (you)", other])
    # Each refusal was one join, never tried again (no reconnect loop); the made-up token went with the first only.
    look_alikes = [name, name.capitalize(), CYRILLIC_A + name[1:]]
    refused = [join for join in joins if join["name"] != other]
    assert [join["name"] for join in refused] == look_alikes, joins
    assert refused[0].get("token") == made_up, refused
    assert all("token" not in join for join in refused[1:]), refused
    alice.assert_clean()
    mallory.assert_clean()


async def test_a_released_name_is_free_for_the_next_person(
    browser: Browser, stack: Stack, room: str, artifacts: Path
) -> None:
    name = unique("nora")
    nora = await ChatPage.open(browser, stack, name=name, room=room)
    otto = await ChatPage.open(browser, stack, name=unique("otto"), room=room)
    await otto.move_off(await nora.replica())
    sockets: list[WebSocket] = []
    nora.page.on("websocket", lambda socket: sockets.append(socket))

    # Asked once more, in the page (no dialog); "Keep it" and Escape keep it.
    release = nora.page.get_by_role("button", name="Release my name")
    await release.click()
    confirm = nora.page.locator("#release-confirm")
    await expect(confirm).to_contain_text(f"Release “{name}”?")
    await expect(nora.page.get_by_role("button", name="Yes, release it")).to_be_focused()
    await nora.page.get_by_role("button", name="Keep it").click()
    await expect(confirm).to_be_hidden()
    await expect(release).to_be_focused()
    await release.press("Enter")
    await expect(confirm).to_be_visible()
    await nora.page.keyboard.press("Escape")
    await expect(confirm).to_be_hidden()
    await release.click()
    # For the eye: the bar on a desktop in light, and on a phone in dark.
    await nora.page.screenshot(path=artifacts / "release-desktop.png")
    await nora.page.set_viewport_size(PHONE)
    await nora.page.emulate_media(color_scheme="dark")
    await expect(confirm).to_be_in_viewport()
    await nora.page.screenshot(path=artifacts / "release-phone-dark.png")
    await nora.page.get_by_role("button", name="Yes, release it").click()

    await expect(nora.page.locator("#join-view")).to_be_visible()
    await expect(nora.page.locator("#join-note")).to_have_text(
        f"“{name}” is released: it is free now, for anyone. Pick a name to join again."
    )
    await expect(nora.name_field).to_have_value("")
    assert await nora.token(name) is None
    # The server closes the socket after `released`, and the page does not come back: otto sees nora leave.
    await expect(otto.page.locator("#online li")).to_have_text([f"{otto.name} (you)"])
    await expect(nora.status).to_have_attribute("data-state", "offline")

    # Otto, on the other replica, takes the name.
    await otto.page.get_by_role("button", name="Leave").click()
    await otto.join(name)
    await otto.joined()
    await expect(otto.page.locator("#online li.me")).to_have_text(f"{name} (you)")
    assert await otto.token(name)
    await otto.say("mine now")
    await expect(otto.message("mine now")).to_have_class("msg own")
    # Nora's page opened no socket since (a reconnect would have joined, and claimed the name again before otto).
    assert sockets == [], "the page reconnected after releasing its name"
    nora.assert_clean()
    otto.assert_clean()


async def test_two_tabs_of_one_browser_chat_under_one_name_that_is_online_once(
    browser: Browser, stack: Stack, room: str
) -> None:
    name = unique("tess")
    tess = await ChatPage.open(browser, stack, name=name, room=room)
    second = await tess.tab()
    assert await second.token() == await tess.token()
    uma = await ChatPage.open(browser, stack, name=unique("uma"), room=room)
    await uma.move_off(await tess.replica())

    await tess.say("from the first tab")
    # Once it is in the room: from another replica the second tab's message could otherwise be ordered first.
    await expect(second.message("from the first tab")).to_have_count(1)
    await second.say("from the second tab")
    await expect(uma.texts).to_have_text(["from the first tab", "from the second tab"])
    await expect(uma.page.locator("#messages .msg .who")).to_have_text([name, name])
    for tab in (tess, second):
        await expect(tab.message("from the first tab")).to_have_class("msg own")
        await expect(tab.message("from the second tab")).to_have_class("msg own")
    await expect(uma.page.locator("#online li")).to_have_text([name, f"{uma.name} (you)"])
    await expect(uma.page.locator("#online-count")).to_have_text("2")
    for chat in (tess, second, uma):
        chat.assert_clean()


async def test_too_many_new_names_says_how_long_to_wait(browser: Browser, stack: Stack, room: str) -> None:
    # The server's answer when an address claimed too many names this hour, played by the test in place of the
    # server: the limit itself is the server's (tests/system).
    def refuse_new_names(socket: WebSocketRoute) -> None:
        def from_page(frame: str | bytes) -> None:
            if isinstance(frame, str) and json.loads(frame).get("type") == "join":
                refusal = {"type": "error", "code": "too_many_names", "detail": "Too many new names.", "ref": None}
                socket.send(json.dumps({**refusal, "retry_after_ms": 25 * 60 * 1000}))

        socket.on_message(from_page)

    chat = await ChatPage.arrive(browser, stack, name=unique("vera"), room=room, socket_route=refuse_new_names)
    await chat.join()
    await expect(chat.name_error).to_have_text(
        "Too many new names were taken from your address this hour: try again in about 25 min, "
        "or join under a name you have used here before."
    )
    await expect(chat.name_field).to_have_attribute("aria-invalid", "true")
    await expect(chat.page.locator("#join-view")).to_be_visible()
    chat.assert_clean()
