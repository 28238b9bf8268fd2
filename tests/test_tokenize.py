"""Long examples: cut at turn boundaries, most recent context kept, no trained turn ever cut,
and a turn that cannot fit is reported. Tokens located by byte lengths exactly as by offsets."""

from __future__ import annotations

import numpy as np
import pytest

from dialogtune.errors import TemplateError
from dialogtune.tasks import Example, message
from dialogtune.templates import resolve_template
from dialogtune.tokenize import IGNORE_INDEX, ExampleEncoder, TokenBytes, TokenizeStats


def dialogue(turns: int, trained_every: int = 2, system: str | None = "Be brief.") -> Example:
    messages = [message("system", system)] if system else []
    for i in range(turns):
        train = i % trained_every == trained_every - 1
        messages.append(message("assistant" if train else "user", f"Turn number {i} says hello there.", train=train))
    return Example(messages, "long", "long", "test.json", 7)


def encode(tokenizer, ex: Example, max_length: int):
    encoder = ExampleEncoder(tokenizer, resolve_template("chatml", tokenizer), max_length)
    stats = TokenizeStats()
    return list(encoder.encode([ex], stats)), stats, encoder


def trained_text(tokenizer, tokenized) -> str:
    keep = tokenized.labels != IGNORE_INDEX
    return tokenizer.decode(tokenized.input_ids[keep].tolist())


def test_fitting_example_is_one_sequence(byte_tokenizer):
    pieces, stats, _ = encode(byte_tokenizer, dialogue(4), 4096)
    assert len(pieces) == 1 and stats.examples_split == 0


def test_long_dialogue_is_split_at_turns_with_every_trained_turn_once(byte_tokenizer):
    ex = dialogue(12)
    whole, _, _ = encode(byte_tokenizer, ex, 100_000)
    full_length = len(whole[0].input_ids)
    max_length = full_length // 3
    pieces, stats, _ = encode(byte_tokenizer, ex, max_length)
    assert len(pieces) >= 3
    assert stats.examples_split == 1 and stats.turns_too_long == 0
    assert all(len(p.input_ids) <= max_length for p in pieces)
    trained_turns = []
    for piece in pieces:
        text = byte_tokenizer.decode(piece.input_ids.tolist())
        assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>")  # system prompt in every piece
        trained_turns += [int(s.split()[2]) for s in trained_text(byte_tokenizer, piece).split("<|im_end|>") if s]
    assert trained_turns == [1, 3, 5, 7, 9, 11]  # each trained turn exactly once, in order
    # Later pieces carry earlier turns as untrained context (the most recent ones).
    later = byte_tokenizer.decode(pieces[1].input_ids.tolist())
    first_trained_later = trained_turns[len(trained_text(byte_tokenizer, pieces[0]).split("<|im_end|>")) - 1]
    assert f"Turn number {first_trained_later - 1} " in later
    assert stats.context_truncated >= 1


def test_window_keeps_the_most_recent_context(byte_tokenizer):
    messages = [message("user", f"Context line {i} is here.") for i in range(10)]
    messages.append(message("assistant", "The answer.", train=True))
    ex = Example(messages, "w", "w", "t", 1)
    whole, _, _ = encode(byte_tokenizer, ex, 100_000)
    pieces, stats, _ = encode(byte_tokenizer, ex, len(whole[0].input_ids) // 2)
    assert len(pieces) == 1
    text = byte_tokenizer.decode(pieces[0].input_ids.tolist())
    assert "Context line 9 is here." in text and "Context line 0 is here." not in text
    assert trained_text(byte_tokenizer, pieces[0]) == "The answer.<|im_end|>"
    assert stats.context_truncated == 1


def test_turn_that_cannot_fit_is_reported_not_lost(byte_tokenizer):
    messages = [message("user", "Hi."), message("assistant", "Hello there! " * 40, train=True),
                message("user", "And?"), message("assistant", "Fine.", train=True)]
    ex = Example(messages, "d7", "d7", "data.jsonl", 12)
    pieces, stats, _ = encode(byte_tokenizer, ex, 40)
    assert stats.turns_too_long == 1
    (reject,) = stats.rejects
    assert (reject.source, reject.line, reject.item, reject.stage) == ("data.jsonl", 12, "d7", "tokenize")
    assert "does not fit in max_length=40" in reject.reason
    assert [trained_text(byte_tokenizer, p) for p in pieces] == ["Fine.<|im_end|>"]


def test_labels_are_int32_and_ids_match_labels(byte_tokenizer):
    (piece,), _, _ = encode(byte_tokenizer, dialogue(4), 4096)
    assert piece.input_ids.dtype == np.int32 and piece.labels.dtype == np.int32
    trained = piece.labels != IGNORE_INDEX
    assert np.array_equal(piece.labels[trained], piece.input_ids[trained])


def test_slow_tokenizer_is_refused(byte_tokenizer):

    class Slow:
        name_or_path = "slow-one"

    with pytest.raises(TemplateError, match="not a fast"):
        ExampleEncoder(Slow(), resolve_template("chatml", byte_tokenizer), 10)


def test_a_reply_is_never_kept_without_the_turn_it_answers(byte_tokenizer):
    long_question = "Tell me everything about the station and the trains. " * 12
    messages = [message("user", long_question), message("assistant", "Ask me something shorter.", train=True)]
    ex = Example(messages, "q", "q", "data.jsonl", 3)
    pieces, stats, _ = encode(byte_tokenizer, ex, 60)
    assert pieces == []
    (reject,) = stats.rejects
    assert "does not fit in max_length=60 tokens with the turn it answers" in reject.reason
    # A reply that opens the dialogue needs no context.
    opening = Example([message("assistant", "Welcome aboard.", train=True), message("user", long_question)],
                      "o", "o", "data.jsonl", 4)
    (piece,), stats, _ = encode(byte_tokenizer, opening, 60)
    assert trained_text(byte_tokenizer, piece) == "Welcome aboard.<|im_end|>" and not stats.rejects


# -- locating tokens by their byte lengths ----------------------------------------------
class OffsetsEncoder(ExampleEncoder):
    """The reference: character offsets from the tokenizer for every example."""

    def __init__(self, tokenizer, template, max_length):
        super().__init__(tokenizer, template, max_length)
        self._token_bytes = None
        self._encode_batch = self.backend.encode_batch


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


def assert_same_pieces(got, expected):
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a.input_ids.tolist() == b.input_ids.tolist()
        assert a.labels.tolist() == b.labels.tolist()


@pytest.mark.parametrize("content", TRICKY)
def test_byte_lengths_locate_tokens_exactly_as_offsets_do(byte_tokenizer, content):
    template = resolve_template("chatml", byte_tokenizer)
    encoder = ExampleEncoder(byte_tokenizer, template, 4096)
    assert encoder._token_bytes is not None  # the byte path is the one under test
    got = list(encoder.encode([tricky_example(content)], TokenizeStats()))
    expected = list(OffsetsEncoder(byte_tokenizer, template, 4096).encode([tricky_example(content)], TokenizeStats()))
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
    template = resolve_template("chatml", tokenizer)
    encoder = ExampleEncoder(tokenizer, template, 4096)
    calls = []

    class Recording:
        def __getattr__(self, name):
            if name == "encode":
                calls.append(name)
            return getattr(tokenizer.backend_tokenizer, name)

    encoder.backend = Recording()
    example = tricky_example("see <mark> here")
    got = list(encoder.encode([example, tricky_example("plain")], TokenizeStats()))
    assert calls == ["encode"]  # the marked example only, located by offsets
    expected = list(OffsetsEncoder(tokenizer, template, 4096).encode([example, tricky_example("plain")],
                                                                      TokenizeStats()))
    assert_same_pieces(got, expected)


def test_long_examples_cut_in_a_batch_as_one_at_a_time(byte_tokenizer):
    """Pieces of long examples are tokenized together ahead of time: the same pieces, counts
    and rejects as encoding each example on its own."""
    batch = [dialogue(3), dialogue(14), dialogue(2, system=None), dialogue(11, trained_every=3), dialogue(4)]
    too_long = Example([message("user", "Hi."), message("assistant", "Hello there! " * 40, train=True),
                        message("user", "And?"), message("assistant", "Fine.", train=True)], "d7", "d7", "x", 2)
    batch.insert(2, too_long)
    encoder = ExampleEncoder(byte_tokenizer, resolve_template("chatml", byte_tokenizer), 100)
    one_by_one = []
    encoder.encode_one = lambda ex: one_by_one.append(ex.dialogue_id) or ExampleEncoder.encode_one(encoder, ex)
    together = TokenizeStats()
    got = list(encoder.encode(batch, together))
    assert one_by_one == []  # every piece came tokenized from the one batch
    alone = TokenizeStats()
    reference = OffsetsEncoder(byte_tokenizer, resolve_template("chatml", byte_tokenizer), 100)
    expected = [piece for ex in batch for piece in reference.encode([ex], alone)]
    assert_same_pieces(got, expected)
    assert [p.example.dialogue_id for p in got] == [p.example.dialogue_id for p in expected]
    assert (together.examples_split, together.context_truncated, together.turns_too_long) == (
        alone.examples_split, alone.context_truncated, alone.turns_too_long)
    assert together.examples_split >= 2 and together.turns_too_long == 1
    assert [r.reason for r in together.rejects] == [r.reason for r in alone.rejects]


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
    from dialogtune.tokenize import Located, char_byte_offsets

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
