"""clean_text: mojibake repair, whitespace normalisation, the ASCII fast path."""

from __future__ import annotations

import pytest

from dialogtune import textfix
from dialogtune.textfix import clean_text


@pytest.mark.parametrize(("raw", "clean"), [
    ("I wouldnâ€™t do that.", "I wouldn't do that."),
    ("Itâ€™s â€œfineâ€\x9d", 'It\'s "fine"'),
    ("cafÃ© au lait", "café au lait"),
    ("I donâ€™t know â€” maybe", "I don't know — maybe"),
])
def test_mojibake_is_repaired(raw, clean):
    assert clean_text(raw) == clean


def test_curly_quotes_are_straightened_and_text_is_nfc():
    assert clean_text("don’t") == "don't"
    assert clean_text("cafe\u0301") == "café"  # combining accent composed (NFC)
    assert clean_text("cafe\u0301") == "caf\u00e9"


@pytest.mark.parametrize(("raw", "clean"), [
    ("  hello   world  ", "hello world"),
    ("tabs\tand\u00a0no-break\u2003spaces", "tabs and no-break spaces"),
    ("line one  \n  line two", "line one\nline two"),
    ("a\r\nb\rc", "a\nb\nc"),
    ("para one\n\n\n\n\npara two", "para one\n\npara two"),
    ("para one \n \n para two", "para one\n\npara two"),
    ("\n\n  only text \n", "only text"),
    (" \t\r\n ", ""),
])
def test_whitespace(raw, clean):
    assert clean_text(raw) == clean


def test_single_newlines_are_kept():
    assert clean_text("Roses are red\nviolets are blue") == "Roses are red\nviolets are blue"


def test_ascii_text_skips_ftfy(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("ftfy called on ASCII text")

    monkeypatch.setattr(textfix.ftfy, "fix_text", fail)
    assert clean_text("Plain  ASCII,\tnothing to fix. ") == "Plain ASCII, nothing to fix."
    with pytest.raises(AssertionError, match="ftfy called"):
        clean_text("naïve")


def test_html_entities_come_out_the_same_with_or_without_non_ascii():
    assert clean_text("Tom &amp; Jerry") == "Tom &amp; Jerry"
    assert clean_text("Tom &amp; Jerry — café") == "Tom &amp; Jerry — café"
