"""Moderation on the page (issue 16), in Chromium through nginx, a moderator and someone else on different replicas:
the moderator (joined with the token through the form's field) removes a message with a reason, mutes and unmutes
from a name's menu, bans from the room and sets slow mode; the other page shows each as the protocol says, keeps
what it typed when the server holds it back, and goes back to the form when banned, without reconnecting. Someone
who is not a moderator sees none of the tools, and a reason with markup stays text."""

from __future__ import annotations

import re

from pages import PHONE, XSS, ChatPage, joins_of, navigate
from playwright.async_api import Browser, Locator, expect

from support.names import unique
from support.stack import Stack

MODERATOR_KEY = "infinite-chat:moderator"
TIME = r"\d{1,2}:\d{2}"


async def moderator(browser: Browser, stack: Stack, room: str) -> ChatPage:
    """A moderator's page: the join form with the token in its "Moderator token" field."""
    assert stack.moderator_token, "the stack has no moderator token"
    mod = await ChatPage.arrive(browser, stack, name=unique("mod"), room=room)
    field = mod.page.get_by_label("Moderator token", exact=True)
    await expect(field).to_be_hidden()  # collapsed until asked for
    await mod.page.get_by_text("I am a moderator").click()
    await field.fill(stack.moderator_token)
    await mod.join()
    await mod.joined()
    await expect(mod.page.locator("#moderator-badge")).to_have_text("moderator")
    return mod


async def moderator_and_other(browser: Browser, stack: Stack, room: str) -> tuple[ChatPage, ChatPage]:
    mod = await moderator(browser, stack, room)
    other = await ChatPage.open(browser, stack, name=unique("bob"), room=room)
    await other.move_off(await mod.replica())
    await expect(mod.page.locator("#online li")).to_have_count(2)
    return mod, other


def moderation_lines(chat: ChatPage) -> Locator:
    return chat.page.locator("#messages .system.moderation")


async def test_a_moderator_removes_anyones_message_with_a_reason_and_everyone_sees_it_removed_by_a_moderator(
    browser: Browser, stack: Stack, room: str
) -> None:
    mod, other = await moderator_and_other(browser, stack, room)
    for text in ("buy cheap pills", "an honest question"):
        await other.say(text)
    await expect(mod.texts).to_have_text(["buy cheap pills", "an honest question"])

    await mod.open_menu("buy cheap pills")
    delete = mod.page.locator("#menu-delete")
    await expect(delete).to_be_visible()
    await delete.click()
    reason = mod.menu.get_by_label("Reason (optional, everyone sees it)")
    await expect(reason).to_be_focused()
    await reason.fill("spam")
    await expect(delete).to_have_text("Yes, delete")
    await delete.click()
    await expect(mod.menu).to_be_hidden()

    async def removed(chat: ChatPage) -> None:
        await expect(chat.page.locator("#messages .msg.deleted")).to_have_text(["message removed by a moderator"])
        await expect(chat.texts).to_have_text(["an honest question"])

    for chat in (other, mod):
        await removed(chat)
    await expect(other.page.locator("#messages .msg.deleted .gone")).to_have_attribute(
        "title", re.compile(r"deleted by a moderator .*\(spam\)$")
    )
    # In the history too (the tombstone says "moderated"), after a reload on either side; the moderator's reload
    # keeps the token, from sessionStorage, never localStorage.
    await navigate(other.page)
    await other.wait_online()
    await removed(other)
    await navigate(mod.page)
    await mod.wait_online()
    await removed(mod)
    await expect(mod.page.locator("#moderator-badge")).to_be_visible()
    kept, local = await mod.page.evaluate(
        f"() => [sessionStorage.getItem({MODERATOR_KEY!r}), JSON.stringify(Object.entries(localStorage))]"
    )
    assert kept == stack.moderator_token
    assert stack.moderator_token not in local
    mod.assert_clean()
    other.assert_clean()


async def test_a_muted_person_sees_it_keeps_what_they_typed_and_unmuting_clears_it(
    browser: Browser, stack: Stack, room: str
) -> None:
    mod, other = await moderator_and_other(browser, stack, room)
    await other.say("first words")
    await expect(mod.message("first words")).to_have_count(1)

    # The name in the message's header opens the name menu.
    await mod.message("first words").locator(".who").click()
    menu = mod.page.locator("#name-menu")
    await expect(menu).to_be_visible()
    await expect(menu.get_by_role("button", name="Mute 10 min")).to_be_focused()
    await menu.get_by_label("Reason (optional, everyone sees it)").fill("cool off")
    await menu.get_by_role("button", name="Mute 10 min").click()
    await expect(menu).to_be_hidden()
    line = f"{other.name} was muted for 10 minutes by {mod.name} (cool off)"
    for chat in (mod, other):
        await expect(moderation_lines(chat)).to_have_text([line])
    muted = other.page.locator("#muted-line")
    await expect(muted).to_have_text(re.compile(rf"^You are muted here until {TIME}.*\((9|10) min left\)"))
    await expect(mod.page.locator("#muted-line")).to_be_hidden()

    # A message is refused by the server and comes back into the box.
    await other.box.fill("may I speak?")
    await other.box.press("Enter")
    await expect(other.page.locator("#text-error")).to_contain_text("you are muted here")
    await expect(other.box).to_have_value("may I speak?")
    await expect(other.pending).to_have_count(0)
    await expect(mod.message("may I speak?")).to_have_count(0)

    # Unmute, by keyboard: the name's button, Enter, the arrow keys to "Unmute", Enter.
    who = mod.message("first words").locator(".who")
    await who.focus()
    await who.press("Enter")
    await expect(menu.get_by_role("button", name="Mute 10 min")).to_be_focused()
    await mod.page.keyboard.press("ArrowDown")
    await mod.page.keyboard.press("ArrowDown")
    await expect(menu.get_by_role("button", name="Unmute")).to_be_focused()
    await mod.page.keyboard.press("Enter")
    await expect(menu).to_be_hidden()
    await expect(who).to_be_focused()
    for chat in (mod, other):
        await expect(moderation_lines(chat)).to_have_text([line, f"{other.name} was unmuted by {mod.name}"])
    await expect(muted).to_be_hidden()
    await other.box.press("Enter")
    await expect(other.box).to_have_value("")
    await expect(mod.message("may I speak?")).to_have_count(1)
    mod.assert_clean()
    other.assert_clean()


async def test_a_ban_from_the_room_sends_the_page_back_to_the_form_and_it_does_not_reconnect(
    browser: Browser, stack: Stack, room: str
) -> None:
    mod, other = await moderator_and_other(browser, stack, room)
    joins = joins_of(other.page)

    # From the online list this time.
    await mod.page.locator("#online .name-button", has_text=other.name).click()
    await mod.page.locator("#name-menu").get_by_role("button", name="Ban from room (1 day)").click()
    await expect(moderation_lines(mod)).to_have_text([f"{other.name} was banned from the room for 1 day by {mod.name}"])

    await expect(other.page.locator("#join-view")).to_be_visible()
    await expect(other.name_error).to_have_text(
        re.compile(rf"^A moderator banned this name from this room until (\w+ \d+, )?{TIME}")
    )
    await expect(other.status).to_have_attribute("data-state", "offline")
    # The room sees the name go, and it does not come back: no join was tried after the close (4003).
    await expect(mod.page.locator("#online li")).to_have_text([f"{mod.name} (you)"])
    assert joins == [], joins

    # Joining again by hand is refused (`banned`), said the same way, and tried once.
    await other.join()
    await expect(other.name_error).to_have_text(re.compile(r"^A moderator banned this name from this room until "))
    await expect(other.page.locator("#join-view")).to_be_visible()
    assert len(joins) == 1, joins
    mod.assert_clean()
    other.assert_clean()


async def test_slow_mode_shows_for_everyone_and_a_message_too_soon_stays_in_the_composer(
    browser: Browser, stack: Stack, room: str
) -> None:
    mod, other = await moderator_and_other(browser, stack, room)
    await mod.page.get_by_label("Slow mode", exact=True).select_option("10")
    line = f"{mod.name} turned slow mode on: one message every 10 s"
    for chat in (mod, other):
        await expect(moderation_lines(chat)).to_have_text([line])
    slow = other.page.locator("#slow-line")
    await expect(slow).to_have_text("Slow mode: one message every 10 s.")
    # A reload is told by its welcome (`slow_seconds`).
    await navigate(other.page)
    await other.wait_online()
    await expect(slow).to_have_text("Slow mode: one message every 10 s.")

    await other.say("one")
    await expect(mod.message("one")).to_have_count(1)
    await other.box.fill("two, too soon")
    await other.box.press("Enter")
    await expect(other.page.locator("#text-error")).to_have_text(
        re.compile(r"^Slow mode: you can send again in (\d|10) s\. Your message is back in the box\.$")
    )
    await expect(other.box).to_have_value("two, too soon")
    await expect(other.pending).to_have_count(0)

    await mod.page.get_by_label("Slow mode", exact=True).select_option("0")
    off = f"{mod.name} turned slow mode off"
    await expect(moderation_lines(mod)).to_have_text([line, off])
    await expect(moderation_lines(other)).to_have_text([off])  # the lines are live only: not in the reload's history
    await expect(slow).to_be_hidden()
    await other.box.press("Enter")
    await expect(mod.message("two, too soon")).to_have_count(1)
    mod.assert_clean()
    other.assert_clean()


async def test_no_tools_for_others_a_wrong_token_is_refused_and_a_reason_with_markup_stays_text(
    browser: Browser, stack: Stack, room: str
) -> None:
    mod, other = await moderator_and_other(browser, stack, room)
    await mod.say("moderator here")
    await other.say("hi")
    await expect(other.texts).to_have_text(["moderator here", "hi"])

    # Not a moderator: no Delete on someone else's message, names are not buttons, no slow-mode control, no badge.
    await other.open_menu("moderator here")
    await expect(other.page.locator("#menu-delete")).to_be_hidden()
    await other.page.keyboard.press("Escape")
    await expect(other.page.locator(".name-button")).to_have_count(0)
    await expect(other.page.locator("#mod-bar")).to_be_hidden()
    await expect(other.page.locator("#moderator-badge")).to_be_hidden()

    # The moderator on a phone: the name menu is a sheet with 40 px targets; the reason is markup, shown as text.
    await mod.page.set_viewport_size(PHONE)
    await mod.page.emulate_media(color_scheme="dark")
    await mod.page.get_by_role("button", name="2 online").click()
    await mod.page.locator("#online .name-button", has_text=other.name).click()
    menu = mod.page.locator("#name-menu")
    await expect(menu).to_have_class(re.compile(r"\bsheet\b"))
    await expect(menu).to_be_in_viewport()
    for button in await menu.get_by_role("button").all():
        box = await button.bounding_box()
        assert box is not None
        assert box["height"] >= 40, box
    await menu.get_by_label("Reason (optional, everyone sees it)").fill(XSS)
    await menu.get_by_role("button", name="Mute 1 hour").click()
    line = f"{other.name} was muted for 1 hour by {mod.name} ({XSS})"
    for chat in (mod, other):
        await expect(moderation_lines(chat)).to_have_text([line])
        await expect(chat.page.locator("#messages img")).to_have_count(0)

    # A made-up moderator token: back to the form with the reason on its field, the token dropped.
    stranger = await ChatPage.arrive(browser, stack, name=unique("carol"), room=room)
    joins = joins_of(stranger.page)
    await stranger.page.get_by_text("I am a moderator").click()
    field = stranger.page.get_by_label("Moderator token", exact=True)
    await field.fill("not-a-moderator-token")
    await stranger.join()
    await expect(stranger.page.locator("#moderator-error")).to_have_text(
        re.compile(r"^That is not a moderator token of this chat\.")
    )
    await expect(field).to_have_attribute("aria-invalid", "true")
    await expect(field).to_be_focused()
    await expect(field).to_have_value("")
    assert await stranger.page.evaluate(f"() => sessionStorage.getItem({MODERATOR_KEY!r})") is None
    await stranger.join()
    await stranger.joined()
    await expect(stranger.page.locator("#moderator-badge")).to_be_hidden()
    assert [join.get("moderator") for join in joins] == ["not-a-moderator-token", None], joins
    for chat in (mod, other, stranger):
        chat.assert_clean()
