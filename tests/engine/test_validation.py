"""Token ids are checked by one function (lmengine.validation.check_token_ids) wherever they enter
the engine: one rule (an integer, not a bool, in [0, vocab_size)), one error class (TokenIdError),
one message naming the id and the range. The rule is restated below as a plain Python predicate
(`is_token_id`), independent of the NumPy code under test; the entry points are checked against
the same message on a fake model (fake_backend.py: no model file, milliseconds per test).
The tokenizers' and backends' entry points are covered in test_tokenizer.py,
test_lstm_tokenizer.py, test_lstm.py and test_ort_backend.py."""
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fake_backend import FakeBackend, make_tokenizer
from lmengine import LLM, Generator, SamplingParams
from lmengine.errors import InvalidParameterError, TokenIdError
from lmengine.sampler import Sampler
from lmengine.validation import check_token_id, check_token_ids

VOCAB = 32
BOOLS = [True, False, np.True_, np.False_]


def is_token_id(x, vocab_size) -> bool:
    """The rule, in plain Python."""
    return (isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))
            and 0 <= int(x) < vocab_size)


def outside(bad, n, what="token id") -> str:
    """The message for an id outside [0, n), as a regex."""
    return re.escape(f"{what} {bad} is outside the vocabulary [0, {n})")


def a_bool(value, n, what="token id") -> str:
    return re.escape(f"{what} {bool(value)} is a bool, not an integer in the vocabulary [0, {n})")


def make_llm(n_slots=2) -> LLM:
    tokenizer = make_tokenizer()
    return LLM.from_backend(FakeBackend(tokenizer.vocab_size, n_ctx=64, n_slots=n_slots), tokenizer)


# -- the function -------------------------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.integers(-3, VOCAB + 3), st.booleans(), st.floats(0, 5), st.just("1")), max_size=8))
def test_accepts_exactly_the_rule(items):
    """Every mix of ints, bools, floats and strings: accepted (as the same values, int64) exactly
    when every item keeps the rule; otherwise the error names the first item that breaks it."""
    if all(is_token_id(x, VOCAB) for x in items):
        got = check_token_ids(items, VOCAB)
        assert got.dtype == np.int64 and got.tolist() == items
    else:
        first = next(x for x in items if not is_token_id(x, VOCAB))
        with pytest.raises(TokenIdError) as info:
            check_token_ids(items, VOCAB)
        assert f"token id {first!r} " in str(info.value) and f"[0, {VOCAB})" in str(info.value)


@pytest.mark.parametrize("ids, expected", [
    ([0, 5, VOCAB - 1], [0, 5, VOCAB - 1]), ((3,), [3]), (np.array([1, 2], np.int32), [1, 2]),
    (np.array([[1], [2]], np.uint8), [1, 2]), (np.array([VOCAB - 1], np.uint64), [VOCAB - 1]),
    ([np.int64(4), np.int16(7)], [4, 7]), (iter([1, 2]), [1, 2]), ({3: None}.keys(), [3]),
    ([np.array(6)], [6]),                                  # anything with __index__
])
def test_integer_forms_are_accepted_and_flattened(ids, expected):
    got = check_token_ids(ids, VOCAB)
    assert got.dtype == np.int64 and got.ndim == 1 and got.tolist() == expected


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.integers(-3, VOCAB + 3), st.booleans(), st.floats(0, 5), st.just("1"), st.none()))
def test_one_id_form_has_the_same_rule_and_message(x):
    """check_token_id(x) == check_token_ids([x])[0], or the same error."""
    try:
        expected = int(check_token_ids([x], VOCAB)[0])
    except TokenIdError as e:
        with pytest.raises(TokenIdError, match=re.escape(str(e))):
            check_token_id(x, VOCAB)
    else:
        got = check_token_id(x, VOCAB)
        assert type(got) is int and got == expected == x


def test_returns_a_copy_and_empty_inputs_are_empty():
    source = np.array([1, 2, 3], np.int64)
    got = check_token_ids(source, VOCAB)
    got[0] = 9
    assert source[0] == 1
    for empty in ([], (), np.array([]), np.zeros((0, 3), np.float32)):   # np.array([]) is float64
        assert check_token_ids(empty, VOCAB).shape == (0,)


@pytest.mark.parametrize("value", BOOLS)
def test_bools_are_not_token_ids_in_any_form(value):
    for ids in ([value], [1, value], (value,), np.array([value]), np.array([value, True])):
        with pytest.raises(TokenIdError, match=a_bool(value, VOCAB)):
            check_token_ids(ids, VOCAB)


def test_out_of_range_and_non_integers_name_the_first_bad_id():
    for ids, bad in [([1, VOCAB, -1], VOCAB), (np.array([3, -2, 99]), -2),
                     (np.array([2**64 - 1], np.uint64), 2**64 - 1), ([10**30], 10**30)]:
        with pytest.raises(TokenIdError, match=outside(bad, VOCAB)):
            check_token_ids(ids, VOCAB)
    with pytest.raises(TokenIdError, match=re.escape(f"token id 1.5 is not an integer in the vocabulary [0, {VOCAB})")):
        check_token_ids(np.array([1.5, 2.0]), VOCAB)
    with pytest.raises(TokenIdError, match="'a' is not an integer"):
        check_token_ids([1, "a"], VOCAB)
    for not_a_sequence in (5, "12", b"12", None):
        with pytest.raises(TokenIdError, match="expected a sequence of token ids"):
            check_token_ids(not_a_sequence, VOCAB)


def test_what_names_the_ids_and_no_vocabulary_checks_type_and_sign():
    with pytest.raises(TokenIdError, match=outside(7, 5, "prompt token id")):
        check_token_ids([7], 5, "prompt token id")
    assert check_token_ids([0, 10**9], None).tolist() == [0, 10**9]
    with pytest.raises(TokenIdError, match=re.escape("x -1 is outside the vocabulary [0, vocab_size)")):
        check_token_ids([-1], None, "x")
    with pytest.raises(TokenIdError, match=re.escape("x True is a bool")):
        check_token_ids([True], None, "x")


def test_token_id_error_is_an_invalid_parameter_error():
    """Bad ids are bad arguments: `except InvalidParameterError` (and ValueError) catch them."""
    assert issubclass(TokenIdError, InvalidParameterError) and issubclass(TokenIdError, ValueError)


# -- the entry points ---------------------------------------------------------------------------

@pytest.mark.parametrize("value", BOOLS)
def test_llm_prompt_ids_reject_bools(value):
    llm = make_llm()
    params = SamplingParams(temperature=0, max_tokens=2)
    n = llm.vocab_size
    calls = {"generate": lambda p: llm.generate(p, params), "stream": lambda p: llm.stream(p, params),
             "generator": llm.generator, "logits": llm.logits}
    for name, call in calls.items():
        prompts = [np.array([value, value]), [1, value], (value,)]
        if name == "generate" and isinstance(value, np.bool_):
            prompts = prompts[:1]   # generate reads a list holding a non-int as a batch of prompts
        for prompt in prompts:
            with pytest.raises(TokenIdError, match=a_bool(value, n, "prompt token id")):
                call(prompt)
    assert not any(llm.slots.busy)


def test_llm_prompt_ids_out_of_range_and_non_integers():
    llm = make_llm()
    n = llm.vocab_size
    with pytest.raises(TokenIdError, match=outside(n, n, "prompt token id")):
        llm.generate([0, n], SamplingParams(max_tokens=1))
    with pytest.raises(TokenIdError, match=outside(-1, n, "prompt token id")):
        llm.logits(np.array([2, -1]))
    with pytest.raises(TokenIdError, match="prompt token id 1.5 is not an integer"):
        llm.generator([1.5])           # not truncated to 1
    with pytest.raises(InvalidParameterError, match="a prompt is a str or a list"):
        llm.generate(np.array([[1, 2]]))
    completion = llm.generate(np.array([1, 2], np.int32), SamplingParams(temperature=0, max_tokens=1))
    assert completion.prompt_token_ids == [1, 2]
    assert not any(llm.slots.busy)


@pytest.mark.parametrize("bad", [True, np.False_, 1.0, "3", None])
def test_generator_append_tokens_rejects_non_integers_and_keeps_its_state(bad):
    llm = make_llm()
    g = Generator(llm, SamplingParams(temperature=0, max_tokens=4), [1, 2])
    shown = bool(bad) if isinstance(bad, np.bool_) else bad
    with pytest.raises(TokenIdError, match=re.escape(f"token id {shown!r} ") + f".*\\[0, {llm.vocab_size}\\)"):
        g.append_tokens([3, bad])
    with pytest.raises(TokenIdError, match=outside(llm.vocab_size, llm.vocab_size)):
        g.append_tokens(np.array([3, llm.vocab_size]))
    assert g.tokens == [1, 2] and g.sampler_state.prompt_token_ids == [1, 2]
    g.append_tokens(np.array([3], np.int64))
    assert g.tokens == [1, 2, 3] and g.sampler_state.prompt_token_ids == [1, 2, 3]
    assert all(type(t) is int for t in g.tokens)
    g.close()
    assert not any(llm.slots.busy)


@pytest.mark.parametrize("value", [True, np.True_])
def test_sampling_params_reject_bool_ids_as_token_id_errors(value):
    for field, given_value in [("logit_bias", {value: 1.0}), ("allowed_token_ids", [1, value]),
                               ("stop_token_ids", [value])]:
        with pytest.raises(TokenIdError, match=a_bool(value, "vocab_size", f"{field} token id")):
            SamplingParams(**{field: given_value})   # the vocabulary is not known yet: type and sign only


def test_sampler_entry_points_share_the_message():
    n = 10
    sampler = Sampler(n)
    for params, what, bad in [(SamplingParams(logit_bias={3: 1.0, n: 1.0}), "logit_bias token id", n),
                              (SamplingParams(allowed_token_ids=[5, n + 7]), "allowed_token_ids token id", n + 7),
                              (SamplingParams(stop_token_ids=[n]), "stop_token_ids token id", n)]:
        with pytest.raises(TokenIdError, match=outside(bad, n, what)):
            sampler.new_state(params)
    with pytest.raises(TokenIdError, match=outside(n, n, "prompt token id")):
        sampler.new_state(SamplingParams(), prompt_token_ids=[1, n])
    with pytest.raises(TokenIdError, match=a_bool(True, n, "prompt token id")):
        sampler.new_state(SamplingParams(), prompt_token_ids=[True])
    with pytest.raises(TokenIdError, match=a_bool(True, n, "prompt token id")):
        sampler.new_state(SamplingParams()).extend_prompt([2, True])
    with pytest.raises(TokenIdError, match=a_bool(True, n, "eos_token_ids token id")):
        Sampler(n, eos_token_ids=[True])
    with pytest.raises(TokenIdError, match=outside(n, n, "eos_token_ids token id")):
        Sampler(n, eos_token_ids=[n])
    with pytest.raises(TokenIdError, match=outside(n + 1, n, "bad_words token id")):
        Sampler(n, encode=lambda text: [2, n + 1]).new_state(SamplingParams(bad_words=["bad"]))
