"""lmengine.params.SamplingParams: defaults, validation, normalisation, explicit fields, model defaults."""
import dataclasses
import math

import gguf
import numpy as np
import pytest

from lmengine.errors import InvalidParameterError, TokenIdError
from lmengine.params import DEFAULTS, GGUF_SAMPLING_KEYS, SamplingParams


def test_neutral_defaults_match_vllm():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_k, p.top_p, p.min_p, p.typical_p) == (1, 1.0, 0, 1.0, 0.0, 1.0)
    assert (p.repetition_penalty, p.presence_penalty, p.frequency_penalty) == (1.0, 0.0, 0.0)
    assert p.logit_bias == {} and p.allowed_token_ids is None and p.bad_words == ()
    assert p.seed is None and p.stop == () and p.stop_token_ids == () and p.ignore_eos is False
    assert (p.max_tokens, p.min_tokens, p.logprobs, p.prompt_logprobs) == (16, 0, None, None)
    assert p.skip_special_tokens is True and p.include_stop_str_in_output is False and p.beam_width == 1
    assert p.fields_set == frozenset()
    assert all(getattr(p, name) == value for name, value in DEFAULTS.items())


def test_frozen_and_hashable():
    p = SamplingParams(stop=["a", "b"], stop_token_ids=[3, 4], logit_bias={5: -1.0},
                       allowed_token_ids=[1, 2], bad_words=["x"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.temperature = 0.5
    with pytest.raises(TypeError):
        p.logit_bias[5] = 2.0
    same = SamplingParams(stop=("a", "b"), stop_token_ids=(3, 4), logit_bias={5: -1.0},
                          allowed_token_ids=(1, 2), bad_words=("x",))
    assert p == same and hash(p) == hash(same) and len({p, same}) == 1


def test_normalisation():
    p = SamplingParams(stop="###", top_k=-1, stop_token_ids=np.array([7, 7, 9]), temperature=np.float32(0.5),
                       logit_bias={np.int64(3): 2})
    assert p.stop == ("###",)
    assert p.top_k == 0                                  # -1 is vLLM's "off"
    assert p.stop_token_ids == (7, 9) and all(type(t) is int for t in p.stop_token_ids)
    assert p.temperature == 0.5 and type(p.temperature) is float
    assert p.logit_bias == {3: 2.0}
    assert SamplingParams(stop=["a", "a", "b"]).stop == ("a", "b")


@pytest.mark.parametrize("field, value", [
    ("n", 0), ("n", 1.5), ("n", True),
    ("temperature", -0.1), ("temperature", math.inf), ("temperature", math.nan), ("temperature", "hot"),
    ("top_k", -2), ("top_k", 2.0),
    ("top_p", 0.0), ("top_p", 1.5), ("top_p", -0.5),
    ("min_p", -0.1), ("min_p", 1.01),
    ("typical_p", 0.0), ("typical_p", 1.2),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0),
    ("presence_penalty", 2.5), ("presence_penalty", -2.01),
    ("frequency_penalty", 3.0), ("frequency_penalty", -2.5),
    ("logit_bias", {-1: 1.0}), ("logit_bias", {"a": 1.0}), ("logit_bias", {1: math.inf}), ("logit_bias", [1, 2]),
    ("allowed_token_ids", []), ("allowed_token_ids", [1, -2]), ("allowed_token_ids", "12"),
    ("bad_words", [""]), ("bad_words", [3]),
    ("seed", -1), ("seed", 1.5),
    ("stop", [""]), ("stop", ["ok", 5]), ("stop", 5),
    ("stop_token_ids", [-1]), ("stop_token_ids", [1.5]), ("stop_token_ids", 3),
    ("ignore_eos", 1), ("skip_special_tokens", "yes"), ("include_stop_str_in_output", None),
    ("max_tokens", 0), ("max_tokens", -5),
    ("min_tokens", -1),
    ("logprobs", -1), ("prompt_logprobs", -3),
    ("beam_width", 0),
])
def test_invalid_value_names_the_field(field, value):
    with pytest.raises(InvalidParameterError) as info:
        SamplingParams(**{field: value})
    assert isinstance(info.value, ValueError)
    assert field in str(info.value)


@pytest.mark.parametrize("field, value", [
    ("logit_bias", {True: 1.0}), ("logit_bias", {np.False_: 1.0}), ("allowed_token_ids", [3, True]),
    ("allowed_token_ids", np.array([True])), ("stop_token_ids", [np.True_]), ("stop_token_ids", [-1]),
    ("logit_bias", {-1: 1.0}), ("allowed_token_ids", [1.5]),
])
def test_bad_token_ids_are_token_id_errors(field, value):
    """Token ids are checked by the engine's one check (lmengine.validation) for type and sign;
    the vocabulary is not known yet (the sampler checks the range). A bool is not token 1."""
    with pytest.raises(TokenIdError, match=rf"^{field} token id .* the vocabulary \[0, vocab_size\)$") as info:
        SamplingParams(**{field: value})
    assert isinstance(info.value, InvalidParameterError)


def test_message_states_rule_and_value():
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\], got 1\.5"):
        SamplingParams(top_p=1.5)


def test_relations_between_fields():
    with pytest.raises(InvalidParameterError, match="min_tokens.*max_tokens"):
        SamplingParams(min_tokens=10, max_tokens=5)
    assert SamplingParams(min_tokens=10, max_tokens=None).min_tokens == 10
    with pytest.raises(InvalidParameterError, match="beam_width.*temperature"):
        SamplingParams(beam_width=4)
    with pytest.raises(InvalidParameterError, match="n must be <= beam_width"):
        SamplingParams(beam_width=2, n=3, temperature=0)
    assert SamplingParams(beam_width=4, n=2, temperature=0).beam_width == 4


def test_boundary_values_accepted():
    SamplingParams(temperature=0, top_p=1.0, min_p=1.0, typical_p=1.0, presence_penalty=-2, frequency_penalty=2,
                   top_k=1, max_tokens=None, seed=0, logprobs=0, prompt_logprobs=0)
    assert SamplingParams(top_k=1).is_greedy and SamplingParams(temperature=0).is_greedy
    assert not SamplingParams().is_greedy


def test_fields_set_records_explicit_neutral_values():
    p = SamplingParams(temperature=1.0, max_tokens=16)      # neutral values, but chosen
    assert p.fields_set == {"temperature", "max_tokens"}


def test_replace_keeps_fields_set():
    p = SamplingParams(temperature=0.3).replace(top_p=0.9)
    assert (p.temperature, p.top_p) == (0.3, 0.9)
    assert p.fields_set == {"temperature", "top_p"}
    with pytest.raises(InvalidParameterError, match="top_p"):
        p.replace(top_p=7)
    with pytest.raises(InvalidParameterError, match="unknown"):
        p.replace(temprature=1)


def test_gguf_sampling_keys_are_the_gguf_package_constants():
    keys = gguf.Keys.General
    assert set(GGUF_SAMPLING_KEYS) == {keys.SAMPLING_TEMP, keys.SAMPLING_TOP_K, keys.SAMPLING_TOP_P,
                                       keys.SAMPLING_MIN_P, keys.SAMPLING_PENALTY_REPEAT}


def test_model_defaults_fill_only_unset_fields():
    model = {gguf.Keys.General.SAMPLING_TEMP: 0.6, gguf.Keys.General.SAMPLING_TOP_K: 20,
             gguf.Keys.General.SAMPLING_TOP_P: np.float32(0.95), gguf.Keys.General.SAMPLING_MIN_P: 0.05,
             gguf.Keys.General.SAMPLING_PENALTY_REPEAT: 1.1, "general.name": "x",
             gguf.Keys.General.SAMPLING_MIROSTAT: 2}
    user = SamplingParams(temperature=1.0, top_k=0, max_tokens=5)      # explicit neutral values win
    p = user.with_model_defaults(model)
    assert (p.temperature, p.top_k, p.max_tokens) == (1.0, 0, 5)
    assert p.top_p == pytest.approx(0.95) and p.min_p == 0.05 and p.repetition_penalty == 1.1
    q = SamplingParams().with_model_defaults(model)
    assert (q.temperature, q.top_k) == (0.6, 20)
    assert SamplingParams().with_model_defaults({}) == SamplingParams()


def test_invalid_model_default_names_the_key():
    with pytest.raises(InvalidParameterError, match="general.sampling.temp.*temperature"):
        SamplingParams().with_model_defaults({"general.sampling.temp": -1.0})
