"""Tokens located by their byte lengths exactly as by the tokenizer's offsets, and the
tokenizers and texts where byte lengths do not apply fall back to offsets."""

from __future__ import annotations

import numpy as np
import pytest

from dialogtune.locate import Located, TokenBytes, char_byte_offsets
from dialogtune.tasks import Example, message
from dialogtune.templates import resolve_template
from dialogtune.tokenize import IGNORE_INDEX, ExampleEncoder, TokenizeStats

TRICKY = [
    "Café crème, naïve résumé.",  # 2-byte characters
    "Party time 🎉🎉 right now",  # 4-byte characters, split across byte tokens
    "東京へ行きます。",  # 3-byte characters, none in the vocabulary
    "  leading spaces and trailing  ",
    "a   run    of     spaces",
    "\n\nstarts with blank lines",
    "tab\tinside and \u00a0nbsp",
    "<|im_end|> typed by a user",  # an added token inside content
]


def tricky_example(content: str) -> Example:
    return Example([message("system", "Be brief."), message("user", content),
                    message("assistant", content, train=True), message("user", "ok"),
                    message("assistant", "Done é.", train=True)], "t", "t", "t.jsonl", 1)


def encode_both_ways(tokenizer, examples: list[Example]):
    """(by byte lengths where they apply, by offsets always)."""
    template = resolve_template("chatml", tokenizer)
    return [list(ExampleEncoder(tokenizer, template, 4096, by_offsets=by_offsets).encode(examples, TokenizeStats()))
            for by_offsets in (False, True)]


def assert_same_pieces(got, expected):
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a.input_ids.tolist() == b.input_ids.tolist()
        assert a.labels.tolist() == b.labels.tolist()


@pytest.mark.parametrize("content", TRICKY)
def test_byte_lengths_locate_tokens_exactly_as_offsets_do(byte_tokenizer, content):
    encoder = ExampleEncoder(byte_tokenizer, resolve_template("chatml", byte_tokenizer), 4096)
    assert encoder.locator.token_bytes is not None  # the byte path is the one under test
    got, expected = encode_both_ways(byte_tokenizer, [tricky_example(content)])
    assert_same_pieces(got, expected)
    runs = byte_tokenizer.decode(got[0].input_ids[got[0].labels != IGNORE_INDEX].tolist())
    assert runs == content + "<|im_end|>" + "Done é.<|im_end|>"


def test_byte_lengths_only_for_byte_level_tokenizers(byte_tokenizer, metaspace_tokenizer):
    assert TokenBytes.of(byte_tokenizer.backend_tokenizer) is not None
    # Metaspace writes a space as '▁' (three bytes for one): token lengths are not bytes there.
    assert TokenBytes.of(metaspace_tokenizer.backend_tokenizer) is None
    table = TokenBytes(byte_tokenizer.backend_tokenizer)
    ids = np.array(byte_tokenizer.encode("Hello <|im_end|> é", add_special_tokens=False), dtype=np.int32)
    table.learn(ids)
    size = len("Hello <|im_end|> é".encode())
    assert table.ends(ids, size).tolist()[-1] == size
    assert table.ends(ids, size - 1) is None  # one byte short ("... e"): not this text


def test_tokens_that_do_not_add_up_to_the_text_fall_back_to_offsets(byte_tokenizer):
    """An added token that swallows the space before it covers one byte more than it spells."""
    import copy

    from tokenizers import AddedToken

    tokenizer = copy.deepcopy(byte_tokenizer)
    tokenizer.add_tokens([AddedToken("<mark>", lstrip=True)])
    encoder = ExampleEncoder(tokenizer, resolve_template("chatml", tokenizer), 4096)
    calls = []

    class Recording:
        def __getattr__(self, name):
            if name == "encode":
                calls.append(name)
            return getattr(tokenizer.backend_tokenizer, name)

    encoder.locator.backend = Recording()
    batch = [tricky_example("see <mark> here"), tricky_example("plain")]
    got = list(encoder.encode(batch, TokenizeStats()))
    assert calls == ["encode"]  # the marked example only, located by offsets
    assert_same_pieces(got, encode_both_ways(tokenizer, batch)[1])


def test_offset_trimming_post_processor_keeps_the_offsets_path(byte_tokenizer):
    """RoBERTa-style post-processing trims spaces from offsets, which moves labels: byte
    lengths would not agree with it, so such a tokenizer is located by offsets."""
    import copy

    from tokenizers import processors

    tokenizer = copy.deepcopy(byte_tokenizer)
    tokenizer.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=True)
    assert TokenBytes.of(tokenizer.backend_tokenizer) is None
    tokenizer.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    assert TokenBytes.of(tokenizer.backend_tokenizer) is not None


def byte_bpe(vocab: dict[str, int], merges=(), **options):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=list(merges), **options))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    return tokenizer


def test_unknown_token_has_no_byte_length():
    """`<unk>` stands for however many bytes it swallowed; counted as its five letters, the
    lengths here would add up by chance and place 'x' two tokens off."""
    from tokenizers import pre_tokenizers

    ascii_bytes = sorted(c for c in pre_tokenizers.ByteLevel.alphabet() if ord(c) < 128 or c == "Ġ")
    backend = byte_bpe({"<unk>": 0, **{c: i + 1 for i, c in enumerate(ascii_bytes)}}, unk_token="<unk>",
                       fuse_unk=True)
    text = "éééé x é"
    ids = np.array(backend.encode(text).ids, dtype=np.int32)
    table = TokenBytes.of(backend)
    table.learn(ids)
    assert table.ends(ids, len(text.encode())) is None  # so the text is located by offsets
    assert TokenBytes.of(byte_bpe({"a": 0}, byte_fallback=True)) is None


def test_token_ids_with_gaps():
    from tokenizers import pre_tokenizers

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["ab"] = 1000  # past the number of entries
    backend = byte_bpe(vocab, merges=[("a", "b")])
    ids = np.array(backend.encode("ab a").ids, dtype=np.int32)
    table = TokenBytes.of(backend)
    table.learn(ids)
    assert table.ends(ids, 4).tolist() == [2, 3, 4]


def test_every_character_maps_to_the_token_char_to_token_names(byte_tokenizer):
    """Including characters whose bytes are split across tokens: the first token holding them."""
    backend = byte_tokenizer.backend_tokenizer
    text = "x🎉 café 東京 a\u00a0b 𝔘𝔫"
    encoding = backend.encode(text, add_special_tokens=False)
    ids = np.array(encoding.ids, dtype=np.int32)
    table = TokenBytes.of(backend)
    table.learn(ids)
    char_bytes = char_byte_offsets(text)
    located = Located(ids, ends=table.ends(ids, int(char_bytes[-1])), char_bytes=char_bytes)
    for char in range(len(text)):
        assert located.token_at(char, len(text), 1) == encoding.char_to_token(char)
        assert located.token_at(char, -1, -1) == encoding.char_to_token(char)
