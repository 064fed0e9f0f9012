"""Text people type and lab systems send, kept in one form, so a search finds what it looks like.

The same letters come in more than one Unicode form: "ü" as one code point, as typed, or as "u"
and a combining mark, as a Mac's file names and what is pasted from them hold it. Invisible format
characters (a zero-width space pasted along with a reference, a right-to-left override that shows
"PT-\u202e0321" as "PT-1230") make text look like other text, which is no way to name a patient's
sample.
"""

import unicodedata


def composed(text: str) -> str:
    """Unicode's composed form (NFC): what is stored and what is searched for compare equal."""
    return unicodedata.normalize("NFC", text)


def plain_line(text: str) -> str:
    """One line of text in composed form, without control or invisible format characters: a tab or
    a line break becomes a space. Composed once they are gone: a zero-width space between a letter
    and its accent kept them apart."""
    kept = (" " if ch.isspace() else ch for ch in text)
    return composed("".join(ch for ch in kept if unicodedata.category(ch) not in ("Cc", "Cf"))).strip()
