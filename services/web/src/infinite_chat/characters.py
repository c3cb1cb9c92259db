"""Which characters a name or a message text may hold: nothing that makes it invisible, blank or reversed.

A name must be seen to be told apart, so it is held to more than a text: no control, format, unassigned,
private-use or invisible character at all, except the joiner and variation selector inside emoji sequences
(👨‍👩‍👧, ❤️). A text only has to show something: it may carry invisible characters among visible ones (a zero-width
space as a line-break hint), but not consist of them, and never the bidirectional overrides, embeddings and
isolates that can reverse what follows (U+202A-U+202E, U+2066-U+2069: "Trojan Source", CVE-2021-42574).
Unassigned code points are refused in names only: Python's Unicode tables are older than the newest emoji that
phones send, and a text made of one of those is not blank. Look-alike folding ("аlice" with a Cyrillic а) is not
done here. The rules are in docs/protocol.md.
"""

from __future__ import annotations

import unicodedata

# Unicode's Default_Ignorable_Code_Point (DerivedCoreProperties.txt): characters a renderer shows as nothing.
DEFAULT_IGNORABLE = (
    (0x00AD, 0x00AD),
    (0x034F, 0x034F),
    (0x061C, 0x061C),
    (0x115F, 0x1160),
    (0x17B4, 0x17B5),
    (0x180B, 0x180F),
    (0x200B, 0x200F),
    (0x202A, 0x202E),
    (0x2060, 0x206F),
    (0x3164, 0x3164),
    (0xFE00, 0xFE0F),
    (0xFEFF, 0xFEFF),
    (0xFFA0, 0xFFA0),
    (0xFFF0, 0xFFF8),
    (0x1BCA0, 0x1BCA3),
    (0x1D173, 0x1D17A),
    (0xE0000, 0xE0FFF),
)
# Not ignorable, but drawn as an empty cell: the Braille blank, and the null notehead.
BLANK = frozenset({0x2800, 0x1D159})
# Can reverse the text after them, even past the end of a message: never allowed.
BIDI_CONTROLS = frozenset(range(0x202A, 0x202F)) | frozenset(range(0x2066, 0x206A))
LINE_BREAKS = frozenset({0x2028, 0x2029})
ZERO_WIDTH_JOINER = 0x200D
EMOJI_PRESENTATION = 0xFE0F
# Categories a name never holds: control, format, unassigned, private use, surrogate, line and paragraph separator.
REFUSED_IN_NAMES = frozenset({"Cc", "Cf", "Cn", "Co", "Cs", "Zl", "Zp"})


def _ignorable(point: int) -> bool:
    if point < 0x00AD:
        return False
    return any(low <= point <= high for low, high in DEFAULT_IGNORABLE)


def _visible(char: str) -> bool:
    """Draws something by itself: not a space, not invisible, not blank, not a mark riding on another character."""
    point = ord(char)
    if char.isspace() or _ignorable(point) or point in BLANK:
        return False
    category = unicodedata.category(char)
    return category[0] not in "CMZ" or category == "Cn"


def name_problem(name: str) -> str | None:
    """Why `name` (already trimmed) cannot be a name, or None when it can."""
    if name.isascii():
        return None if name.isprintable() else "A name cannot contain control characters such as newlines."
    if not _visible(name[0]):
        return "A name must start with a visible character."
    for index, char in enumerate(name):
        point = ord(char)
        if point in (ZERO_WIDTH_JOINER, EMOJI_PRESENTATION) and _inside_emoji(name, index):
            continue
        category = unicodedata.category(char)
        if category in REFUSED_IN_NAMES or _ignorable(point) or point in BLANK:
            if category == "Cc" or point in LINE_BREAKS:
                return "A name cannot contain control characters such as newlines."
            return f"A name cannot contain invisible, unassigned or direction-changing characters (U+{point:04X})."
    return None


def _inside_emoji(name: str, index: int) -> bool:
    """The joiner between two emoji (👨‍👩‍👧), or the presentation selector right after one (❤️)."""
    before = name[index - 1] if index > 0 else ""
    if ord(name[index]) == EMOJI_PRESENTATION:
        return bool(before) and unicodedata.category(before) == "So"
    after = name[index + 1] if index + 1 < len(name) else ""
    emoji_before = bool(before) and (unicodedata.category(before) == "So" or ord(before) == EMOJI_PRESENTATION)
    return emoji_before and bool(after) and unicodedata.category(after) == "So"


def text_problem(text: str) -> str | None:
    """Why `text` (already trimmed, within its length) cannot be a message, or None when it can."""
    if text.isascii() and text.isprintable():
        return None
    visible = False
    for char in text:
        point = ord(char)
        if point < 0x20 or 0x7F <= point <= 0x9F or point in LINE_BREAKS:
            if char not in "\n\t":
                return "A message cannot contain control characters."
        elif point in BIDI_CONTROLS:
            return f"A message cannot contain characters that reverse the text after them (U+{point:04X})."
        elif not visible and _visible(char):
            visible = True
    if not visible:
        return "A message needs some visible text."
    return None
