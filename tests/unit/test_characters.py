"""What a name or a text may hold (characters.py): nothing invisible, blank or reversed; everything people write."""

from __future__ import annotations

import pytest

from infinite_chat.characters import name_problem, text_problem


@pytest.mark.parametrize(
    "name",
    [
        "alice",
        "Zoë",
        "O'Brien-Smith",
        "李小龙",
        "مريم",
        "हिन्दी",
        "👨\u200d👩\u200d👧",
        "❤\ufe0f fan",
        "🏳\ufe0f\u200d🌈",
        "a b",
    ],
)
def test_names_people_use_are_accepted(name: str) -> None:
    assert name_problem(name) is None


@pytest.mark.parametrize(
    "name",
    [
        "\u200b",  # zero-width space (format)
        "\u3164",  # Hangul filler (a letter that draws nothing)
        "\u2800",  # Braille blank
        "\u115f",  # Hangul choseong filler
        "alice\u200b",  # a look-alike of "alice" in the online list
        "alice\u00ad",  # soft hyphen
        "\u202enimda",  # shows as "admin"
        "bob\u200e",  # a direction mark
        "\u0301abc",  # starts with a combining mark
        "bob\ue000",  # private use
        "bob\U000e0041",  # tag character
        "bob\u0378",  # unassigned
        "a\u200db",  # a joiner that joins no emoji
        "😀\u200d",  # a joiner at the end
        "a\ufe0f",  # a presentation selector after a letter
        "bell\x07",
        "line\u2028break",
    ],
)
def test_invisible_reversed_and_unassigned_characters_are_refused_in_names(name: str) -> None:
    assert name_problem(name) is not None


@pytest.mark.parametrize(
    "text",
    [
        "hello",
        "مرحبا بالعالم",
        "a\u200bb",  # a zero-width space among visible characters
        "shaking face \U0001fae8",  # newer than Python's Unicode tables: unassigned here, visible on phones
        "\U0001fae8",
        "line one\nline two\tand a tab",
        "א\u200fb",  # a right-to-left mark (a mark, not an override)
        "e\u0301",
    ],
)
def test_texts_people_write_are_accepted(text: str) -> None:
    assert text_problem(text) is None


@pytest.mark.parametrize(
    "text",
    [
        "\u200b\u200b",
        "\u3164",
        "\u2800\u2800",
        "\u200b \u2800 \u3164",
        "\u0301",
        "\ufe0f",
        "see \u202egnp.exe",  # shows as "exe.png"
        "\u202a embedded",
        "isolated \u2066text\u2069",
        "bell\x07",
        "carriage\rreturn",
        "para\u2029graph",
    ],
)
def test_blank_and_reversing_texts_are_refused(text: str) -> None:
    assert text_problem(text) is not None
