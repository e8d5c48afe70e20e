"""Structured output (json_schema / regex / grammar / json_object) and logits processors.

References are independent of llguidance: Python's `re` (fullmatch) for regexes, the `jsonschema`
package for JSON schemas, `json` for JSON objects, a hand-written recogniser for the Lark grammar,
and for batch invariance and processors the fake model's own cache-free reference
(`fake_backend.reference_logits`). The fake backend (character vocabulary, fast) is used wherever
the model's math does not matter; the bundled SmolLM2 (49,152 BPE tokens) where the vocabulary
does: JSON needs quotes and braces, and byte-level BPE tokens span several grammar symbols.
"""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

from fake_backend import greedy_reference, make_fake_llm, reference_logits
from lmengine import LLM, SamplingParams
from lmengine.errors import InvalidParameterError

# --------------------------------------------------------------------------------------------- fake model

WORDS_RE = r"[a-z]{2,5}( [a-z]{1,4}){1,3}[.!]"


@pytest.fixture
def fake():
    llm = make_fake_llm(n_slots=6, n_ctx=96)
    yield llm
    llm.close()


def _run_together(llm, prompts_and_params):
    """Submit every (prompt, params) to the scheduler at once and run them in shared steps.
    Returns the requests (their generators hold the results)."""
    requests = [llm.scheduler.submit(llm.tokenizer.encode(p), params) for p, params in prompts_and_params]
    llm.scheduler.run_until_done(requests)
    return requests


def test_regex_fullmatches_for_20_seeds(fake):
    for seed in range(20):
        out = fake.generate("hello", SamplingParams(regex=WORDS_RE, temperature=1.0, seed=seed, max_tokens=40))
        assert out.finish_reason == "stop", (seed, out.text)
        assert out.token_ids[-1] in fake.eos_token_ids       # ended by EOS, allowed once complete
        assert re.fullmatch(WORDS_RE, out.text), (seed, out.text)


def test_greedy_regex(fake):
    out = fake.generate("abc", SamplingParams(regex=r"(yes|no|maybe)", temperature=0, max_tokens=10))
    assert out.text in ("yes", "no", "maybe") and out.finish_reason == "stop"


def test_lark_grammar(fake):
    grammar = r'''
start: answer "."
answer: "yes" | "no" | "maybe " WORD
WORD: /[a-z]{1,6}/
'''
    texts = set()
    for seed in range(12):
        out = fake.generate("q", SamplingParams(grammar=grammar, temperature=1.0, seed=seed, max_tokens=20))
        assert out.finish_reason == "stop"
        # independent recogniser of the same language
        assert out.text in ("yes.", "no.") or re.fullmatch(r"maybe [a-z]{1,6}\.", out.text), out.text
        texts.add(out.text)
    assert len(texts) > 1          # the constraint restricts, it does not force one answer


def test_eos_allowed_exactly_when_complete(fake):
    """For every prefix of a few strings, EOS is allowed iff Python's re fullmatches the prefix,
    and a character token is allowed iff re says the prefix + character can still complete
    (checked with a regex that has an easy prefix test: the alphabet is known)."""
    regex = r"ab(c|de)?"
    constraint = fake.sampler.constraints.compile("regex", SamplingParams(regex=regex).constraint[1])
    tok = fake.tokenizer
    eos = tok.eos_id
    completions = ["ab", "abc", "abde"]          # the whole language
    for text in ["", "a", "ab", "abd", "abc", "abde"]:
        constraint.reset()
        for ch in text:
            constraint.consume(tok.encode(ch)[0])
        allowed = constraint.allowed()
        assert allowed[eos] == bool(re.fullmatch(regex, text)), text
        expected = {w[len(text)] for w in completions if w.startswith(text) and len(w) > len(text)}
        got = {tok.decode([i]) for i in np.flatnonzero(allowed) if i != eos}
        assert got == expected, text


def test_max_tokens_cut_reports_length(fake):
    regex = r"[a-z]{30}"
    out = fake.generate("x", SamplingParams(regex=regex, temperature=1.0, seed=3, max_tokens=5))
    assert out.finish_reason == "length"            # not "stop": the output is unfinished
    assert len(out.text) == 5 and re.fullmatch(r"[a-z]{5}", out.text)
    assert not re.fullmatch(regex, out.text)


def test_stop_string_interplay(fake):
    """A stop string the grammar produces ends the request with "stop" and stop_reason set to it
    (the caller asked for the cut); the text before it is a prefix of a valid output."""
    out = fake.generate("x", SamplingParams(regex=r"abc def", temperature=0, max_tokens=20, stop=[" "]))
    assert out.finish_reason == "stop" and out.stop_reason == " " and out.text == "abc"


def test_n_samples_all_valid(fake):
    out = fake.generate("hi", SamplingParams(regex=WORDS_RE, temperature=1.0, seed=5, n=4, max_tokens=40))
    assert len(out.outputs) == 4
    for o in out.outputs:
        assert o.finish_reason == "stop" and re.fullmatch(WORDS_RE, o.text)
    assert len({o.text for o in out.outputs}) > 1     # independent streams


def test_batch_invariance_unconstrained_rows(fake):
    """Unconstrained rows sharing batched steps with constrained rows get exactly the tokens they
    get alone (seeded sampling and greedy), and no mask work is done for them."""
    free_sampled = SamplingParams(temperature=1.0, seed=11, max_tokens=25, ignore_eos=True)
    free_greedy = SamplingParams(temperature=0, max_tokens=25, ignore_eos=True)
    alone = [fake.generate(p, params).token_ids for p, params in (("one", free_sampled), ("two", free_greedy))]
    assert alone[1] == greedy_reference(fake.tokenizer.encode("two"), 25, fake.vocab_size)

    fake.backend.calls.clear()
    reqs = _run_together(fake, [
        ("one", free_sampled),
        ("abc", SamplingParams(regex=WORDS_RE, temperature=1.0, seed=1, max_tokens=25)),
        ("two", free_greedy),
        ("def", SamplingParams(grammar='start: "ok" | "no"', temperature=1.0, seed=2, max_tokens=25)),
    ])
    assert all(r.error is None for r in reqs)
    assert reqs[0].generator.generated == alone[0]
    assert reqs[2].generator.generated == alone[1]
    assert re.fullmatch(WORDS_RE, reqs[1].generator.text)
    assert reqs[3].generator.text in ("ok", "no")
    batches = [c for c in fake.backend.calls if c[0] == "forward_batch"]
    assert any(len(c[1]) == 4 for c in batches)       # the four really shared decode steps
    for r, constrained in zip(reqs, (False, True, False, True)):
        assert (r.generator.sampler_state.constraint is not None) == constrained


def test_rewind_and_copy_keep_the_constraint_in_step(fake):
    params = SamplingParams(regex=r"[a-c]{4},[x-z]{3}", temperature=1.0, seed=4, max_tokens=20)
    with fake.generator("p", params) as g:
        for _ in range(6):
            g.step()
        assert g.text[:4].strip("abc") == "" and g.text[4] == ","
        fork = g.sampler_state.copy()
        g.rewind_to(g.n_prompt + 2)                 # back into the [a-c]{4} part
        allowed = g.sampler_state.constraint.allowed()
        assert {fake.tokenizer.decode([i]) for i in np.flatnonzero(allowed)} == {"a", "b", "c"}
        # the copy is independent: still after ",x" or similar, where only x-z is allowed
        fork_allowed = {fake.tokenizer.decode([i]) for i in np.flatnonzero(fork.constraint.allowed())}
        assert fork_allowed == {"x", "y", "z"}
        while not g.is_done():
            g.step()
        assert g.finish_reason == "stop" and re.fullmatch(r"[a-c]{4},[x-z]{3}", g.text)


def test_apply_mask_matches_bitwise_reference():
    """apply_mask (a byte lookup table) against bits read one by one with Python integers."""
    from lmengine.constraints import apply_mask, unpack_mask
    rng = np.random.default_rng(0)
    for vocab in (1, 31, 32, 33, 1000):
        words = rng.integers(-2**31, 2**31, (vocab + 31) // 32, dtype=np.int64).astype(np.int32)
        logits = rng.normal(0, 3, vocab).astype(np.float32)
        logits[0] = -np.inf                                         # an earlier ban stays a ban
        expected = np.array([logits[t] if (int(words[t // 32]) >> (t % 32)) & 1 else -np.inf
                             for t in range(vocab)], dtype=np.float32)
        got = logits.copy()
        apply_mask(got, words)
        np.testing.assert_array_equal(got, expected)                # exact: allowed logits + 0.0
        allowed = unpack_mask(words[None, :], vocab)[0]
        assert allowed.tolist() == [bool((int(words[t // 32]) >> (t % 32)) & 1) for t in range(vocab)]


# --------------------------------------------------------------------------------------------- parameters

@pytest.mark.parametrize("kwargs, names", [
    (dict(json_schema={"type": "object"}, regex="a"), "json_schema, regex"),
    (dict(regex="a", grammar='start: "a"'), "regex, grammar"),
    (dict(json_object=True, json_schema={"type": "string"}), "json_schema, json_object"),
])
def test_at_most_one_constraint(kwargs, names):
    with pytest.raises(InvalidParameterError, match=f"at most one of .* got {names}"):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("kwargs, message", [
    (dict(regex="(ab"), r"(?s)regex is not valid: .*unclosed group"),
    (dict(regex="a{3"), r"(?s)regex is not valid: .*repetition"),
    (dict(grammar="start: foo"), r"grammar is not valid: .*unknown name"),
    (dict(grammar="start: ("), r"grammar is not valid"),
    (dict(json_schema={"type": "foo"}), r"json_schema is not valid: .*foo"),
    (dict(json_schema="{not json"), r"json_schema is not valid JSON"),
    (dict(json_schema=[1, 2]), r"json_schema must be a JSON schema object"),
    (dict(regex=5), r"regex must be a str"),
    (dict(json_object="yes"), r"json_object must be True or False"),
    (dict(logits_processors=lambda ids, logits: None), r"logits_processors must be a sequence of callables"),
    (dict(logits_processors=[1]), r"logits_processors\[0\] must be callable"),
    (dict(regex="a", beam_width=2, temperature=0), r"regex cannot be combined with beam search"),
    (dict(json_object=True, ignore_eos=True), r"json_object cannot be combined with ignore_eos"),
])
def test_invalid_constraints_fail_at_creation(kwargs, message):
    with pytest.raises(InvalidParameterError, match=message):
        SamplingParams(**kwargs)


def test_params_store_normalised_values():
    schema = {"type": "object", "properties": {"b": {"type": "integer"}, "a": {"type": "string"}}}
    p = SamplingParams(json_schema=schema, max_tokens=5)
    assert json.loads(p.json_schema) == schema
    assert list(json.loads(p.json_schema)["properties"]) == ["b", "a"]     # order kept
    assert p.constraint[0] == "json_schema"
    assert p.replace(max_tokens=6).json_schema == p.json_schema
    assert hash(p) == hash(SamplingParams(json_schema=json.dumps(schema), max_tokens=5))
    assert SamplingParams().constraint is None
    f = lambda ids, logits: None        # noqa: E731
    assert SamplingParams(logits_processors=[f]).logits_processors == (f,)


# --------------------------------------------------------------------------------------------- processors

def test_logits_processor_bans_a_token(fake):
    prompt = fake.tokenizer.encode("the")
    first = greedy_reference(prompt, 1, fake.vocab_size)[0]
    seen = []

    def ban_first(generated_ids, logits):
        assert generated_ids.dtype == np.int32 and not generated_ids.flags.writeable
        assert logits.dtype == np.float32 and logits.shape == (fake.vocab_size,)
        seen.append((generated_ids.tolist(), logits.copy()))
        logits[first] = -np.inf

    out = fake.generate("the", SamplingParams(temperature=0, max_tokens=10, ignore_eos=True,
                                              logits_processors=[ban_first]))
    # reference: greedy decoding of the fake model with `first` banned, computed without a cache
    seq, expected = list(prompt), []
    for _ in range(10):
        logits = reference_logits(seq, fake.vocab_size)
        logits[first] = -np.inf
        expected.append(int(np.argmax(logits)))
        seq.append(expected[-1])
    assert out.token_ids == expected and first not in out.token_ids
    # the processor saw the tokens generated so far and the raw model logits of each step
    assert [ids for ids, _ in seen] == [expected[:k] for k in range(10)]
    for k, (_, logits) in enumerate(seen):
        np.testing.assert_array_equal(logits, reference_logits(prompt + expected[:k], fake.vocab_size))


def test_raising_processor_fails_only_its_request(fake):
    def broken(generated_ids, logits):
        if len(generated_ids) == 3:
            raise RuntimeError("boom")

    good = SamplingParams(temperature=1.0, seed=8, max_tokens=12, ignore_eos=True)
    alone = fake.generate("good", good).token_ids
    reqs = _run_together(fake, [
        ("good", good),
        ("bad", SamplingParams(temperature=1.0, seed=9, max_tokens=12, ignore_eos=True, logits_processors=[broken])),
        ("json", SamplingParams(regex=WORDS_RE, temperature=1.0, seed=3, max_tokens=40)),
    ])
    assert reqs[0].error is None and reqs[0].generator.generated == alone
    assert isinstance(reqs[1].error, InvalidParameterError)
    assert "logits_processors[0] (broken) raised RuntimeError: boom" in str(reqs[1].error)
    assert isinstance(reqs[1].error.__cause__, RuntimeError)
    assert reqs[2].error is None and re.fullmatch(WORDS_RE, reqs[2].generator.text)
    with pytest.raises(InvalidParameterError, match="boom"):
        fake.generate("bad", SamplingParams(max_tokens=5, logits_processors=[broken], ignore_eos=True))
    assert fake.generate("good", good).token_ids == alone          # the LLM is still healthy


def test_constraint_with_no_token_left_fails_only_its_request(fake):
    """A grammar whose only continuation is banned (bad_words) leaves nothing to sample: that
    request fails with a clear error, the others go on."""
    good = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    reqs = _run_together(fake, [
        ("aa", good),
        ("bb", SamplingParams(regex="zz", bad_words=["z"], temperature=0, max_tokens=8)),
    ])
    assert reqs[0].error is None and len(reqs[0].generator.generated) == 8
    assert isinstance(reqs[1].error, InvalidParameterError)
    assert "no token left to sample" in str(reqs[1].error)


# --------------------------------------------------------------------------------------------- real model

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"type": "string", "enum": ["Paris", "London", "Tokyo", "New York"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 3},
    },
    "required": ["name", "age", "city", "tags"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def smol(smollm2_path):
    llm = LLM(smollm2_path, n_ctx=512, max_batch_size=8)
    yield llm
    llm.close()


def _chat_prompt(llm, text):
    return llm.chat_template.render([{"role": "user", "content": text}], add_generation_prompt=True)


@pytest.mark.slow   # 20 generations of ~40 tokens: about a minute on 2 cores
def test_json_schema_validates_for_20_seeds(smol):
    jsonschema = pytest.importorskip("jsonschema")
    prompt = _chat_prompt(smol, "Describe a person as JSON with name, age, city and tags.")
    for seed in range(20):
        out = smol.generate(prompt, SamplingParams(json_schema=PERSON, temperature=1.0, seed=seed, max_tokens=120))
        assert out.finish_reason == "stop", (seed, out.text)
        jsonschema.validate(json.loads(out.text), PERSON)


def test_json_object(smol):
    # An open-ended prompt ("describe a cat") lets a 135M model nest keys until max_tokens runs
    # out; a prompt that shows the object keeps the run short. Sampled at temperature 0.7, the
    # model still varies it (duplicate keys, nesting): what is checked is that it parses.
    prompt = _chat_prompt(smol, 'Reply with this JSON object and nothing else: {"name": "Tom", "age": 3, "color": "grey"}')
    for kw in (dict(temperature=0), dict(temperature=0.7, seed=1), dict(temperature=0.7, seed=2)):
        out = smol.generate(prompt, SamplingParams(json_object=True, max_tokens=80, **kw))
        assert out.finish_reason == "stop", out.text
        assert isinstance(json.loads(out.text), dict)
        assert out.text.startswith("{") and out.text.endswith("}")      # nothing before or after


def test_regex_on_bpe_vocabulary(smol):
    regex = r"\(\d{3}\) \d{3}-\d{4}"
    prompt = _chat_prompt(smol, "Write a US phone number.")
    for seed in range(5):
        out = smol.generate(prompt, SamplingParams(regex=regex, temperature=1.0, seed=seed, max_tokens=30))
        assert out.finish_reason == "stop" and re.fullmatch(regex, out.text), out.text


def test_lark_grammar_on_bpe_vocabulary(smol):
    grammar = r'''
start: "The answer is " answer "."
answer: "yes" | "no" | NUMBER
NUMBER: /[0-9]{1,3}/
'''
    prompt = _chat_prompt(smol, "Is the sky blue?")
    for seed in range(5):
        out = smol.generate(prompt, SamplingParams(grammar=grammar, temperature=1.0, seed=seed, max_tokens=30))
        assert out.finish_reason == "stop"
        assert re.fullmatch(r"The answer is (yes|no|[0-9]{1,3})\.", out.text), out.text


def test_real_model_batch_invariance(smol):
    """A greedy unconstrained request batched with JSON-constrained ones gets the tokens it gets alone."""
    free = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    alone = smol.generate("The capital of France is", free).token_ids
    reqs = _run_together(smol, [
        ("The capital of France is", free),
        (_chat_prompt(smol, "A person as JSON."), SamplingParams(json_schema=PERSON, temperature=1.0, seed=1,
                                                                 max_tokens=120)),
        (_chat_prompt(smol, "Phone?"), SamplingParams(regex=r"\d{3}-\d{4}", temperature=1.0, seed=2, max_tokens=24)),
    ])
    assert all(r.error is None for r in reqs)
    assert reqs[0].generator.generated == alone
    assert json.loads(reqs[1].generator.text) is not None and re.fullmatch(r"\d{3}-\d{4}", reqs[2].generator.text)
