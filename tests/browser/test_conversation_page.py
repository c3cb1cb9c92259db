"""The page's conversation features in Chromium, through nginx, with people on both replicas (issue 15): edits and
deletions, the typing indicator, reactions, mentions and the hidden tab's title, markup in an edit, the Up arrow, an
edit refused as too late, and a page that was away applying what changed meanwhile."""

from __future__ import annotations

import json
import re

from pages import PHONE, XSS, ChatPage, Gate, joins_of, navigate
from playwright.async_api import Browser, WebSocketRoute, expect

from support.chat import ChatClient, Obj
from support.stack import Stack


async def two_on_different_replicas(browser: Browser, stack: Stack, room: str) -> tuple[ChatPage, ChatPage]:
    alice = await ChatPage.open(browser, stack, name="alice", room=room)
    bob = await ChatPage.open(browser, stack, name="bob", room=room)
    await bob.move_off(await alice.replica())
    return alice, bob


async def change(client: ChatClient, frame: Obj) -> Obj:
    """Sends an edit, delete or react through the protocol and returns the change the room got."""
    ref = f"t-{len(client.objects)}"
    start = len(client.objects)
    await client.send({**frame, "ref": ref})
    answer = await client.wait_for(lambda o: o.get("ref") == ref, start=start)
    assert answer["type"] in ("edit", "delete", "reaction"), answer
    return answer


async def said(client: ChatClient, text: str) -> Obj:
    reply = await client.say_and_wait(text, ref=f"s-{len(client.objects)}")
    assert reply["type"] == "message", reply
    return reply


async def test_an_edit_and_a_deletion_on_one_replica_show_on_the_other_and_in_its_history(
    browser: Browser, stack: Stack, room: str
) -> None:
    alice, bob = await two_on_different_replicas(browser, stack, room)
    for text in ("the deploy is at 9", "wrong room, sorry", "see you there"):
        await alice.say(text)
    await expect(bob.texts).to_have_text(["the deploy is at 9", "wrong room, sorry", "see you there"])
    # Only one's own messages can be edited or deleted: bob's menu on alice's message offers reactions alone.
    await bob.open_menu("the deploy is at 9")
    await expect(bob.page.locator("#menu-edit")).to_be_hidden()
    await expect(bob.page.locator("#menu-delete")).to_be_hidden()
    await bob.page.keyboard.press("Escape")
    await expect(bob.menu).to_be_hidden()

    await alice.edit("the deploy is at 9", "the deploy is at 10")
    await alice.delete("wrong room, sorry")

    async def shows_the_changes(chat: ChatPage) -> None:
        await expect(chat.texts).to_have_text(["the deploy is at 10", "see you there"])
        edited = chat.message("the deploy is at 10").locator(".edited")
        await expect(edited).to_have_text("(edited)")
        await expect(edited).to_have_attribute("title", re.compile(r"^Edited \w"))
        await expect(chat.page.locator("#messages .msg.deleted")).to_have_text(["message deleted"])
        # The tombstone keeps the message's place: between the two others.
        await expect(chat.page.locator("#messages .msg").nth(1)).to_have_class(re.compile(r"\bdeleted\b"))

    await shows_the_changes(bob)
    await shows_the_changes(alice)
    # A late joiner's history shows each message as it now is.
    await navigate(bob.page)
    await bob.wait_online()
    await shows_the_changes(bob)
    alice.assert_clean()
    bob.assert_clean()


async def test_typing_shows_for_the_others_and_ends_when_the_typist_stops_or_sends(
    browser: Browser, stack: Stack, room: str
) -> None:
    alice, bob = await two_on_different_replicas(browser, stack, room)
    await alice.box.press_sequentially("I am wri")
    await expect(bob.typing).to_have_text("alice is typing…")
    await expect(bob.page.locator("#typing-announce")).to_have_text("alice is typing…")
    await expect(bob.page.locator("#typing-announce")).to_have_attribute("aria-live", "polite")
    # One's own typing is not shown to oneself (the server's list names alice to her too).
    await expect(alice.typing).to_be_empty()
    # She stops: the server lets her typing lapse, and the line empties.
    await expect(bob.typing).to_be_empty()

    await alice.box.press_sequentially("ting more")
    await expect(bob.typing).to_have_text("alice is typing…")
    await alice.box.press("Enter")
    await expect(bob.message("I am writing more")).to_have_count(1)
    # At once with her message: well before her typing would lapse (5 s after her last notice).
    await expect(bob.typing).to_be_empty(timeout=2000)

    # Several people: the first name and how many others, whoever is the most recent.
    others = [await ChatClient.open(stack.ws_url) for _ in range(2)]
    try:
        for name, client in zip(("carol", "dave"), others, strict=True):
            await client.join(name, room)
            await client.send({"type": "typing"})
        await alice.box.press_sequentially("and another")
        await expect(bob.typing).to_have_text(re.compile(r"^(alice|carol|dave) and 2 others are typing…$"))
    finally:
        for client in others:
            await client.close()
    alice.assert_clean()
    bob.assert_clean()


async def test_a_reaction_toggles_with_its_count_and_own_highlight_on_both_pages(
    browser: Browser, stack: Stack, room: str
) -> None:
    carol = await ChatClient.open(stack.ws_url)
    await carol.join("carol", room)
    await said(carol, "ship it?")
    alice, bob = await two_on_different_replicas(browser, stack, room)

    await bob.react("ship it?", "👍")
    for chat, own in ((bob, "true"), (alice, "false")):
        await expect(chat.reaction("ship it?", "👍")).to_have_text("👍1")
        await expect(chat.reaction("ship it?", "👍")).to_have_attribute("aria-pressed", own)
    await expect(alice.reaction("ship it?", "👍")).to_have_attribute("title", "bob")

    # A click on the chip adds one's own; another takes it away.
    await alice.reaction("ship it?", "👍").click()
    for chat in (alice, bob):
        await expect(chat.reaction("ship it?", "👍")).to_have_text("👍2")
        await expect(chat.reaction("ship it?", "👍")).to_have_attribute("aria-pressed", "true")
    await expect(alice.reaction("ship it?", "👍")).to_have_attribute("title", "bob and you")
    await expect(bob.reaction("ship it?", "👍")).to_have_attribute("title", "you and alice")
    await bob.reaction("ship it?", "👍").click()
    for chat, own in ((alice, "true"), (bob, "false")):
        await expect(chat.reaction("ship it?", "👍")).to_have_text("👍1")
        await expect(chat.reaction("ship it?", "👍")).to_have_attribute("aria-pressed", own)

    # By keyboard: the message's "⋯" is a button in the tab order; Enter opens the menu on its first emoji, arrows
    # move, Enter picks, and focus goes back to the "⋯".
    more = bob.message("ship it?").locator(".more")
    await more.focus()
    await bob.page.keyboard.press("Enter")
    await expect(bob.menu.get_by_role("button", name="React with 👍")).to_be_focused()
    await bob.page.keyboard.press("ArrowRight")
    await bob.page.keyboard.press("ArrowRight")
    await expect(bob.menu.get_by_role("button", name="React with ❤️")).to_be_focused()
    await bob.page.keyboard.press("Enter")
    await expect(bob.menu).to_be_hidden()
    await expect(more).to_be_focused()
    await expect(alice.reaction("ship it?", "❤️")).to_have_text("❤️1")
    await expect(bob.reaction("ship it?", "❤️")).to_have_attribute("aria-pressed", "true")

    # The other page's view survives a reload: the history's reactions, with one's own still highlighted.
    await navigate(alice.page)
    await alice.wait_online()
    await expect(alice.message("ship it?").locator(".reaction")).to_have_text(["👍1", "❤️1"])
    await expect(alice.reaction("ship it?", "👍")).to_have_attribute("aria-pressed", "true")
    await expect(alice.reaction("ship it?", "❤️")).to_have_attribute("aria-pressed", "false")
    # The last one off: the chip goes, on both pages.
    await alice.reaction("ship it?", "👍").click()
    for chat in (alice, bob):
        await expect(chat.reaction("ship it?", "👍")).to_have_count(0)
    await carol.close()
    alice.assert_clean()
    bob.assert_clean()


async def test_a_mention_is_highlighted_and_the_hidden_tab_counts_messages_and_mentions(
    browser: Browser, stack: Stack, room: str
) -> None:
    alice, bob = await two_on_different_replicas(browser, stack, room)
    await bob.set_hidden(True)
    await alice.say("morning all")
    await alice.say("@bob can you look at the logs?")
    await expect(bob.page).to_have_title(f"(2 · @1) #{room} · Infinite Chat")
    mention = bob.message("@bob can you look at the logs?")
    await expect(mention).to_have_class(re.compile(r"\bmentions-me\b"))
    await expect(mention.locator(".mention.me")).to_have_text("@bob")
    await expect(bob.message("morning all")).not_to_have_class(re.compile(r"\bmentions-me\b"))
    # Back in front: the count clears.
    await bob.set_hidden(False)
    await expect(bob.page).to_have_title(f"#{room} · Infinite Chat")
    # Alice sees her mention of bob marked as one, but not as hers.
    await expect(alice.message("@bob can you look at the logs?").locator(".mention")).to_have_class("mention")
    await expect(alice.message("@bob can you look at the logs?")).not_to_have_class(re.compile(r"\bmentions-me\b"))
    # Hidden again: messages only, no mention.
    await bob.set_hidden(True)
    await alice.say("never mind")
    await expect(bob.page).to_have_title(f"(1) #{room} · Infinite Chat")
    alice.assert_clean()
    bob.assert_clean()


async def test_markup_in_an_edit_is_shown_as_text_and_runs_nothing(browser: Browser, stack: Stack, room: str) -> None:
    mallory = await ChatPage.open(browser, stack, name="mallory", room=room)
    victim = await ChatPage.open(browser, stack, name="victim", room=room)
    await mallory.say("harmless words")
    await expect(victim.message("harmless words")).to_have_count(1)
    await mallory.edit("harmless words", XSS)

    async def shows_markup_as_text(chat: ChatPage) -> None:
        await expect(chat.texts).to_have_text([XSS])
        await expect(chat.message(XSS).locator(".edited")).to_have_text("(edited)")
        await expect(chat.page.locator("#chat-view img, #chat-view script")).to_have_count(0)

    await shows_markup_as_text(victim)
    await navigate(victim.page)
    await victim.wait_online()
    await shows_markup_as_text(victim)
    await shows_markup_as_text(mallory)
    await victim.say("nothing happened")
    await expect(mallory.message("nothing happened")).to_have_count(1)
    mallory.assert_clean()
    victim.assert_clean()


async def test_up_arrow_in_an_empty_composer_edits_the_last_own_message(
    browser: Browser, stack: Stack, room: str
) -> None:
    alice, bob = await two_on_different_replicas(browser, stack, room)
    await alice.say("one")
    await alice.say("two")
    # Bob speaks once the room has her two: sent from another replica at the same moment, his could come first.
    await expect(bob.texts).to_have_text(["one", "two"])
    await bob.say("three")
    await expect(alice.texts).to_have_text(["one", "two", "three"])
    editing = alice.page.locator("#editing")

    # Up edits "two" (bob's "three" is not hers); Escape gives up and changes nothing.
    await alice.box.press("ArrowUp")
    await expect(editing).to_be_visible()
    await expect(editing).to_contain_text("Editing message")
    await expect(alice.box).to_have_value("two")
    await expect(alice.message("two")).to_have_class(re.compile(r"\bbeing-edited\b"))
    await expect(alice.page.locator("#send")).to_have_text("Save")
    await alice.box.press("Escape")
    await expect(editing).to_be_hidden()
    await expect(alice.box).to_have_value("")
    await expect(alice.page.locator("#send")).to_have_text("Send")

    # Up, change it, Enter saves; bob sees the edit.
    await alice.box.press("ArrowUp")
    await expect(alice.box).to_have_value("two")
    await alice.box.fill("two, and a half")
    await alice.box.press("Enter")
    await expect(editing).to_be_hidden()
    await expect(bob.texts).to_have_text(["one", "two, and a half", "three"])
    await expect(bob.message("two, and a half").locator(".edited")).to_have_text("(edited)")

    # With a draft in the box, Up is the cursor's; editing from the menu keeps the draft for afterwards.
    await alice.box.fill("a draft")
    await alice.box.press("ArrowUp")
    await expect(editing).to_be_hidden()
    await alice.edit("one", "one, edited")
    await expect(alice.box).to_have_value("a draft")
    await expect(bob.message("one, edited")).to_have_count(1)
    alice.assert_clean()
    bob.assert_clean()


class RefusedEdits:
    """Between a page and its replica: passes every frame both ways but the page's edits, which it answers itself
    with `edit_window_closed`, as the server does 15 minutes after a message (too long for a test to wait)."""

    def route(self, socket: WebSocketRoute) -> None:
        server = socket.connect_to_server()

        def from_page(frame: str | bytes) -> None:
            obj = json.loads(frame) if isinstance(frame, str) else {}
            if obj.get("type") == "edit":
                detail = "That message is too old to edit now."
                socket.send(
                    json.dumps({"type": "error", "code": "edit_window_closed", "detail": detail, "ref": obj["ref"]})
                )
            else:
                server.send(frame)

        socket.on_message(from_page)


async def test_an_edit_past_the_window_says_so_on_the_message_and_offers_it_as_a_new_one(
    browser: Browser, stack: Stack, room: str
) -> None:
    alice = await ChatPage.open(browser, stack, name="alice", room=room, socket_route=RefusedEdits().route)
    await alice.say("a typo hree")
    await alice.edit("a typo hree", "a typo here")
    note = alice.message("a typo hree").locator(".change-note")
    await expect(note).to_contain_text("Edit not saved: too late to edit: a message can be edited for 15 minutes")
    # The menu no longer offers Edit, and says why.
    await alice.open_menu("a typo hree")
    await expect(alice.page.locator("#menu-edit")).to_be_hidden()
    await expect(alice.page.locator("#menu-note")).to_have_text(re.compile(r"^Editing is over"))
    await alice.page.keyboard.press("Escape")
    # The text typed for the edit is not lost.
    await note.get_by_role("button", name="Send as a new message").click()
    await expect(alice.box).to_have_value("a typo here")
    await alice.box.press("Enter")
    await expect(alice.texts).to_have_text(["a typo hree", "a typo here"])
    alice.assert_clean()


async def test_a_page_that_was_away_applies_what_changed_meanwhile_once_and_resumes_after_the_newest_change(
    browser: Browser, stack: Stack, room: str
) -> None:
    bob = await ChatClient.open(stack.ws_url)
    await bob.join("bob", room)
    first = await said(bob, "first version")
    doomed = await said(bob, "this goes")
    async with Gate(stack.http_port) as gate:
        alice = await ChatPage.open(browser, stack, name="alice", room=room, base_url=gate.base_url)
        joins = joins_of(alice.page)
        await expect(alice.texts).to_have_text(["first version", "this goes"])
        await alice.react("first version", "🎉")
        await expect(alice.reaction("first version", "🎉")).to_have_attribute("aria-pressed", "true")
        hers = await bob.wait_for(lambda o: o["type"] == "reaction" and o["name"] == "alice")

        # Alice's network goes; meanwhile bob edits, reacts, deletes and says something.
        gate.shut = True
        gate.cut()
        await expect(alice.status).to_have_attribute("data-state", "reconnecting")
        await change(bob, {"type": "edit", "id": first["id"], "text": "second version"})
        await change(bob, {"type": "react", "id": first["id"], "emoji": "🎉", "on": True})
        await change(bob, {"type": "delete", "id": doomed["id"]})
        await said(bob, "welcome back")
        newest = await change(bob, {"type": "react", "id": first["id"], "emoji": "🚀"})
        gate.shut = False
        await alice.wait_online()

        await expect(alice.texts).to_have_text(["second version", "welcome back"])
        await expect(alice.message("second version").locator(".edited")).to_have_text("(edited)")
        await expect(alice.message("second version").locator(".reaction")).to_have_text(["🎉2", "🚀1"])
        await expect(alice.reaction("second version", "🎉")).to_have_attribute("aria-pressed", "true")
        await expect(alice.page.locator("#messages .msg.deleted")).to_have_text(["message deleted"])
        # She came back after the newest entry of the log she had seen: her reaction, not the message before it.
        assert [join.get("since") for join in joins] == [hers["id"]], joins

        # Away and back again with nothing new: nothing is applied twice.
        gate.shut = True
        gate.cut()
        await expect(alice.status).to_have_attribute("data-state", "reconnecting")
        gate.shut = False
        await alice.wait_online()
        assert [join.get("since") for join in joins] == [hers["id"], newest["id"]], joins
        await bob.say("still here")
        await expect(alice.texts).to_have_text(["second version", "welcome back", "still here"])
        await expect(alice.message("second version").locator(".reaction")).to_have_text(["🎉2", "🚀1"])
        await expect(alice.page.locator("#messages .msg.deleted")).to_have_count(1)
        alice.assert_clean()
    await bob.close()


async def test_on_a_phone_a_long_press_opens_the_menu_as_a_sheet_with_large_targets(
    browser: Browser, stack: Stack, room: str
) -> None:
    alice = await ChatPage.open(browser, stack, name="alice", room=room, viewport=PHONE)
    await alice.say("tap and hold me")
    text = alice.message("tap and hold me").locator(".text")
    box = await text.bounding_box()
    assert box is not None
    point = {"pointerType": "touch", "isPrimary": True, "clientX": box["x"] + 5, "clientY": box["y"] + 5}
    await text.dispatch_event("pointerdown", point)
    await expect(alice.menu).to_be_visible()
    await expect(alice.menu).to_have_class(re.compile(r"\bsheet\b"))
    for button in await alice.menu.locator("button:visible").all():
        size = await button.bounding_box()
        assert size is not None
        assert size["height"] >= 40, (await button.text_content(), size)
    more = await alice.message("tap and hold me").locator(".more").bounding_box()
    assert more is not None
    assert min(more["width"], more["height"]) >= 40, more
    await alice.menu.get_by_role("button", name="React with 🔥").click()
    await expect(alice.reaction("tap and hold me", "🔥")).to_have_attribute("aria-pressed", "true")
    alice.assert_clean()
