"""Tokenizer tests against independent references.

- The bundled SmolLM2 GGUF: token ids from llama.cpp (../shared/reference/smollm2_reference.json),
  decoding against HF transformers loading the tokenizer.json we write.
- A tiny byte-level BPE vocab: HF transformers' GPT2Tokenizer built from the same vocab/merges.
- A tiny SentencePiece-style vocab: HF transformers' LlamaTokenizer with merges from transformers'
  own `generate_merges(vocab, scores)`, and a plain-Python transcription of llama.cpp's
  score-driven merge loop.
- Pre-tokenizer regexes: Python's `regex` module applying llama.cpp's regex lists in sequence.
"""
from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import numpy as np
import pytest
import regex
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from lmengine.converters.gguf_file import GGUFFile
from lmengine.errors import TokenIdError, TokenizerError
from lmengine.tokenizer import PRE_TOKENIZER_REGEXES, Tokenizer
from references import reference_file

REFERENCE = Path(reference_file("smollm2_reference.json"))
HYPOTHESIS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def smollm2_gguf(smollm2_path):  # smollm2_path: tests/conftest.py
    return GGUFFile(smollm2_path)


@pytest.fixture(scope="module")
def tok(smollm2_gguf):
    return Tokenizer.from_gguf(smollm2_gguf)


@pytest.fixture(scope="module")
def reference():
    if not REFERENCE.is_file():
        pytest.skip(f"{REFERENCE} not found")
    return json.loads(REFERENCE.read_text())


@pytest.fixture(scope="module")
def hf_smollm2(tok, tmp_path_factory):
    """transformers' tokenizer loaded from the tokenizer.json/tokenizer_config.json we write."""
    from transformers import AutoTokenizer
    out = tmp_path_factory.mktemp("smollm2_tokenizer")
    tok.save_pretrained(out)
    return AutoTokenizer.from_pretrained(str(out))


# Text that exercises the byte-level details: emoji (4-byte UTF-8), CJK, combining marks,
# whitespace runs, digits, contractions, and control-token text.
TRICKY_TEXT = st.lists(st.one_of(
    st.text(max_size=12),
    st.sampled_from(["😀", "👩‍💻", "中文", "e\u0301", "  ", "\n\n", "\t ", "123", "'s", "<|im_start|>",
                     "<|im_end|>", " <|endoftext|>", "\u00a0", "\r\n"]),
), max_size=8).map("".join)


# -- the bundled model --------------------------------------------------------------------------
def test_reference_prompts_match_llama_cpp(tok, reference):
    for prompt in reference["prompts"]:
        text, expected = prompt["text"], prompt["llama_cpp"]
        assert tok.encode(text) == expected["ids"], prompt["name"]
        if "ids_parse_special_false" in expected:
            assert tok.encode(text, parse_special=False) == expected["ids_parse_special_false"], prompt["name"]
        assert tok.decode(tok.encode(text)) == text, prompt["name"]


def test_metadata_of_bundled_model(tok, reference):
    assert tok.vocab_size == 49152
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    assert tok.add_bos is False                      # "this GGUF adds no BOS" (reference notes)
    assert tok.encode("Hi", add_bos=True)[0] == tok.bos_id
    assert tok.encode("Hi") == tok.encode("Hi", add_bos=False)
    assert tok.token_to_id("<|im_start|>") == 1 and tok.token_to_id("no such token") is None
    assert tok.id_to_token(504) == "The"
    assert tok.is_special(2) and not tok.is_special(504)
    assert tok.eot_ids == {0, 2}                     # <|endoftext|> and <|im_end|> (= eos)
    assert tok.decode([1, 504, 2], skip_special_tokens=True) == "The"
    assert tok.chat_template == reference["chat_template"]


def _encodable(tok, text: str) -> bool:
    """Whether the byte-level vocab has a token for every byte of the text's UTF-8."""
    if not hasattr(tok, "_test_byte_tokens"):
        from transformers.convert_slow_tokenizer import bytes_to_unicode
        tok._test_byte_tokens = {b for b, c in bytes_to_unicode().items() if tok.token_to_id(c) is not None}
    return set(text.encode()) <= tok._test_byte_tokens


def test_bytes_missing_from_vocab_are_dropped_like_llama_cpp(tok):
    # SmolLM2's vocab has no token for the bytes 0x04, 0x06, 0x13, 0x14, 0x16, 0x1D, 0xF1, 0xF2
    # (and those never in UTF-8). llama.cpp and HF drop such bytes; so do we.
    assert not _encodable(tok, "\x04") and not _encodable(tok, "\U00040000")
    assert tok.decode(tok.encode("a\x04b")) == "ab"
    assert tok.decode(tok.encode("\U00040000")) == "\ufffd" * 3   # the 3 continuation bytes remain


@given(TRICKY_TEXT)
@HYPOTHESIS
def test_roundtrip_random_text(tok, text):
    assume(_encodable(tok, text))
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode(text, parse_special=False)) == text


@given(st.text(max_size=40))
@HYPOTHESIS
def test_encode_matches_transformers(tok, hf_smollm2, text):
    # Same vocab, merges and pre-tokenizer, run by transformers' own loading of the tokenizer.json.
    assert tok.encode(text) == hf_smollm2(text, add_special_tokens=False)["input_ids"]


@given(st.lists(st.integers(0, 49151), max_size=12), st.booleans())
@HYPOTHESIS
def test_decode_matches_transformers(tok, hf_smollm2, ids, skip_special):
    expected = hf_smollm2.decode(ids, skip_special_tokens=skip_special, clean_up_tokenization_spaces=False)
    assert tok.decode(ids, skip_special_tokens=skip_special) == expected


def _stream(tok, ids, **options):
    decoder = tok.incremental_decoder(**options)
    chunks = [decoder.add(i) for i in ids]
    return chunks + [decoder.flush()]


@given(st.lists(st.integers(0, 49151), max_size=24), st.booleans())
@HYPOTHESIS
def test_incremental_decoder_random_ids(tok, ids, skip_special):
    chunks = _stream(tok, ids, skip_special_tokens=skip_special)
    full = tok.decode(ids, skip_special_tokens=skip_special)
    assert "".join(chunks) == full
    if "\ufffd" not in full:
        assert not any("\ufffd" in c for c in chunks)


@given(TRICKY_TEXT)
@HYPOTHESIS
def test_incremental_decoder_on_encoded_text(tok, text):
    assume(_encodable(tok, text))
    chunks = _stream(tok, tok.encode(text))
    assert "".join(chunks) == text
    assert all("\ufffd" not in c for c in chunks) or "\ufffd" in text


def test_incremental_decoder_holds_split_characters(tok, reference):
    # The Chinese prompt's byte-level tokens split 3-byte characters: some tokens complete nothing.
    prompt = next(p for p in reference["prompts"] if p["name"] == "unicode_chinese")
    chunks = _stream(tok, prompt["llama_cpp"]["ids"])
    assert "".join(chunks) == prompt["text"]
    assert "" in chunks[:-1]
    assert all("\ufffd" not in c for c in chunks)
    # A lone lead byte is held, then flushed as one replacement character.
    lead = tok.token_to_id("ä")                      # byte 0xE4, the lead byte of "中"
    decoder = tok.incremental_decoder()
    assert decoder.add(lead) == "" and decoder.flush() == "\ufffd"


def test_save_and_load_pretrained(tok, reference, tmp_path, hf_smollm2):
    tok.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["bos_token"] == "<|im_start|>" and config["eos_token"] == "<|im_end|>"
    assert config["add_bos_token"] is False and config["chat_template"] == reference["chat_template"]
    loaded = Tokenizer.from_pretrained_dir(tmp_path)
    assert (loaded.vocab_size, loaded.bos_id, loaded.eos_id, loaded.add_bos) == (49152, 1, 2, False)
    assert loaded.eot_ids == tok.eot_ids
    assert loaded.chat_template == tok.chat_template
    for prompt in reference["prompts"]:
        ids = prompt["llama_cpp"]["ids"]
        assert loaded.encode(prompt["text"]) == ids
        assert loaded.decode(ids) == prompt["text"]
        assert hf_smollm2(prompt["text"])["input_ids"] == ids  # transformers reading our files


# -- a tiny byte-level BPE vocab ---------------------------------------------------------------
def _gpt2_byte_chars() -> list[str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    table = bytes_to_unicode()
    return [table[b] for b in range(256)]


TINY_MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "Ġa n", "Ġan d", "1 2", "Ġ Ġ", "ä ¸", "ä¸ Ń"]
TINY_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _tiny_gpt2_metadata(pre: str = "gpt2") -> dict:
    merged = ["".join(m.split(" ")) for m in TINY_MERGES]
    tokens = _gpt2_byte_chars() + merged + TINY_SPECIAL + ["<tool>"]
    types = [1] * (256 + len(merged)) + [3] * len(TINY_SPECIAL) + [4]
    return {
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": TINY_MERGES,
        "tokenizer.ggml.bos_token_id": tokens.index("<|endoftext|>"),
        "tokenizer.ggml.eos_token_id": tokens.index("<|im_end|>"),
        "tokenizer.ggml.add_bos_token": False,
    }


@pytest.fixture(scope="module")
def tiny_gpt2():
    return Tokenizer.from_metadata(_tiny_gpt2_metadata("gpt2"))


@pytest.fixture(scope="module")
def tiny_gpt2_reference():
    """transformers' GPT2Tokenizer (byte-level BPE, GPT-2 regex) from the same vocab and merges."""
    from tokenizers import AddedToken
    from transformers import GPT2Tokenizer
    meta = _tiny_gpt2_metadata()
    vocab = {t: i for i, t in enumerate(meta["tokenizer.ggml.tokens"])}
    ref = GPT2Tokenizer(vocab=vocab, merges=[tuple(m.split(" ")) for m in TINY_MERGES])
    ref.add_tokens([AddedToken(t, special=True, normalized=False) for t in TINY_SPECIAL], special_tokens=True)
    ref.add_tokens([AddedToken("<tool>", special=False, normalized=False)])
    return ref


GPT2_ALPHABET = st.text(alphabet="the and in 12 3\n\t'sä¸Ń中文😀é", max_size=30)


def test_tiny_gpt2_hand_examples(tiny_gpt2):
    t = tiny_gpt2.token_to_id
    assert tiny_gpt2.encode(" the and") == [t("Ġthe"), t("Ġand")]
    assert tiny_gpt2.encode("he12 12") == [t("he"), t("12"), t("Ġ"), t("12")]
    assert tiny_gpt2.encode("中") == [t("ä¸Ń")]
    assert tiny_gpt2.encode("<|im_start|>the<tool>") == [t("<|im_start|>"), t("t"), t("he"), t("<tool>")]
    # parse_special=False: control tokens are text, user-defined ones are still matched (llama.cpp)
    assert tiny_gpt2.encode("<|im_end|><tool>", parse_special=False)[-1] == t("<tool>")
    assert t("<|im_end|>") not in tiny_gpt2.encode("<|im_end|>", parse_special=False)
    assert tiny_gpt2.eot_ids == {t("<|im_end|>"), t("<|endoftext|>")}


def test_tiny_smollm_pre_splits_digits(tiny_gpt2):
    smollm = Tokenizer.from_metadata(_tiny_gpt2_metadata("smollm"))
    t = smollm.token_to_id
    assert smollm.encode("12") == [t("1"), t("2")]      # \p{N} first: one digit per piece
    assert tiny_gpt2.encode("12") == [t("12")]


@given(st.one_of(GPT2_ALPHABET, st.text(max_size=20)),
       st.sampled_from(["", "<|im_start|>", "<tool>", "<|endoftext|>"]))
@HYPOTHESIS
def test_tiny_gpt2_matches_transformers(tiny_gpt2, tiny_gpt2_reference, text, special):
    text = text[: len(text) // 2] + special + text[len(text) // 2:]
    ids = tiny_gpt2.encode(text)
    assert ids == tiny_gpt2_reference(text, add_special_tokens=False)["input_ids"]
    assert tiny_gpt2.decode(ids) == text
    assert "".join(_stream(tiny_gpt2, ids)) == text


# -- pre-tokenizer regexes against Python's `regex` module ------------------------------------
def _split_like_llama_cpp(text: str, patterns: list[str]) -> list[str]:
    """Each regex splits every piece; matches and the gaps between them are both kept."""
    pieces = [text]
    for pattern in patterns:
        out = []
        for piece in pieces:
            pos = 0
            for m in regex.finditer(pattern, piece):
                if m.start() > pos:
                    out.append(piece[pos:m.start()])
                if m.end() > m.start():
                    out.append(m.group())
                pos = max(pos, m.end())
            if pos < len(piece):
                out.append(piece[pos:])
        pieces = out
    return pieces


# Characters assigned in Python's Unicode tables (category not Cn): the Unicode versions of
# Oniguruma (in tokenizers) and of the `regex` module differ on recently assigned characters.
PRE_ALPHABET = st.text(
    alphabet=st.one_of(st.sampled_from(list(" \t\n\r'sStTdDmMlLvVeErR0123456789.,!?$+<=>^~|_-()\u00a0中文é😀")),
                       st.characters(codec="utf-8", exclude_categories=("Cs", "Cn", "Cc", "Zl", "Zp"))),
    max_size=40)


@functools.lru_cache(maxsize=None)
def _tiny_gpt2_with_pre(pre: str) -> Tokenizer:
    return Tokenizer.from_metadata(_tiny_gpt2_metadata(pre))


@pytest.mark.parametrize("pre", ["default", "gpt2", "smollm", "llama-bpe", "qwen2"])
@given(text=PRE_ALPHABET)
@HYPOTHESIS
def test_pre_tokenizer_splits_like_llama_cpp(pre, text):
    hf = _tiny_gpt2_with_pre(pre)._hf
    ours = [text[a:b] for _, (a, b) in hf.pre_tokenizer.pre_tokenize_str(text)]
    assert ours == _split_like_llama_cpp(text, PRE_TOKENIZER_REGEXES[pre])


# -- a tiny SentencePiece-style vocab -----------------------------------------------------------
SPM_PIECES = {  # piece -> score; higher scores merge first
    "ab": -1.0, "bc": -2.0, "▁a": -3.0, "▁ab": -4.0, "abc": -5.0, "▁abc": -6.0, "th": -7.0,
    "he": -8.0, "▁t": -9.0, "▁th": -10.0, "▁the": -11.0, "an": -12.0, "nd": -13.0, "▁an": -14.0,
    "▁and": -15.0, "cd": -16.0, "de": -17.0, "cde": -18.0, "ee": -19.0, "▁▁": -20.0,
}
SPM_CHARS = ["▁", "a", "b", "c", "d", "e", "n", "t", "h", "é"]


def _tiny_spm_metadata(add_space_prefix: bool = True) -> dict:
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    scores = [0.0] * len(tokens)
    for k, c in enumerate(SPM_CHARS):
        tokens.append(c), types.append(1), scores.append(-100.0 - k)
    for piece, score in SPM_PIECES.items():
        tokens.append(piece), types.append(1), scores.append(score)
    return {
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types, "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0, "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_space_prefix": add_space_prefix,
    }


def _spm_like_llama_cpp(text: str, meta: dict) -> list[int]:
    """llama.cpp's SentencePiece loop: merge the adjacent pair whose concatenation is the
    highest-scoring piece (leftmost on ties); characters not in the vocab become <0xNN> tokens."""
    tokens, scores = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.scores"]
    vocab = {t: i for i, t in enumerate(tokens) if meta["tokenizer.ggml.token_type"][i] == 1}
    if not text:
        return []
    prefix = "▁" if meta["tokenizer.ggml.add_space_prefix"] else ""
    symbols = list(prefix + text.replace(" ", "▁"))
    while True:
        best = None
        for i in range(len(symbols) - 1):
            merged = symbols[i] + symbols[i + 1]
            if merged in vocab and (best is None or scores[vocab[merged]] > best[0]):
                best = (scores[vocab[merged]], i)
        if best is None:
            break
        i = best[1]
        symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
    ids = []
    for s in symbols:
        ids.extend([vocab[s]] if s in vocab else [tokens.index(f"<0x{b:02X}>") for b in s.encode()])
    return ids


@pytest.fixture(scope="module")
def tiny_spm():
    return Tokenizer.from_metadata(_tiny_spm_metadata())


@pytest.fixture(scope="module")
def tiny_spm_reference():
    """transformers' LlamaTokenizer with merges from transformers' generate_merges(vocab, scores)."""
    from tokenizers import AddedToken
    from transformers import LlamaTokenizer
    from transformers.tokenization_utils_base import generate_merges
    meta = _tiny_spm_metadata()
    tokens = meta["tokenizer.ggml.tokens"]
    vocab = {t: i for i, t in enumerate(tokens)}
    scores = {t: s for t, s in zip(tokens, meta["tokenizer.ggml.scores"])}
    ref = LlamaTokenizer(vocab=vocab, merges=generate_merges(vocab, scores), add_prefix_space=True)
    ref.add_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")],
                   special_tokens=True)
    return ref


SPM_TEXT = st.text(alphabet="abcdenth é中x\n", max_size=24)


def test_tiny_spm_hand_examples(tiny_spm):
    t = tiny_spm.token_to_id
    assert tiny_spm.encode("abc") == [1, t("▁abc")]                  # ab, then ▁ab, then ▁abc
    assert tiny_spm.encode("bcd", add_bos=False) == [t("▁"), t("bc"), t("d")]
    assert tiny_spm.encode("the and", add_bos=False) == [t("▁the"), t("▁and")]
    assert tiny_spm.encode(" the", add_bos=False) == [t("▁"), t("▁the")]   # "▁" + "▁the", as llama.cpp
    assert tiny_spm.encode("<s>the</s>", add_bos=False) == [1, t("▁the"), 2]  # "▁" again after <s>
    assert tiny_spm.encode("<s>the", add_bos=False, parse_special=False)[:3] == [t("▁"), t("<0x3C>"), t("<0x73>")]
    assert tiny_spm.encode("中", add_bos=False) == [t("▁"), t("<0xE4>"), t("<0xB8>"), t("<0xAD>")]
    assert tiny_spm.decode([1, t("▁the"), t("▁and")]) == "<s> the and"
    assert tiny_spm.decode([1, t("▁the"), t("▁and")], skip_special_tokens=True) == "the and"
    assert tiny_spm.decode([t("▁the")], strip_leading_space=False) == " the"
    chunks = _stream(tiny_spm, [t("▁"), t("<0xE4>"), t("<0xB8>"), t("<0xAD>")])
    assert chunks == ["", "", "", "中", ""]
    no_prefix = Tokenizer.from_metadata(_tiny_spm_metadata(add_space_prefix=False))
    assert no_prefix.encode("abc", add_bos=False) == [t("abc")]
    assert no_prefix.decode(no_prefix.encode(" ab", add_bos=False)) == " ab"


@given(SPM_TEXT)
@HYPOTHESIS
def test_tiny_spm_matches_references(tiny_spm, tiny_spm_reference, text):
    ids = tiny_spm.encode(text, add_bos=False)
    assert ids == _spm_like_llama_cpp(text, _tiny_spm_metadata())
    if not text.startswith(" "):  # transformers' Metaspace adds no "▁" before a leading space
        assert ids == tiny_spm_reference(text, add_special_tokens=False)["input_ids"]
        assert tiny_spm_reference.decode(ids) == text
    assert tiny_spm.decode(ids) == text
    assert "".join(_stream(tiny_spm, ids)) == text


@given(st.lists(st.integers(0, 268), max_size=16), st.booleans())
@HYPOTHESIS
def test_tiny_spm_incremental_random_ids(tiny_spm, ids, skip_special):
    assert "".join(_stream(tiny_spm, ids, skip_special_tokens=skip_special)) == \
        tiny_spm.decode(ids, skip_special_tokens=skip_special)


def _write_tiny_gguf(path: Path, meta: dict) -> None:
    import gguf
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model(meta["tokenizer.ggml.model"])
    writer.add_token_list(meta["tokenizer.ggml.tokens"])
    writer.add_token_types(meta["tokenizer.ggml.token_type"])
    writer.add_token_scores(meta["tokenizer.ggml.scores"])
    writer.add_bos_token_id(meta["tokenizer.ggml.bos_token_id"])
    writer.add_eos_token_id(meta["tokenizer.ggml.eos_token_id"])
    writer.add_unk_token_id(meta["tokenizer.ggml.unknown_token_id"])
    writer.add_add_bos_token(True)
    writer.add_chat_template("{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_spm_from_gguf_file_and_pretrained_dir(tmp_path, tiny_spm, tiny_spm_reference):
    path = tmp_path / "tiny_spm.gguf"
    _write_tiny_gguf(path, _tiny_spm_metadata())
    from_file = Tokenizer.from_gguf(GGUFFile(path))
    texts = ["the and abc", "  bcd é 中", "x\nab"]
    for text in texts:
        assert from_file.encode(text) == tiny_spm.encode(text)
    assert from_file.chat_template.startswith("{{ bos_token }}")

    tiny_spm.save_pretrained(tmp_path / "hf")
    loaded = Tokenizer.from_pretrained_dir(tmp_path / "hf")
    assert (loaded.model, loaded.bos_id, loaded.add_bos, loaded.add_space_prefix) == ("llama", 1, True, True)
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    for text in texts:
        ids = tiny_spm.encode(text)
        assert loaded.encode(text) == ids
        assert loaded.decode(ids) == tiny_spm.decode(ids)
        assert hf(text)["input_ids"] == ids   # BOS added by the post-processor we write


# -- errors -------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", ["tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.merges"])
def test_missing_keys_gpt2(key):
    meta = _tiny_gpt2_metadata()
    del meta[key]
    with pytest.raises(TokenizerError, match=key.replace(".", r"\.")):
        Tokenizer.from_metadata(meta, source="tiny.gguf")


def test_missing_scores_spm():
    meta = _tiny_spm_metadata()
    del meta["tokenizer.ggml.scores"]
    with pytest.raises(TokenizerError, match=r"tokenizer\.ggml\.scores"):
        Tokenizer.from_metadata(meta)


@pytest.mark.parametrize("change, message", [
    ({"tokenizer.ggml.model": "t5"}, "'t5' is not supported"),   # bert (WordPiece) is supported now
    ({"tokenizer.ggml.pre": "no-such-pre"}, "'no-such-pre' is not supported"),
    ({"tokenizer.ggml.token_type": [1, 1]}, "token_type has 2 entries"),
    ({"tokenizer.ggml.eos_token_id": 10**6}, "outside the vocab"),
    ({"tokenizer.ggml.merges": ["Ġt"]}, "not two tokens"),
    ({"tokenizer.ggml.merges": ["q zz"]}, "do not fit the vocab"),
    ({"tokenizer.ggml.tokens": []}, "empty"),
])
def test_bad_metadata(change, message):
    meta = _tiny_gpt2_metadata()
    meta.update(change)
    with pytest.raises(TokenizerError, match=message):
        Tokenizer.from_metadata(meta, source="tiny.gguf")


def test_out_of_range_ids(tiny_gpt2):
    n = tiny_gpt2.vocab_size
    for bad in (n, -1, 10**9):
        with pytest.raises(TokenIdError, match=rf"{bad}.*\[0, {n}\)"):
            tiny_gpt2.decode([5, bad])
        with pytest.raises(TokenIdError, match=str(n)):
            tiny_gpt2.id_to_token(bad)
        with pytest.raises(TokenIdError):
            tiny_gpt2.is_special(bad)
        with pytest.raises(TokenIdError, match=str(n)):
            tiny_gpt2.incremental_decoder().add(bad)
    with pytest.raises(TokenIdError, match="not an integer"):
        tiny_gpt2.decode(["a"])


@pytest.mark.parametrize("value", [True, False, np.True_, np.False_])
def test_bools_are_not_token_ids(tiny_gpt2, value):
    """True would index token 1: every id entry point says a bool is not a token id, with the range."""
    n = tiny_gpt2.vocab_size
    message = re.escape(f"token id {bool(value)} is a bool, not an integer in the vocabulary [0, {n})")
    for call in (lambda: tiny_gpt2.decode([5, value]), lambda: tiny_gpt2.decode(np.array([value])),
                 lambda: tiny_gpt2.id_to_token(value), lambda: tiny_gpt2.is_special(value),
                 lambda: tiny_gpt2.incremental_decoder().add(value)):
        with pytest.raises(TokenIdError, match=message):
            call()
    assert tiny_gpt2.decode(np.array([5, 6], np.int32)) == tiny_gpt2.decode([5, 6])   # NumPy integers are ids


def test_special_ids_in_metadata():
    """-1 and 0xFFFFFFFF mean "no such token" (llama.cpp); a bool or a string is an error naming the key."""
    for none in (-1, 0xFFFFFFFF):
        meta = dict(_tiny_gpt2_metadata(), **{"tokenizer.ggml.eos_token_id": none})
        assert Tokenizer.from_metadata(meta).eos_id is None
    for bad, message in ((True, "tokenizer.ggml.eos_token_id True is a bool"),
                         ("3", "tokenizer.ggml.eos_token_id '3' is not an integer")):
        meta = dict(_tiny_gpt2_metadata(), **{"tokenizer.ggml.eos_token_id": bad})
        with pytest.raises(TokenizerError, match=re.escape(f"tiny.gguf: {message}")):
            Tokenizer.from_metadata(meta, source="tiny.gguf")


def test_bad_inputs(tiny_gpt2, tmp_path):
    with pytest.raises(TokenizerError, match="takes a str"):
        tiny_gpt2.encode(b"bytes")
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        Tokenizer.from_pretrained_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="cannot be read"):
        Tokenizer.from_pretrained_dir(tmp_path)


# -- text that cannot be encoded, wrong metadata types ------------------------------------------
@pytest.mark.parametrize("text, position, code", [("\ud800", 0, "D800"), ("ok \udcff then", 3, "DCFF"),
                                                  ("中文 😀\udfff", 4, "DFFF")])
def test_lone_surrogates_are_named(tiny_gpt2, tiny_spm, text, position, code):
    """A lone surrogate (what errors='surrogateescape' makes of invalid bytes) is no Unicode
    character: every encoding entry point says so, with its position, instead of a TypeError."""
    from lmengine.lstm_tokenizer import CharTokenizer
    message = rf"lone surrogate U\+{code} at character {position}\b"
    chars = CharTokenizer(["<unk>", "a"], [2, 1], unk_id=0)
    for call in (lambda: tiny_gpt2.encode(text), lambda: tiny_gpt2.encode(text, parse_special=False),
                 lambda: tiny_spm.encode(text), lambda: tiny_gpt2.encode_with_offsets(text),
                 lambda: tiny_gpt2.find_special_tokens(text), lambda: chars.encode(text)):
        with pytest.raises(TokenizerError, match=message):
            call()
    for tokenizer in (tiny_gpt2, chars):
        with pytest.raises(TokenizerError, match=rf"encode_batch\(\) item 1: .*{message}"):
            tokenizer.encode_batch(["fine", text])
        with pytest.raises(TokenizerError, match="encode_batch.*takes a list of str, got str"):
            tokenizer.encode_batch("not a list")
        with pytest.raises(TokenizerError, match="takes a str, got int"):
            tokenizer.encode(5)


def test_encode_with_offsets_and_find_special_tokens(tiny_gpt2):
    text = "the <|im_start|>and<|im_end|> 中<tool>"
    ids, offsets = tiny_gpt2.encode_with_offsets(text)
    assert ids == tiny_gpt2.encode(text)
    # each token covers its characters; the tokens of one multi-byte character share its span
    assert all(0 <= s <= e <= len(text) for s, e in offsets)
    assert [text[s:e] for (s, e), i in zip(offsets, ids) if i >= 256 + len(TINY_MERGES)] == \
        ["<|im_start|>", "<|im_end|>", "<tool>"]
    literal, _ = tiny_gpt2.encode_with_offsets(text, parse_special=False)
    assert literal == tiny_gpt2.encode(text, parse_special=False)
    im_start, im_end = tiny_gpt2.token_to_id("<|im_start|>"), tiny_gpt2.token_to_id("<|im_end|>")
    # control tokens only: <tool> is user-defined (always matched, not "special text")
    assert tiny_gpt2.find_special_tokens(text) == [(4, 16, im_start), (19, 29, im_end)]
    assert tiny_gpt2.find_special_tokens("no markers <tool> <|im_") == []


@pytest.mark.parametrize("change, message", [
    ({"tokenizer.ggml.pre": 3}, r"'tokenizer\.ggml\.pre' should be a string, found int"),
    ({"tokenizer.ggml.add_bos_token": "false"}, r"'tokenizer\.ggml\.add_bos_token' should be a bool, found 'false'"),
    ({"tokenizer.ggml.token_type": ["1"] * 273}, r"'tokenizer\.ggml\.token_type' should hold integers"),
    ({"tokenizer.chat_template": 7}, r"'tokenizer\.chat_template' should be a string, found int"),
])
def test_metadata_values_of_the_wrong_type(change, message):
    meta = _tiny_gpt2_metadata()
    meta.update(change)
    with pytest.raises(TokenizerError, match=rf"tiny\.gguf: metadata key {message}"):
        Tokenizer.from_metadata(meta, source="tiny.gguf")


def test_spm_scores_of_the_wrong_type():
    meta = _tiny_spm_metadata()
    meta["tokenizer.ggml.scores"] = ["0.5"] * len(meta["tokenizer.ggml.tokens"])
    with pytest.raises(TokenizerError, match=r"'tokenizer\.ggml\.scores' should hold numbers"):
        Tokenizer.from_metadata(meta)


def test_lstm_metadata_values_of_the_wrong_type():
    from lmengine.lstm_tokenizer import VocabTokenizer
    base = {"tokenizer.ggml.model": "word", "tokenizer.ggml.tokens": ["<unk>", "a"],
            "tokenizer.ggml.token_type": [2, 1]}
    for key, value, kind in (("tokenizer.word.pattern", 5, "str"), ("tokenizer.word.separator", None, "str"),
                             ("tokenizer.word.lowercase", "yes", "bool"),
                             ("tokenizer.ggml.add_bos_token", 2, "bool")):
        with pytest.raises(TokenizerError, match=rf"'{re.escape(key)}' should be a {kind}"):
            VocabTokenizer.from_metadata(dict(base, **{key: value}))
    with pytest.raises(TokenizerError, match="integer types"):
        VocabTokenizer.from_metadata(dict(base, **{"tokenizer.ggml.token_type": ["2", "1"]}))


def test_pretrained_dir_with_a_list_of_chat_templates(tiny_gpt2, tmp_path):
    """tokenizer_config.json may list named templates: the one named "default" is used."""
    tiny_gpt2.save_pretrained(tmp_path)
    config_path = tmp_path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    config_path.write_text(json.dumps(config))
    assert Tokenizer.from_pretrained_dir(tmp_path).chat_template == "D"
    config["chat_template"] = 3
    config_path.write_text(json.dumps(config))
    with pytest.raises(TokenizerError, match="chat_template should be a string, found int"):
        Tokenizer.from_pretrained_dir(tmp_path)
