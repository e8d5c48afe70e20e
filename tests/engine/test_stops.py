"""lmengine.stops.TextStream: stop strings across deltas, holdback, truncation, flush."""
import random

import pytest

from lmengine.stops import TextStream


def run(deltas, stop, include=False, allow=None):
    """Push every delta; return (shown pieces, stream)."""
    stream = TextStream(stop, include_stop_str_in_output=include)
    pieces = [stream.push(d, allow_stop=True if allow is None else allow[i]) for i, d in enumerate(deltas)]
    pieces.append(stream.flush())
    return pieces, stream


def reference(text, stop, include=False):
    """Independent reference on the whole text: the stop occurrence that ends first (longest on a
    tie) cuts the output. Returns (output text, matched stop or None)."""
    for end in range(1, len(text) + 1):
        ending_here = [s for s in stop if end >= len(s) and text[end - len(s):end] == s]
        if ending_here:
            s = max(ending_here, key=len)
            return (text[:end] if include else text[:end - len(s)]), s
    return text, None


def test_stop_split_across_three_deltas():
    pieces, stream = run(["Hel", "lo wor", "ld"], ["lo w"])
    assert pieces == ["He", "l", "", ""]        # "l" held back: it may start "lo w"
    assert stream.text == "Hel"
    assert stream.stopped and stream.stop_string == "lo w" and stream.finish_reason == "stop"


def test_include_stop_str_in_output():
    pieces, stream = run(["Hel", "lo wor", "ld"], ["lo w"], include=True)
    assert "".join(pieces) == stream.text == "Hello w"
    assert stream.finish_reason == "stop"


def test_never_shows_part_of_a_stop_string():
    stream = TextStream(["END"])
    assert stream.push("the E") == "the "
    assert stream.held_back == "E"
    assert stream.push("N") == ""
    assert stream.held_back == "EN"
    assert stream.push("D and more") == ""
    assert stream.text == "the " and stream.stop_string == "END"


def test_holdback_released_on_flush():
    stream = TextStream(["END"])
    assert stream.push("the EN") == "the "
    assert stream.flush() == "EN"
    assert stream.text == "the EN" and not stream.stopped and stream.finish_reason is None


def test_false_start_is_released_when_the_next_delta_breaks_it():
    stream = TextStream(["abc"])
    assert stream.push("xab") == "x"
    assert stream.push("d") == "abd"


def test_overlapping_candidates():
    # "abcd" is a candidate until "e" arrives; "bce" then completes and wins.
    pieces, stream = run(["ab", "c", "e", "f"], ["abcd", "bce"])
    assert stream.text == "a" and stream.stop_string == "bce"
    # self-overlapping stop string: "aaab" must cut at index 1
    pieces, stream = run(list("aaab"), ["aab"])
    assert stream.text == "a" and stream.stop_string == "aab"


def test_earliest_ending_stop_wins_regardless_of_list_order():
    _, stream = run(["hello world"], ["world", "o"])
    assert stream.text == "hell" and stream.stop_string == "o"
    # same end: the longest one (it starts first) is cut
    _, stream = run(["xab"], ["b", "ab"])
    assert stream.text == "x" and stream.stop_string == "ab"


def test_multibyte_text():
    pieces, stream = run(list("日本語のテキスト"), ["のテ"])
    assert stream.text == "日本語" and stream.stop_string == "のテ"
    pieces, stream = run(["I ❤️", " 🦀🦀", " crabs"], ["🦀 "], include=True)
    assert stream.text == "I ❤️ 🦀🦀 "
    _, stream = run(["naïve café"], ["é!"])
    assert stream.flush() == "" and stream.text == "naïve café"


def test_no_stop_strings_passes_text_through():
    stream = TextStream([])
    assert stream.push("abc") == "abc"
    assert stream.held_back == "" and stream.flush() == ""


def test_text_after_stop_is_dropped():
    stream = TextStream(["\n"])
    assert stream.push("line one\nline two") == "line one"
    assert stream.push("more") == "" and stream.flush() == ""
    assert stream.text == "line one"


def test_allow_stop_false_ignores_stops_ending_there():
    # min_tokens: a stop that ends inside text pushed with allow_stop=False never matches
    pieces, stream = run(["a", "b", "c", "b"], ["b"], allow=[False, False, True, True])
    assert stream.text == "abc" and stream.stop_string == "b"
    # a stop that started earlier but ends in allowed text does match
    pieces, stream = run(["x", "ST", "OP"], ["STOP"], allow=[False, False, True])
    assert stream.text == "x" and stream.stop_string == "STOP"


@pytest.mark.parametrize("include", [False, True])
def test_random_chunkings_match_the_whole_text_reference(include):
    rng = random.Random(1234)
    alphabet = "abcé日 "
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        stop = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
        cuts = sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randint(0, 8)))) if len(text) > 1 else []
        deltas = [text[i:j] for i, j in zip([0] + cuts, cuts + [len(text)])]
        stream = TextStream(stop, include_stop_str_in_output=include)
        pieces = []
        for d in deltas:
            pieces.append(stream.push(d))
            # the holdback is always a proper prefix of some stop string
            assert len(stream.held_back) < max(map(len, stop))
            assert stream.held_back == "" or any(s.startswith(stream.held_back) for s in stop)
        pieces.append(stream.flush())
        expected_text, expected_stop = reference(text, stop, include)
        assert "".join(pieces) == stream.text == expected_text, (text, stop, deltas)
        assert stream.stop_string == expected_stop
