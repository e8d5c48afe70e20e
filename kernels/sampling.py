"""Sampling math: logits -> token ids, vectorised over a batch of rows.

Every function takes float32 logits [b, vocab] (one row per request) and works on all rows in one
call into compiled code. Only `sample_rows`, the per-step hot path, runs rows in parallel (numba
prange): each parallel function adds seconds to the first-run compile, and the others are either
O(entries) edits or run only for requests that ask for logprobs. This module holds the operations
only; which of them a request uses, with which values, and in which order they run is
engine/sampler.py's job.

Per-row token lists (tokens seen so far, logit biases, allowed tokens, banned tokens) use a CSR
layout: row r owns the entries `row_ptr[r] : row_ptr[r + 1]` of the flat `token_ids` (and value)
arrays, `row_ptr` is int64 [b + 1]. Every kernel checks the layout and that every token id lies in
[0, vocab) before it touches memory, and raises ValueError otherwise.

The filters (top-k, top-p, typical-p, min-p) follow HF transformers' LogitsWarper classes:
- top-k keeps every token whose logit is >= the k-th largest (ties with the k-th are kept);
- top-p keeps a token when the probability mass of the tokens ranked above it is < top_p;
- typical-p ranks tokens by |-log p - entropy| and keeps the smallest prefix of that ranking whose
  mass reaches typical_p (ties with the last kept key are kept);
- min-p keeps tokens with p >= min_p * max(p).
Each filter renormalises over the survivors of the previous one (it sees only their mass).

A row's distribution is held as unnormalised float32 weights w = exp((x - x_max) / temperature),
in (0, 1] with 1 for the top token, which cannot overflow however small the temperature; a
filtered token gets weight 0 (rather than a -inf logit). Sums are float64. Nothing sorts the
vocabulary: top-k, top-p and typical-p share one bucketed selection (`_walk_by_key`) that sorts only
the tokens of one bucket, and the draw is a single scan for the first token at which the running
weight exceeds uniform * total.

CPU time per row at vocab 49152 on one core (AMD EPYC, AVX-512): greedy 0.04 ms, temperature
only 0.09 ms, min-p 0.09 ms, top-k 0.2 ms, top-p 0.45 ms on a flat distribution, typical-p
0.75 ms, top-n logprobs 0.25 ms.
"""
import math

import numpy as np
from numba import njit, prange

# top-k, top-p and typical-p find their cut without sorting the vocabulary: tokens are binned by
# their sort key into this many equal-width buckets, the bucket holding the cut is found from the
# per-bucket weight, and only that bucket's tokens are sorted (see _walk_by_key).
_N_BUCKETS = 1024

# exp(t) = 2^k * exp(r), k = round(t / ln 2), r = t - k ln 2 (ln 2 split in a high part exact in
# float32 and a low correction, Cody-Waite), |r| <= ln2 / 2.
_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693359375)
_LN2_LO = np.float32(-2.12194440e-4)
_EXP_MIN_ARG = np.float32(-87.0)      # exp(-87) = 1.6e-38, the float32 normal range ends here
_UNDERFLOW = -1000                    # exponent marker: the weight is 0


# ---------------------------------------------------------------------------------------------
# Argument checks (run before any indexing, so bad input raises instead of corrupting memory)
# ---------------------------------------------------------------------------------------------

@njit(cache=True, nogil=True)
def _valid_csr(row_ptr, token_ids, n_rows, vocab_size):
    """True when row_ptr is a CSR index of n_rows rows over token_ids and every id is in range."""
    if row_ptr.shape[0] != n_rows + 1 or row_ptr[0] != 0 or row_ptr[n_rows] != token_ids.shape[0]:
        return False
    for r in range(n_rows):
        if row_ptr[r + 1] < row_ptr[r]:
            return False
    for j in range(token_ids.shape[0]):
        if token_ids[j] < 0 or token_ids[j] >= vocab_size:
            return False
    return True


# ---------------------------------------------------------------------------------------------
# Token edits: in place on logits [b, vocab]. Serial: they touch a few entries per row, less work
# than starting the thread pool.
# ---------------------------------------------------------------------------------------------

@njit(cache=True, nogil=True)
def apply_penalties(logits, row_ptr, token_ids, output_counts, repetition, presence, frequency):
    """Repetition, presence and frequency penalties, in place.

    logits: float32 [b, vocab]. Row r's seen tokens: token_ids[row_ptr[r]:row_ptr[r+1]] (int32,
    each id at most once per row), with output_counts (int32, same length) = how many times the
    token was *generated* (0 for a token seen only in the prompt).
    repetition, presence, frequency: float32 [b].

    For every seen token: x = x / repetition if x > 0 else x * repetition (HF: over prompt and
    generated tokens); then for generated ones x -= frequency * count, x -= presence (OpenAI/vLLM).
    """
    n_rows, vocab_size = logits.shape
    if not _valid_csr(row_ptr, token_ids, n_rows, vocab_size):
        raise ValueError("apply_penalties: bad row_ptr or token id outside [0, vocab)")
    if (output_counts.shape[0] != token_ids.shape[0] or repetition.shape[0] != n_rows
            or presence.shape[0] != n_rows or frequency.shape[0] != n_rows):
        raise ValueError("apply_penalties: array lengths do not match the batch")
    for r in range(n_rows):
        rep = repetition[r]
        for j in range(row_ptr[r], row_ptr[r + 1]):
            t = token_ids[j]
            x = logits[r, t]
            if rep != 1.0:
                x = x / rep if x > 0 else x * rep
            count = output_counts[j]
            if count > 0:
                x -= frequency[r] * np.float32(count)
                x -= presence[r]
            logits[r, t] = x


@njit(cache=True, nogil=True)
def add_logit_bias(logits, row_ptr, token_ids, bias):
    """logits[r, token_ids[j]] += bias[j] for the entries j of row r, in place. bias: float32."""
    n_rows, vocab_size = logits.shape
    if not _valid_csr(row_ptr, token_ids, n_rows, vocab_size) or bias.shape[0] != token_ids.shape[0]:
        raise ValueError("add_logit_bias: bad row_ptr, bias length or token id outside [0, vocab)")
    for r in range(n_rows):
        for j in range(row_ptr[r], row_ptr[r + 1]):
            logits[r, token_ids[j]] += bias[j]


@njit(cache=True, nogil=True)
def keep_only_tokens(logits, row_ptr, token_ids):
    """Set every logit of row r to -inf except those of its listed tokens, in place.

    A row with no entries is left untouched (it has no restriction).
    """
    n_rows, vocab_size = logits.shape
    if not _valid_csr(row_ptr, token_ids, n_rows, vocab_size):
        raise ValueError("keep_only_tokens: bad row_ptr or token id outside [0, vocab)")
    for r in range(n_rows):
        start, end = row_ptr[r], row_ptr[r + 1]
        if end == start:
            continue
        kept = np.empty(end - start, dtype=np.float32)
        for j in range(start, end):
            kept[j - start] = logits[r, token_ids[j]]
        logits[r, :] = -np.inf
        for j in range(start, end):
            logits[r, token_ids[j]] = kept[j - start]


@njit(cache=True, nogil=True)
def ban_tokens(logits, row_ptr, token_ids):
    """logits[r, token_ids[j]] = -inf for the entries j of row r, in place."""
    n_rows, vocab_size = logits.shape
    if not _valid_csr(row_ptr, token_ids, n_rows, vocab_size):
        raise ValueError("ban_tokens: bad row_ptr or token id outside [0, vocab)")
    for r in range(n_rows):
        for j in range(row_ptr[r], row_ptr[r + 1]):
            logits[r, token_ids[j]] = -np.inf


# ---------------------------------------------------------------------------------------------
# Row helpers: exp, sums, extrema, buckets
# ---------------------------------------------------------------------------------------------

@njit(cache=True, nogil=True)
def _exp_shifted(x, x_max, inv_temperature, out, exponent):
    """out[i] = exp((x[i] - x_max) * inv_temperature) for x[i] <= x_max, as float32; 0 where x[i]
    is -inf or the value is below 1.6e-38 (a weight next to the top token's 1).

    x: float32 [n]; x_max, inv_temperature: float32; out: float32 [n]; exponent: int32 [n] scratch.
    Range reduction plus a degree-7 Taylor polynomial (truncation error < 1e-8 relative, below the
    float32 rounding of the argument itself), in plain arithmetic that the compiler vectorises:
    about 4x faster than calling libm's exp per element in float64.
    """
    n = x.shape[0]
    for i in range(n):
        t = (x[i] - x_max) * inv_temperature
        t_clamped = t if t > _EXP_MIN_ARG else _EXP_MIN_ARG
        k = np.floor(t_clamped * _LOG2E + np.float32(0.5))
        r = t_clamped - k * _LN2_HI - k * _LN2_LO
        out[i] = np.float32(1.0) + r * (np.float32(1.0) + r * (np.float32(1 / 2) + r * (np.float32(1 / 6) + r * (
            np.float32(1 / 24) + r * (np.float32(1 / 120) + r * (np.float32(1 / 720) + r * np.float32(1 / 5040)))))))
        exponent[i] = np.int32(k) if t >= _EXP_MIN_ARG else _UNDERFLOW
    bits = out.view(np.int32)
    for i in range(n):                              # multiply by 2^k: add k to the exponent field
        bits[i] = bits[i] + (exponent[i] << 23) if exponent[i] != _UNDERFLOW else 0


@njit(cache=True, nogil=True, fastmath=True)
def _sum(w):
    """float64 sum of a float32 array (reassociated, so it vectorises; inputs are finite)."""
    total = 0.0
    for i in range(w.shape[0]):
        total += np.float64(w[i])
    return total


@njit(cache=True, nogil=True)
def _argmax(x):
    """Index of the first largest entry of x; -1 when every entry is -inf or NaN."""
    best = -1
    best_value = -np.inf
    for i in range(x.shape[0]):
        if x[i] > best_value:
            best_value = x[i]
            best = i
    return best


@njit(cache=True, nogil=True)
def _negated(x):
    """-x as float32 (the ascending sort key of "largest logit first"; -inf logits become +inf)."""
    out = np.empty(x.shape[0], dtype=np.float32)
    for i in range(x.shape[0]):
        out[i] = -x[i]
    return out


@njit(cache=True, nogil=True)
def _walk_by_key(key, w, limit, keep_ties):
    """Positions (int64, ascending) of the entries kept by this walk: visit the entries in
    ascending key order (equal keys: lower position first) and keep each one while the weight of
    the entries visited before it is < limit; with keep_ties, also keep the entries whose key
    equals the last kept one.

    It is the common core of three filters:
      top-k      key -x, weight 1, limit k, ties kept (HF keeps every logit >= the k-th);
      top-p      key -x, weight p, limit top_p * total;
      typical-p  key |-log p - H|, weight p, limit typical_p * total, ties kept.
    No full sort: entries are binned by key into _N_BUCKETS equal slices of [min, max] (+inf keys
    in the last); a bucket passed before the weight reaches the limit is kept whole, and only the
    bucket where it does is sorted. key, w: float [n]; w >= 0; limit > 0.
    """
    n = key.shape[0]
    lo = np.inf
    hi = -np.inf
    for j in range(n):
        if key[j] < np.inf:
            lo = min(lo, key[j])
            hi = max(hi, key[j])
    scale = (_N_BUCKETS - 1) / (hi - lo) if hi > lo else 0.0
    bucket = np.empty(n, dtype=np.int32)
    mass = np.zeros(_N_BUCKETS, dtype=np.float64)
    for j in range(n):
        b = min(np.int32((key[j] - lo) * scale), _N_BUCKETS - 1) if key[j] < np.inf else _N_BUCKETS - 1
        bucket[j] = b
        mass[b] += w[j]

    cut = _N_BUCKETS - 1                     # the bucket in which the walk stops
    before = 0.0                             # weight of the buckets before it
    reached = False
    for b in range(_N_BUCKETS):
        if before + mass[b] >= limit:
            cut = b
            reached = True
            break
        before += mass[b]
    if not reached:                          # the whole row is under the limit: keep it all
        before -= mass[_N_BUCKETS - 1]

    keep = np.zeros(n, dtype=np.bool_)
    n_members = 0
    for j in range(n):
        keep[j] = bucket[j] < cut
        if bucket[j] == cut:
            n_members += 1
    members = np.empty(n_members, dtype=np.int64)
    member_keys = np.empty(n_members, dtype=np.float64)
    n_members = 0
    for j in range(n):
        if bucket[j] == cut:
            members[n_members] = j
            member_keys[n_members] = key[j]
            n_members += 1
    members = members[np.argsort(member_keys, kind="mergesort")]   # stable: ties by position
    m = 0
    cum = before
    while m < n_members and cum < limit:
        cum += w[members[m]]
        m += 1
    if keep_ties:
        while 0 < m < n_members and key[members[m]] == key[members[m - 1]]:
            m += 1
    for i in range(m):
        keep[members[i]] = True
    return np.flatnonzero(keep)


@njit(cache=True, nogil=True)
def _typicality(x, idx, w, x_max, inv_temperature):
    """|-log p - H| (float64: on a flat 49152-token row neighbouring keys are closer than float32
    resolves) of the candidates (idx, w): p = w / sum(w) with log w = (x - x_max) / T,
    H the entropy of p; +inf for zero-weight candidates (HF ranks those last)."""
    total = _sum(w)
    log_total = math.log(total)
    log_p = np.empty(idx.shape[0], dtype=np.float64)
    entropy = 0.0
    for j in range(idx.shape[0]):
        if w[j] > 0.0:
            log_p[j] = (np.float64(x[idx[j]]) - x_max) * inv_temperature - log_total
            entropy -= w[j] / total * log_p[j]
        else:
            log_p[j] = -np.inf
    key = np.empty(idx.shape[0], dtype=np.float64)
    for j in range(idx.shape[0]):
        key[j] = abs(-log_p[j] - entropy)
    return key


# ---------------------------------------------------------------------------------------------
# Filters on one row
# ---------------------------------------------------------------------------------------------

@njit(cache=True, nogil=True)
def _sampling_weights(x, temperature, top_k, top_p, typical_p, min_p, weights, scratch):
    """Fill weights (float32 [vocab]) with the row's unnormalised sampling weights after
    temperature, top-k, top-p, typical-p and min-p, in that order; 0 for filtered tokens, the top
    token's weight is 1. Returns False (weights all 0) when every logit is -inf.
    x: float32 [vocab], read only; temperature > 0; scratch: int32 [vocab]."""
    vocab_size = x.shape[0]
    best = _argmax(x)
    if best < 0:
        weights[:] = 0.0
        return False
    x_max = x[best]
    inv_temperature = np.float32(1.0 / temperature)

    # Survivors so far: the whole row (dense) or the token ids in idx (ascending).
    dense = not 0 < top_k < vocab_size
    if dense:
        _exp_shifted(x, x_max, inv_temperature, weights, scratch)
        idx = np.empty(0, dtype=np.int64)
    else:
        idx = _walk_by_key(_negated(x), np.ones(vocab_size, dtype=np.float32), np.float64(top_k), True)
        weights[:] = 0.0
        for j in range(idx.shape[0]):
            weights[idx[j]] = math.exp((np.float64(x[idx[j]]) - x_max) * inv_temperature)

    if top_p < 1.0:
        if dense:
            idx = _walk_by_key(_negated(x), weights, top_p * _sum(weights), False)
            dense = False
        else:
            w = weights[idx]
            idx = idx[_walk_by_key(_negated(x)[idx], w, top_p * _sum(w), False)]
    if typical_p < 1.0:
        if dense:
            idx = np.flatnonzero(weights)
            dense = False
        w = weights[idx]
        key = _typicality(x, idx, w, x_max, inv_temperature)
        idx = idx[_walk_by_key(key, w, typical_p * _sum(w), True)]
    if min_p > 0.0:
        if dense:                            # relative to the top weight, which is exp(0) = 1
            for i in range(vocab_size):
                if weights[i] < min_p:
                    weights[i] = 0.0
        else:
            w = weights[idx]
            idx = idx[w >= min_p * w.max()]

    if not dense:                            # survivors keep their weight, the rest get 0
        w = weights[idx]
        weights[:] = 0.0
        for j in range(idx.shape[0]):
            weights[idx[j]] = w[j]
    return True


@njit(cache=True, nogil=True)
def _draw(weights, uniform):
    """The first token at which the running weight exceeds uniform * total; -1 if all are 0."""
    target = uniform * _sum(weights)
    cum = 0.0
    last_positive = -1
    for i in range(weights.shape[0]):
        if weights[i] > 0.0:
            cum += weights[i]
            last_positive = i
            if target < cum:
                return i
    return last_positive                               # rounding left target at the total


@njit(cache=True, nogil=True)
def _check_filter_args(logits, temperature, top_k, top_p, typical_p, min_p):
    n_rows = logits.shape[0]
    if (temperature.shape[0] != n_rows or top_k.shape[0] != n_rows or top_p.shape[0] != n_rows
            or typical_p.shape[0] != n_rows or min_p.shape[0] != n_rows):
        raise ValueError("sampling: per-row parameter arrays must have one entry per logits row")


# ---------------------------------------------------------------------------------------------
# Batch entry points
# ---------------------------------------------------------------------------------------------

@njit(cache=True, nogil=True, parallel=True)
def sample_rows(logits, temperature, top_k, top_p, typical_p, min_p, uniforms):
    """One token per row: filter (see _sampling_weights) and draw with the row's uniform number.

    logits float32 [b, vocab] (read only); temperature, top_p, typical_p, min_p float64 [b];
    top_k int32 [b] (0 = off); uniforms float64 [b] in [0, 1). Returns int32 [b]; -1 for a row
    whose logits are all -inf. temperature == 0 rows take the first argmax.
    """
    n_rows, vocab_size = logits.shape
    _check_filter_args(logits, temperature, top_k, top_p, typical_p, min_p)
    if uniforms.shape[0] != n_rows:
        raise ValueError("sample_rows: uniforms must have one entry per logits row")
    chosen = np.empty(n_rows, dtype=np.int32)
    for r in prange(n_rows):
        if temperature[r] == 0.0:
            chosen[r] = _argmax(logits[r])
            continue
        weights = np.empty(vocab_size, dtype=np.float32)
        scratch = np.empty(vocab_size, dtype=np.int32)
        if _sampling_weights(logits[r], temperature[r], top_k[r], top_p[r], typical_p[r], min_p[r],
                             weights, scratch):
            chosen[r] = _draw(weights, uniforms[r])
        else:
            chosen[r] = -1
    return chosen


@njit(cache=True, nogil=True)
def filtered_probs(logits, temperature, top_k, top_p, typical_p, min_p):
    """The distribution sample_rows draws from: float64 [b, vocab], zero for filtered tokens
    (a row of zeros when every logit is -inf). Same arguments as sample_rows, less uniforms."""
    n_rows, vocab_size = logits.shape
    _check_filter_args(logits, temperature, top_k, top_p, typical_p, min_p)
    probs = np.zeros((n_rows, vocab_size), dtype=np.float64)
    for r in range(n_rows):
        if temperature[r] == 0.0:
            best = _argmax(logits[r])
            if best >= 0:
                probs[r, best] = 1.0
            continue
        weights = np.empty(vocab_size, dtype=np.float32)
        scratch = np.empty(vocab_size, dtype=np.int32)
        if _sampling_weights(logits[r], temperature[r], top_k[r], top_p[r], typical_p[r], min_p[r],
                             weights, scratch):
            total = _sum(weights)
            for i in range(vocab_size):
                probs[r, i] = weights[i] / total
    return probs


# ---------------------------------------------------------------------------------------------
# Log-probabilities
# ---------------------------------------------------------------------------------------------

@njit(cache=True, nogil=True)
def top_logprobs(logits, n_top):
    """Log-softmax statistics of each row.

    Returns (logsumexp float64 [b], top_ids int32 [b, n_top], top_logprobs float32 [b, n_top]):
    the n_top most likely tokens of each row, most likely first (ties: lower id first), with
    log p = x - logsumexp. Slots beyond the number of finite logits hold id -1 and -inf.
    """
    n_rows, vocab_size = logits.shape
    if n_top < 0 or n_top > vocab_size:
        raise ValueError("top_logprobs: n_top must be in [0, vocab]")
    lse = np.empty(n_rows, dtype=np.float64)
    top_ids = np.full((n_rows, n_top), -1, dtype=np.int32)
    top_lps = np.full((n_rows, n_top), -np.inf, dtype=np.float32)
    for r in range(n_rows):
        x = logits[r]
        best = _argmax(x)
        if best < 0:
            lse[r] = -np.inf
            continue
        weights = np.empty(vocab_size, dtype=np.float32)
        scratch = np.empty(vocab_size, dtype=np.int32)
        _exp_shifted(x, x[best], np.float32(1.0), weights, scratch)
        lse[r] = np.float64(x[best]) + math.log(_sum(weights))
        if n_top > 0:
            neg_x = _negated(x)
            idx = _walk_by_key(neg_x, np.ones(vocab_size, dtype=np.float32), np.float64(n_top), False)
            idx = idx[np.argsort(neg_x[idx], kind="mergesort")]      # most likely first
            for j in range(min(n_top, idx.shape[0])):
                if x[idx[j]] == -np.inf:
                    break
                top_ids[r, j] = idx[j]
                top_lps[r, j] = np.float64(x[idx[j]]) - lse[r]
    return lse, top_ids, top_lps


@njit(cache=True, nogil=True)
def token_logprobs(logits, lse, token_ids):
    """Log-probability and rank (1 = most likely; 1 + number of strictly larger logits) of
    token_ids[r] (int32 [b]) in row r, given the row's logsumexp (from top_logprobs).
    Returns (float32 [b], int32 [b])."""
    n_rows, vocab_size = logits.shape
    if lse.shape[0] != n_rows or token_ids.shape[0] != n_rows:
        raise ValueError("token_logprobs: lse and token_ids must have one entry per logits row")
    for r in range(n_rows):
        if token_ids[r] < 0 or token_ids[r] >= vocab_size:
            raise ValueError("token_logprobs: token id outside [0, vocab)")
    logprobs = np.empty(n_rows, dtype=np.float32)
    ranks = np.empty(n_rows, dtype=np.int32)
    for r in range(n_rows):
        value = logits[r, token_ids[r]]
        logprobs[r] = np.float64(value) - lse[r]
        larger = 0
        for i in range(vocab_size):
            if logits[r, i] > value:
                larger += 1
        ranks[r] = larger + 1
    return logprobs, ranks
