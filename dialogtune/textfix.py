"""Repair and normalise text once, at read time, so nothing downstream has to."""

from __future__ import annotations

import re

import ftfy

_SPACES = re.compile(r"[ \t\r\f\v\u00a0\u2000-\u200a\u202f\u205f\u3000]+")
_NEWLINES = re.compile(r" ?\n ?")
_BLANK_RUNS = re.compile(r"\n{3,}")


def clean_text(text: str) -> str:
    """Fix mojibake (`â€™` -> `'`), collapse runs of spaces, keep single line breaks.

    ftfy is only consulted for non-ASCII text: pure ASCII cannot hold mojibake, and
    skipping it keeps reading fast on the (mostly ASCII) corpora people train on.
    """
    if text.isascii():
        # isprintable() is False for tabs and line breaks: a one-pass check in C.
        if text.isprintable() and "  " not in text:
            return text.strip()  # the common case: nothing to repair or collapse
    else:
        # unescape_html=False: ftfy would decode `&amp;` only in texts that also hold a
        # non-ASCII character, so the same entity would come out two ways depending on the line.
        text = ftfy.fix_text(text, normalization="NFC", unescape_html=False)
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _SPACES.sub(" ", text)
    if "\n" in text:
        text = _BLANK_RUNS.sub("\n\n", _NEWLINES.sub("\n", text))
    return text.strip()
