"""API conveniences on the fake model (fake_backend.py): sampling fields as keyword arguments,
streams without empty chunks, the verbose log, and the thread-count warning."""
import warnings

import pytest

from fake_backend import expected_text, make_fake_llm
from lmengine import SamplingParams
from lmengine.backends import base
from lmengine.errors import InvalidParameterError, LMEngineWarning

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def test_sampling_fields_as_keyword_arguments():
    llm = make_fake_llm()
    want = llm.generate("hello", GREEDY)
    assert llm.generate("hello", temperature=0, max_tokens=12, ignore_eos=True).token_ids == want.token_ids
    assert llm.generate("hello", GREEDY, max_tokens=5).token_ids == want.token_ids[:5]   # keywords win
    assert "".join(c.text for c in llm.stream("hello", temperature=0, max_tokens=12, ignore_eos=True)) == want.text
    with pytest.raises(InvalidParameterError, match="max_tokenz"):
        llm.generate("hello", max_tokenz=3)
    with pytest.raises(InvalidParameterError, match="max_tokens"):
        llm.generate("hello", max_tokens=0)


def test_stream_chunks_are_never_empty_before_the_last():
    """A stop string of several characters holds text back while it might be starting; those
    tokens ride with the next chunk that has text, so only the final chunk can be empty."""
    llm = make_fake_llm()
    full = expected_text(llm, "hello", 30)
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    for start in range(len(full) - 3):               # every 3-character stop string of the answer
        stop = full[start:start + 3]
        p = params.replace(stop=[stop])
        chunks = list(llm.stream("hello", p))
        assert all(c.text for c in chunks[:-1]), [c.text for c in chunks]
        assert "".join(c.text for c in chunks) == llm.generate("hello", p).text == full[:full.index(stop)]
        assert [t for c in chunks for t in c.token_ids] == llm.generate("hello", p).token_ids


def test_verbose_logs_timings(capsys):
    llm = make_fake_llm()
    llm.verbose = True
    llm.generate(["hello", "world"], GREEDY)
    err = capsys.readouterr().err
    assert "lmengine: prompt eval: 10 tokens" in err and "lmengine: eval:        24 tokens" in err
    assert "lmengine: total:" in err


def test_more_threads_than_cores_warns_once(monkeypatch):
    monkeypatch.setattr(base, "_warned_threads", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert base.checked_thread_count(10_000, 2) == 2
        assert base.checked_thread_count(10_000, 2) == 2
    assert [type(w.message) for w in caught] == [LMEngineWarning]
    assert "n_threads=10000" in str(caught[0].message)


def test_perplexity_window_must_hold_two_tokens():
    llm = make_fake_llm()
    with pytest.raises(InvalidParameterError, match="window must be at least 2"):
        llm.perplexity("hello world", window=1)
    with pytest.raises(InvalidParameterError, match="window"):
        llm.perplexity("hello world", window=0)
    assert llm.perplexity("hello world", window=4) > 0
