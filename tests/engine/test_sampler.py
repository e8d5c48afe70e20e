"""lmengine.sampler.Sampler and kernels/sampling.py.

References: hand-computed distributions, HF transformers' LogitsProcessor / LogitsWarper classes
(on random logits), torch.log_softmax for logprobs, and a chi-square goodness-of-fit test of the
drawn tokens against the expected distribution.

Tolerances: our filters compute float32 weights exp((x - max) / T) (relative error ~1e-7) and
normalise in float64; HF computes its softmax in float32. Probabilities therefore agree to a few
float32 ulps: atol 1e-6 on values <= 1. The
*support* (which tokens survive a filter) must agree exactly; with continuous random logits no
cumulative mass lands within float32 rounding of a threshold (the seeds are fixed).
"""

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from lmengine.errors import InvalidParameterError, TokenIdError
from lmengine.params import SamplingParams
from lmengine.sampler import Sampler, bad_words_token_ids
from lmengine.kernels import sampling as K

PROB_ATOL = 1e-6


def probs_for(params_list, logits, prompts=None, generated=None, eos=()):
    """Sampler.probabilities for one row per params (optionally with history)."""
    logits = np.array(logits, dtype=np.float32, ndmin=2)
    sampler = Sampler(logits.shape[1], eos_token_ids=eos)
    states = []
    for i, params in enumerate(params_list):
        state = sampler.new_state(params, prompts[i] if prompts else ())
        for t in (generated[i] if generated else ()):
            state.record(t)
        states.append(state)
    return sampler.probabilities(logits.copy(), states)


def hf_probs(processors, logits, input_ids=None):
    """softmax of HF's processed scores. HF runs on the float32 logits upcast to float64: in float32
    its cumulative sums over a 49152-token row drift by ~1e-3 relative, enough to move the top-p /
    typical cut by one token on ~10% of flat rows (measured: HF float32 vs HF float64). In float64
    it is the exact reference of the same algorithm."""
    scores = torch.from_numpy(np.array(logits, dtype=np.float32)).double()
    ids = torch.as_tensor(input_ids if input_ids is not None else np.zeros((scores.shape[0], 1)), dtype=torch.long)
    for proc in processors:
        scores = proc(ids, scores)
    return torch.softmax(scores.double(), dim=-1).numpy()


def assert_same_distribution(ours, theirs):
    np.testing.assert_array_equal(ours > 0, theirs > 0)          # same support, exactly
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=PROB_ATOL)


# ---------------------------------------------------------------------------------------------
# Hand-computed distributions
# ---------------------------------------------------------------------------------------------

P4 = np.array([0.1, 0.2, 0.3, 0.4])
LOG_P4 = np.log(P4)


@pytest.mark.parametrize("params, expected", [
    (SamplingParams(), P4),
    (SamplingParams(temperature=0.5), P4 ** 2 / (P4 ** 2).sum()),              # p^(1/T), renormalised
    (SamplingParams(temperature=0), [0, 0, 0, 1]),
    (SamplingParams(top_k=2), [0, 0, 3 / 7, 4 / 7]),
    (SamplingParams(top_k=1, temperature=2.0), [0, 0, 0, 1]),
    (SamplingParams(top_p=0.35), [0, 0, 0, 1]),                             # mass above 0.3 is 0.4 >= 0.35
    (SamplingParams(top_p=0.45), [0, 0, 3 / 7, 4 / 7]),                     # 0.3 kept (0.4 < 0.45), 0.2 not (0.7)
    (SamplingParams(top_p=0.75), [0, 2 / 9, 3 / 9, 4 / 9]),
    (SamplingParams(min_p=0.6), [0, 0, 3 / 7, 4 / 7]),                      # keep p >= 0.24
    (SamplingParams(min_p=0.4), [0, 2 / 9, 3 / 9, 4 / 9]),                  # keep p >= 0.16
    # typical: H = 1.27985; |-ln p - H| = 1.0227, 0.3296, 0.0759, 0.3636 -> order 0.3, 0.2, 0.4, 0.1
    # with cumulative mass 0.3, 0.5, 0.9, 1.0
    (SamplingParams(typical_p=0.45), [0, 0.4, 0.6, 0]),                     # one prefix sum < 0.45 -> keep 2
    (SamplingParams(typical_p=0.6), [0, 2 / 9, 3 / 9, 4 / 9]),
    # composed: T=0.5 gives [1, 4, 9, 16]/30; top_p 0.8 keeps 16, 9 (mass above 0.53 < 0.8), not 4 (0.83)
    (SamplingParams(temperature=0.5, top_p=0.8), [0, 0, 9 / 25, 16 / 25]),
])
def test_hand_computed_small_vector(params, expected):
    # the logits are float32 roundings of log p (relative error 6e-8, |log p| < 2.4): the
    # probabilities are exact up to ~1e-7
    np.testing.assert_allclose(probs_for([params], LOG_P4)[0], expected, rtol=0, atol=1e-7)


def test_log_1_to_10000_top_k_and_top_p():
    """p_i proportional to i (i = 1..N). top-k: the k largest ids. top-p keeps i while the mass
    above it, (S - i(i+1)/2) / S, is < p: for p = 0.5 that is i(i+1) > S = N(N+1)/2, i >= 7071."""
    n = 10000
    i = np.arange(1, n + 1, dtype=np.float64)
    logits = np.log(i)
    probs = probs_for([SamplingParams(top_k=10), SamplingParams(top_p=0.5)], [logits, logits])
    expected_k = np.where(i > n - 10, i, 0) / i[-10:].sum()
    expected_p = np.where(i >= 7071, i, 0) / i[7070:].sum()
    np.testing.assert_allclose(probs[0], expected_k, rtol=1e-6, atol=1e-12)   # rtol: float32 log(i)
    np.testing.assert_array_equal(probs[1] > 0, i >= 7071)
    np.testing.assert_allclose(probs[1], expected_p, rtol=1e-6, atol=1e-12)


def test_top_k_keeps_ties_with_the_kth_value_like_hf():
    logits = [[1.0, 3.0, 2.0, 2.0, 0.5]]
    ours = probs_for([SamplingParams(top_k=2)], logits)
    assert_same_distribution(ours, hf_probs([TopKLogitsWarper(2)], logits))
    assert (ours[0] > 0).sum() == 3


def test_penalties_hand_computed():
    logits = np.array([[2.0, -2.0, 1.0, 0.0, 3.0]], dtype=np.float32)
    row_ptr = np.array([0, 3], dtype=np.int64)
    ids = np.array([0, 1, 4], dtype=np.int32)
    counts = np.array([0, 2, 1], dtype=np.int32)          # token 0 only in the prompt
    K.apply_penalties(logits, row_ptr, ids, counts, np.float32([2.0]), np.float32([0.5]), np.float32([0.25]))
    # 0: 2/2 = 1; 1: -2*2 - 0.25*2 - 0.5 = -5; 4: 3/2 - 0.25 - 0.5 = 0.75; 2, 3 untouched
    np.testing.assert_array_equal(logits, [[1.0, -5.0, 1.0, 0.0, 0.75]])


def test_penalties_in_the_sampler_use_prompt_and_output():
    logits = np.array([2.0, -2.0, 1.0, 0.0, 3.0])
    params = SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    probs = probs_for([params], logits, prompts=[[0]], generated=[[1, 4, 1]])[0]
    edited = np.array([1.0, -5.0, 1.0, 0.0, 0.75])
    # the sampling weights are float32 (relative error ~1e-7): rtol 1e-6
    np.testing.assert_allclose(probs, np.exp(edited) / np.exp(edited).sum(), rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Against HF transformers on random logits
# ---------------------------------------------------------------------------------------------

def random_logits(b, vocab, seed, scale=3.0):
    return (np.random.default_rng(seed).standard_normal((b, vocab)) * scale).astype(np.float32)


@pytest.mark.parametrize("penalty", [0.5, 1.3, 2.0])
def test_repetition_penalty_matches_hf(penalty):
    logits = random_logits(4, 500, seed=1)
    history = np.random.default_rng(2).integers(0, 500, size=(4, 40))
    prompts, generated = [list(h[:25]) for h in history], [list(h[25:]) for h in history]
    ours = probs_for([SamplingParams(repetition_penalty=penalty)] * 4, logits, prompts, generated)
    theirs = hf_probs([RepetitionPenaltyLogitsProcessor(penalty)], logits, history)
    assert_same_distribution(ours, theirs)


@pytest.mark.parametrize("vocab", [1000, 49152])
@pytest.mark.parametrize("name, params, processors", [
    ("temperature", SamplingParams(temperature=0.7), [TemperatureLogitsWarper(0.7)]),
    ("temperature_hot", SamplingParams(temperature=1.8), [TemperatureLogitsWarper(1.8)]),
    ("top_k", SamplingParams(top_k=37), [TopKLogitsWarper(37)]),
    ("top_p", SamplingParams(top_p=0.9), [TopPLogitsWarper(0.9)]),
    ("top_p_small", SamplingParams(top_p=0.3), [TopPLogitsWarper(0.3)]),
    ("typical", SamplingParams(typical_p=0.8), [TypicalLogitsWarper(0.8)]),
    ("min_p", SamplingParams(min_p=0.05), [MinPLogitsWarper(0.05)]),
    ("composed", SamplingParams(temperature=0.8, top_k=200, top_p=0.95, typical_p=0.9, min_p=0.02),
     [TemperatureLogitsWarper(0.8), TopKLogitsWarper(200), TopPLogitsWarper(0.95), TypicalLogitsWarper(0.9),
      MinPLogitsWarper(0.02)]),
    ("composed_no_top_k", SamplingParams(temperature=1.3, top_p=0.8, min_p=0.1),
     [TemperatureLogitsWarper(1.3), TopPLogitsWarper(0.8), MinPLogitsWarper(0.1)]),
])
def test_filters_match_hf(vocab, name, params, processors):
    # scale 3 at vocab 1000 gives a peaked distribution; scale 1 at 49152 a flat one whose top-p
    # nucleus holds thousands of tokens (exercises the growing partial sort).
    logits = random_logits(3, vocab, seed=sum(map(ord, name)), scale=3.0 if vocab == 1000 else 1.0)
    assert_same_distribution(probs_for([params] * 3, logits), hf_probs(processors, logits))


@pytest.mark.parametrize("name, params, processors", [
    ("top_k", SamplingParams(top_k=20), [TopKLogitsWarper(20)]),
    ("top_k_more_than_finite", SamplingParams(top_k=900), [TopKLogitsWarper(900)]),
    ("top_p", SamplingParams(top_p=0.7, temperature=0.8), [TemperatureLogitsWarper(0.8), TopPLogitsWarper(0.7)]),
    ("typical", SamplingParams(typical_p=0.5), [TypicalLogitsWarper(0.5)]),
    ("min_p", SamplingParams(min_p=0.2), [MinPLogitsWarper(0.2)]),
    ("composed", SamplingParams(top_k=300, top_p=0.9, typical_p=0.95, min_p=0.01),
     [TopKLogitsWarper(300), TopPLogitsWarper(0.9), TypicalLogitsWarper(0.95), MinPLogitsWarper(0.01)]),
])
def test_filters_match_hf_with_banned_and_far_outlier_logits(name, params, processors):
    """Rows with -inf (banned) tokens and a few logits far below the rest (a -1e4 bias), which
    squeezes every other token into the first bucket of the bucketed selection."""
    logits = random_logits(2, 1000, seed=31)
    logits[:, 150:300] = -np.inf
    logits[0, :3] = -1e4
    assert_same_distribution(probs_for([params] * 2, logits), hf_probs(processors, logits))


def test_all_equal_logits():
    logits = np.zeros((1, 50), np.float32)
    probs = probs_for([SamplingParams(top_k=7), SamplingParams(top_p=0.11), SamplingParams(typical_p=0.5)],
                      np.repeat(logits, 3, axis=0))
    np.testing.assert_allclose(probs[0], np.full(50, 1 / 50))                        # every tie kept, as HF
    np.testing.assert_allclose(probs[1], np.where(np.arange(50) < 6, 1 / 6, 0))     # mass before the 7th: 0.12
    np.testing.assert_allclose(probs[2], np.full(50, 1 / 50))                        # all keys tie


def test_composed_with_penalties_matches_hf():
    logits = random_logits(2, 800, seed=5)
    history = np.random.default_rng(6).integers(0, 800, size=(2, 60))
    params = SamplingParams(repetition_penalty=1.2, temperature=0.6, top_k=50, top_p=0.9, min_p=0.01)
    ours = probs_for([params] * 2, logits, [list(h) for h in history])
    theirs = hf_probs([RepetitionPenaltyLogitsProcessor(1.2), TemperatureLogitsWarper(0.6), TopKLogitsWarper(50),
                       TopPLogitsWarper(0.9), MinPLogitsWarper(0.01)], logits, history)
    assert_same_distribution(ours, theirs)


def test_rows_with_different_params_in_one_batch():
    logits = random_logits(3, 1000, seed=9)
    params = [SamplingParams(top_k=5), SamplingParams(top_p=0.5, temperature=0.5), SamplingParams(temperature=0)]
    probs = probs_for(params, logits)
    assert_same_distribution(probs[:1], hf_probs([TopKLogitsWarper(5)], logits[:1]))
    assert_same_distribution(probs[1:2], hf_probs([TemperatureLogitsWarper(0.5), TopPLogitsWarper(0.5)], logits[1:2]))
    np.testing.assert_array_equal(probs[2], np.eye(1000)[np.argmax(logits[2])])


# ---------------------------------------------------------------------------------------------
# Drawing: greedy, seeds, batch independence, rewind, empirical distribution
# ---------------------------------------------------------------------------------------------

def test_top_k_1_equals_greedy():
    logits = random_logits(16, 2000, seed=11)
    sampler = Sampler(2000)
    top1 = [sampler.new_state(SamplingParams(top_k=1, temperature=1.5, seed=s)) for s in range(16)]
    greedy = [sampler.new_state(SamplingParams(temperature=0)) for _ in range(16)]
    a = sampler.sample(logits.copy(), top1).token_ids
    b = sampler.sample(logits.copy(), greedy).token_ids
    np.testing.assert_array_equal(a, np.argmax(logits, axis=1))
    np.testing.assert_array_equal(a, b)


def test_greedy_takes_the_first_of_tied_maxima():
    sampler = Sampler(5)
    state = sampler.new_state(SamplingParams(temperature=0))
    assert sampler.sample(np.float32([[0, 2, 1, 2, 2]]), [state]).token_ids[0] == 1


def target_logits(step, vocab):
    return random_logits(1, vocab, seed=1000 + step, scale=2.0)[0]


def run_target(batch_size, steps=50, vocab=1000, target_row=3):
    """Tokens of one seeded request, sampled alongside batch_size - 1 random other requests."""
    sampler = Sampler(vocab, eos_token_ids=[0])
    target = SamplingParams(seed=123, temperature=0.9, top_p=0.95, repetition_penalty=1.1, logprobs=2)
    rng = np.random.default_rng(batch_size)
    others = [SamplingParams(temperature=float(rng.uniform(0.3, 2)), top_k=int(rng.integers(0, 50)),
                             seed=int(rng.integers(1000)) if rng.random() < 0.5 else None,
                             frequency_penalty=float(rng.uniform(0, 1)), logit_bias={5: 3.0})
              for _ in range(batch_size - 1)]
    row = min(target_row, batch_size - 1)
    params = others[:row] + [target] + others[row:]
    states = [sampler.new_state(p, prompt_token_ids=[1, 2, 3]) for p in params]
    tokens = []
    for step in range(steps):
        logits = random_logits(batch_size, vocab, seed=step)
        logits[row] = target_logits(step, vocab)
        tokens.append(int(sampler.sample(logits, states).token_ids[row]))
    return tokens


def test_seed_gives_the_same_tokens_whatever_the_batch():
    alone = run_target(batch_size=1)
    assert run_target(batch_size=1) == alone                # across runs
    assert run_target(batch_size=8) == alone                # across batch compositions
    assert len(set(alone)) > 10                             # actually random, not stuck


def test_different_seeds_and_sample_indices_differ():
    logits = np.tile(target_logits(0, 1000), (1, 1))
    sampler = Sampler(1000)

    def tokens(params, sample_index=0, steps=20):
        state = sampler.new_state(params, sample_index=sample_index)
        return [int(sampler.sample(logits.copy(), [state]).token_ids[0]) for _ in range(steps)]

    assert tokens(SamplingParams(seed=1)) != tokens(SamplingParams(seed=2))
    assert tokens(SamplingParams(seed=1), 0) == tokens(SamplingParams(seed=1), 0)
    assert tokens(SamplingParams(seed=1), 1) != tokens(SamplingParams(seed=1), 0)
    assert tokens(SamplingParams()) != tokens(SamplingParams())             # fresh entropy


def test_rewind_replays_the_same_tokens():
    sampler = Sampler(1000)
    state = sampler.new_state(SamplingParams(seed=7, frequency_penalty=1.0), prompt_token_ids=[4, 5])
    steps = [target_logits(s, 1000)[None, :] for s in range(10)]
    first = [int(sampler.sample(l.copy(), [state]).token_ids[0]) for l in steps]
    state.rewind_to(5)
    assert state.generated_token_ids == first[:5]
    again = [int(sampler.sample(l.copy(), [state]).token_ids[0]) for l in steps[5:]]
    assert again == first[5:]
    with pytest.raises(InvalidParameterError, match="rewind_to"):
        state.rewind_to(11)


def test_copy_continues_independently():
    sampler = Sampler(1000)
    state = sampler.new_state(SamplingParams(seed=5, presence_penalty=1.0))
    steps = [target_logits(s, 1000)[None, :] for s in range(8)]
    for l in steps[:3]:
        sampler.sample(l.copy(), [state])
    fork = state.copy()
    a = [int(sampler.sample(l.copy(), [state]).token_ids[0]) for l in steps[3:]]
    b = [int(sampler.sample(l.copy(), [fork]).token_ids[0]) for l in steps[3:]]
    assert a == b and state.generated_token_ids == fork.generated_token_ids
    fork.record(1)
    assert state.n_generated == 8 and fork.n_generated == 9


def chi_square_p_value(counts, expected_probs):
    """Pearson chi-square test over the support of expected_probs; p-value from the regularised
    upper incomplete gamma function Q(df/2, x/2) (torch.special.gammaincc)."""
    support = expected_probs > 0
    expected = expected_probs[support] * counts.sum()
    statistic = ((counts[support] - expected) ** 2 / expected).sum()
    df = support.sum() - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2.0, dtype=torch.float64),
                                         torch.tensor(statistic / 2.0, dtype=torch.float64)))


def top_p_reference(logits, temperature, top_p):
    """Independent NumPy top-p: sort descending, keep while the mass above is < top_p."""
    p = np.exp((logits - logits.max()) / temperature)
    p /= p.sum()
    order = np.argsort(-p)
    mass_above = np.concatenate([[0.0], np.cumsum(p[order])[:-1]])
    keep = np.zeros_like(p, dtype=bool)
    keep[order[mass_above < top_p]] = True
    q = np.where(keep, p, 0.0)
    return q / q.sum()


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.8, top_p=0.9),
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=1.3, top_k=6),
    SamplingParams(temperature=0.7, min_p=0.1),
    SamplingParams(typical_p=0.8),
])
def test_empirical_distribution_matches(params):
    """20000 draws (400 seeded requests x 50 steps) against the expected distribution.
    Significance 0.001: a correct sampler fails with probability 0.1% per seed set; the seeds are
    fixed, so the outcome is deterministic. Tokens outside the support must never appear."""
    vocab, n_req, steps = 30, 400, 50
    logits = random_logits(1, vocab, seed=21, scale=1.5)[0]
    sampler = Sampler(vocab)
    states = [sampler.new_state(params.replace(seed=s)) for s in range(n_req)]
    counts = np.zeros(vocab)
    for _ in range(steps):
        ids = sampler.sample(np.tile(logits, (n_req, 1)), states).token_ids
        counts += np.bincount(ids, minlength=vocab)
    if params.top_p < 1:
        expected = top_p_reference(logits.astype(np.float64), params.temperature, params.top_p)
    else:
        expected = probs_for([params], logits)[0]
    assert counts[expected == 0].sum() == 0
    assert chi_square_p_value(counts, expected) > 0.001


def test_tiny_temperature_is_stable():
    logits = random_logits(2, 1000, seed=3)
    probs = probs_for([SamplingParams(temperature=1e-6)] * 2, logits)
    assert np.isfinite(probs).all()
    np.testing.assert_array_equal(np.argmax(probs, axis=1), np.argmax(logits, axis=1))
    np.testing.assert_allclose(probs.max(axis=1), 1.0)


# ---------------------------------------------------------------------------------------------
# Token edits: logit bias, allowed tokens, bad words, min_tokens
# ---------------------------------------------------------------------------------------------

def test_logit_bias_and_allowed_token_ids():
    logits = np.float32([[5.0, 1.0, 0.0, 2.0]])
    sampler = Sampler(4)
    biased = sampler.new_state(SamplingParams(temperature=0, logit_bias={2: 10.0}))
    assert sampler.sample(logits.copy(), [biased]).token_ids[0] == 2
    allowed = SamplingParams(allowed_token_ids=[1, 3])
    probs = probs_for([allowed], logits)[0]
    np.testing.assert_allclose(probs, [0, np.e / (np.e + np.e ** 2), 0, np.e ** 2 / (np.e + np.e ** 2)], rtol=1e-6)


def test_bad_words():
    table = {"foo": [5], " foo": [7, 8], "x y": [3, 4], " x y": [3, 4]}
    assert bad_words_token_ids(["foo", "x y"], table.__getitem__) == ((5,), (7, 8), (3, 4))
    sampler = Sampler(10, encode=table.__getitem__)
    logits = np.zeros((1, 10), np.float32)
    logits[0, [5, 8]] = 10.0                     # 5 and 8 are the model's favourites
    state = sampler.new_state(SamplingParams(temperature=0, bad_words=["foo"]))
    assert sampler.sample(logits.copy(), [state]).token_ids[0] == 8     # 5 is always banned
    state.record(7)                                                      # now " foo" would complete
    assert sampler.sample(logits.copy(), [state]).token_ids[0] == 0
    with pytest.raises(InvalidParameterError, match="bad_words"):
        Sampler(10).new_state(SamplingParams(bad_words=["foo"]))


def test_min_tokens_bans_eos_and_stop_ids():
    sampler = Sampler(6, eos_token_ids=[2])
    state = sampler.new_state(SamplingParams(temperature=0, min_tokens=3, stop_token_ids=[4]))
    logits = np.float32([[0, 1, 9, 3, 8, 2]])                # EOS (2) then stop id (4) are the best
    tokens = [int(sampler.sample(logits.copy(), [state]).token_ids[0]) for _ in range(4)]
    assert tokens == [3, 3, 3, 2]


def test_no_token_left_raises_and_keeps_the_random_stream():
    sampler = Sampler(4, eos_token_ids=[2])
    params = SamplingParams(allowed_token_ids=[2], min_tokens=1, seed=3)
    state = sampler.new_state(params)
    with pytest.raises(InvalidParameterError, match="no token left"):
        sampler.sample(np.zeros((1, 4), np.float32), [state])
    assert state.n_generated == 0
    assert state.rng.random() == sampler.new_state(params).rng.random()


def test_token_ids_outside_the_vocabulary():
    sampler = Sampler(100)
    for params in [SamplingParams(logit_bias={100: 1.0}), SamplingParams(allowed_token_ids=[5, 200]),
                   SamplingParams(stop_token_ids=[100])]:
        with pytest.raises(TokenIdError):
            sampler.new_state(params)
    with pytest.raises(TokenIdError, match="prompt"):
        sampler.new_state(SamplingParams(), prompt_token_ids=[1, 100])
    with pytest.raises(InvalidParameterError, match="logprobs"):
        sampler.new_state(SamplingParams(logprobs=101))
    with pytest.raises(InvalidParameterError, match="shape"):
        sampler.sample(np.zeros((2, 100), np.float32), [sampler.new_state(SamplingParams())])


def test_kernels_check_bounds_before_indexing():
    logits = np.zeros((2, 10), np.float32)
    with pytest.raises(ValueError):
        K.ban_tokens(logits, np.array([0, 1, 2], np.int64), np.array([3, 10], np.int32))
    with pytest.raises(ValueError):
        K.add_logit_bias(logits, np.array([0, 5, 1], np.int64), np.array([1], np.int32), np.float32([1]))
    with pytest.raises(ValueError):
        K.apply_penalties(logits, np.array([0, 1, 1], np.int64), np.array([-1], np.int32), np.int32([1]),
                          np.float32([1, 1]), np.float32([0, 0]), np.float32([0, 0]))
    with pytest.raises(ValueError):
        K.token_logprobs(logits, np.zeros(2), np.int32([0, 10]))
    np.testing.assert_array_equal(logits, 0)


# ---------------------------------------------------------------------------------------------
# Logprobs (raw model distribution)
# ---------------------------------------------------------------------------------------------

def test_logprobs_are_of_the_raw_logits():
    vocab = 1000
    logits = random_logits(3, vocab, seed=17)
    raw_logprobs = torch.log_softmax(torch.from_numpy(logits).double(), dim=-1).numpy()
    sampler = Sampler(vocab)
    params = [SamplingParams(logprobs=5, temperature=0.5, top_k=3, repetition_penalty=1.5, seed=1),
              SamplingParams(seed=2),
              SamplingParams(logprobs=0, temperature=0, logit_bias={7: 100.0})]
    states = [sampler.new_state(p, prompt_token_ids=[int(np.argmax(logits[0]))]) for p in params]
    result = sampler.sample(logits.copy(), states)
    assert result.logprobs[1] is None
    for r in (0, 2):
        lp = result.logprobs[r]
        token = int(result.token_ids[r])
        assert lp.token_id == token
        # float32 logit minus float64 logsumexp, stored as float32: 1e-5 absolute on values ~ -10
        assert lp.logprob == pytest.approx(raw_logprobs[r, token], abs=1e-5)
        assert lp.rank == 1 + int((logits[r] > logits[r, token]).sum())
        n = params[r].logprobs
        top = np.argsort(-raw_logprobs[r])[:n]
        assert lp.top_token_ids == tuple(top)
        np.testing.assert_allclose(lp.top_logprobs, raw_logprobs[r, top], atol=1e-5)
    assert result.token_ids[2] == 7 and result.logprobs[2].rank > 1       # biased, not the model's pick


def test_top_logprobs_with_fewer_finite_logits_than_requested():
    logits = np.full((1, 6), -np.inf, np.float32)
    logits[0, [4, 1]] = [2.0, 1.0]
    lse, ids, lps = K.top_logprobs(logits, 4)
    assert ids.tolist() == [[4, 1, -1, -1]]
    np.testing.assert_allclose(lps[0, :2], [2 - lse[0], 1 - lse[0]], atol=1e-6)
    assert np.isneginf(lps[0, 2:]).all()


def test_top_logprobs_kernel_matches_torch():
    logits = random_logits(4, 5000, seed=4)
    lse, ids, lps = K.top_logprobs(logits, 10)
    ref = torch.from_numpy(logits).double()
    # logsumexp from float32 weights summed in float64: relative error of the sum ~1e-7
    np.testing.assert_allclose(lse, torch.logsumexp(ref, dim=-1).numpy(), rtol=0, atol=1e-6)
    top = torch.topk(torch.log_softmax(ref, dim=-1), 10)
    np.testing.assert_array_equal(ids, top.indices.numpy())
    np.testing.assert_allclose(lps, top.values.numpy(), atol=1e-5)
