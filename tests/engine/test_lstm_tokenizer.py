"""Character and word tokenizers of LSTM models (engine/lstm_tokenizer.py), built from the same
tokenizer.* metadata that converters/lstm_gguf.py writes."""
from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmengine.errors import TokenIdError, TokenizerError
from lmengine.lstm_tokenizer import CharTokenizer, VocabTokenizer, WordTokenizer
from lmengine.vocab import Vocabulary

ALPHABET = list("abcdefgh ,.\n") + ["é", "日"]
CHAR_META = {
    "tokenizer.ggml.model": "char",
    "tokenizer.ggml.tokens": ["<eos>", "<unk>"] + ALPHABET,
    "tokenizer.ggml.token_type": [3, 2] + [1] * len(ALPHABET),
    "tokenizer.ggml.eos_token_id": 0,
    "tokenizer.ggml.unknown_token_id": 1,
}
WORD_META = {
    "tokenizer.ggml.model": "word",
    "tokenizer.ggml.tokens": ["<bos>", "<eos>", "the", "cat", "sat", ".", "mat"],
    "tokenizer.ggml.token_type": [3, 3, 1, 1, 1, 1, 1],
    "tokenizer.ggml.bos_token_id": 0,
    "tokenizer.ggml.eos_token_id": 1,
    "tokenizer.ggml.add_bos_token": True,
    "tokenizer.word.lowercase": True,
    "tokenizer.word.pattern": r"\w+|[^\w\s]",
    "tokenizer.word.separator": " ",
}


def test_char_encode_decode_and_specials():
    tok = VocabTokenizer.from_metadata(CHAR_META)
    assert isinstance(tok, CharTokenizer) and tok.vocab_size == 16
    ids = tok.encode("bad cafe<eos>")
    assert ids == [3, 2, 5, 10, 4, 2, 7, 6, 0]
    assert tok.decode(ids) == "bad cafe<eos>"
    assert tok.decode(ids, skip_special_tokens=True) == "bad cafe"
    assert tok.encode("<eos>", parse_special=False) == [1, 6, 1, 1, 1]   # only "e" is in the alphabet
    assert tok.encode("xy") == [1, 1]
    assert tok.eos_id == 0 and tok.eot_ids == frozenset({0}) and tok.bos_id is None
    assert tok.is_special(0) and tok.is_special(1) and not tok.is_special(2)
    assert tok.id_to_token(15) == "日" and tok.token_to_id("é") == 14 and tok.token_to_id("zz") is None


def test_unknown_text_without_unk_token_is_an_error():
    meta = dict(CHAR_META, **{"tokenizer.ggml.tokens": ["a", "b"], "tokenizer.ggml.token_type": [1, 1]})
    del meta["tokenizer.ggml.unknown_token_id"], meta["tokenizer.ggml.eos_token_id"]
    tok = VocabTokenizer.from_metadata(meta)
    with pytest.raises(TokenizerError, match="'c' at character 2"):
        tok.encode("abc")
    with pytest.raises(TokenIdError):
        tok.decode([2])
    with pytest.raises(TokenizerError, match="add_bos"):
        tok.encode("a", add_bos=True)


def test_word_tokenizer():
    tok = VocabTokenizer.from_metadata(WORD_META)
    assert isinstance(tok, WordTokenizer)
    assert tok.encode("The cat sat.") == [0, 2, 3, 4, 5]                   # add_bos from the metadata
    assert tok.encode("The cat", add_bos=False) == [2, 3]
    assert tok.decode([0, 2, 3, 4, 5], skip_special_tokens=True) == "the cat sat ."
    assert tok.decode([2, 3]) == "the cat"
    assert tok.decode([3, 4], strip_leading_space=False) == " cat sat"     # a continuation
    with pytest.raises(TokenizerError, match="'dog'"):
        tok.encode("the dog")


def test_bad_metadata_is_named():
    with pytest.raises(TokenizerError, match="tokenizer.ggml.model"):
        VocabTokenizer.from_metadata(dict(CHAR_META, **{"tokenizer.ggml.model": "gpt2"}))
    with pytest.raises(TokenizerError, match="not one character"):
        VocabTokenizer.from_metadata(dict(CHAR_META, **{"tokenizer.ggml.token_type": [3, 2, 1] + [1] * 11 + [1, 1],
                                                        "tokenizer.ggml.tokens": ["<eos>", "<unk>", "ab"] + ALPHABET[1:]}))
    with pytest.raises(TokenizerError, match="outside"):
        VocabTokenizer.from_metadata(dict(CHAR_META, **{"tokenizer.ggml.eos_token_id": 99}))


@pytest.mark.parametrize("value", [True, False, np.True_, np.False_])
def test_bools_are_not_token_ids(value):
    """The same rule and message as every other entry point (lmengine.validation)."""
    for tok in (VocabTokenizer.from_metadata(CHAR_META), VocabTokenizer.from_metadata(WORD_META)):
        message = re.escape(f"token id {bool(value)} is a bool, not an integer in the vocabulary [0, {tok.vocab_size})")
        for call in (lambda: tok.decode([2, value]), lambda: tok.decode(np.array([value])),
                     lambda: tok.id_to_token(value), lambda: tok.is_special(value),
                     lambda: tok.incremental_decoder().add(value)):
            with pytest.raises(TokenIdError, match=message):
                call()


def test_out_of_range_ids_name_the_id_and_the_range():
    tok = VocabTokenizer.from_metadata(CHAR_META)
    n = tok.vocab_size
    for bad in (n, -1):
        message = re.escape(f"token id {bad} is outside the vocabulary [0, {n})")
        for call in (lambda: tok.decode([2, bad]), lambda: tok.id_to_token(bad), lambda: tok.is_special(bad),
                     lambda: tok.incremental_decoder().add(bad)):
            with pytest.raises(TokenIdError, match=message):
                call()
    assert tok.decode(np.array([3, 2], np.int64)) == tok.decode([3, 2]) == "ba"


def test_special_ids_follow_the_gguf_rules():
    """As for BPE vocabularies: -1 / 0xFFFFFFFF mean "none"; a bool id, from the file or the
    constructor, is an error naming where it came from."""
    for none in (-1, 0xFFFFFFFF):
        tok = VocabTokenizer.from_metadata(dict(CHAR_META, **{"tokenizer.ggml.eos_token_id": none}))
        assert tok.eos_id is None and tok.eot_ids == frozenset()
    with pytest.raises(TokenizerError, match=re.escape("m.gguf: tokenizer.ggml.eos_token_id True is a bool")):
        VocabTokenizer.from_metadata(dict(CHAR_META, **{"tokenizer.ggml.eos_token_id": True}), "m.gguf")
    with pytest.raises(TokenizerError, match=re.escape("<vocabulary>: bos token id True is a bool")):
        CharTokenizer(["a", "b"], bos_id=True)
    with pytest.raises(TokenizerError, match=re.escape("<vocabulary>: eos token id 2 is outside the vocabulary [0, 2)")):
        CharTokenizer(["a", "b"], eos_id=2)


def test_the_lookups_are_the_shared_vocabulary():
    tok = VocabTokenizer.from_metadata(WORD_META)
    assert isinstance(tok, Vocabulary)
    assert (tok.bos_id, tok.eos_id, tok.unk_id, tok.pad_id) == (0, 1, None, None)
    assert (tok.bos_token, tok.eos_token, tok.eot_ids) == ("<bos>", "<eos>", frozenset({1}))
    assert tok.token_to_id("mat") == 6 and tok.id_to_token(np.int64(6)) == "mat" and tok.is_special(0)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(ALPHABET + ["<eos>"]), max_size=30))
def test_char_round_trip_and_streaming(pieces):
    tok = VocabTokenizer.from_metadata(CHAR_META)
    text = "".join(pieces)
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    decoder = tok.incremental_decoder()
    assert "".join(decoder.add(i) for i in ids) + decoder.flush() == text


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from([2, 3, 4, 5, 6, 1]), max_size=20), st.booleans())
def test_word_streaming_equals_decode(ids, skip):
    tok = VocabTokenizer.from_metadata(WORD_META)
    decoder = tok.incremental_decoder(skip_special_tokens=skip)
    assert "".join(decoder.add(i) for i in ids) + decoder.flush() == tok.decode(ids, skip_special_tokens=skip)
