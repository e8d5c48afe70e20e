"""How far one engine's next-token distributions are from a reference's over the same text:
mean and largest KL(reference || test), top-1 agreement and the test's perplexity.

One place for this arithmetic, used by `lmengine.bench.kquant_quality` and the zen.txt quality
tests (tests/integration/test_llama_smollm2.py, test_kquant_quality.py). Plain NumPy in float64.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class LogitQuality:
    """Agreement of a test engine with a reference over the scored positions of a text."""
    mean_kl: float      # mean over positions of KL(reference || test), nats
    max_kl: float       # the largest of them
    top1_agree: float   # share of positions where both argmaxes are the same token
    ppl: float          # the test engine's perplexity of the next tokens
    n_positions: int    # positions scored (tokens - 1)

    def as_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return f"KL {self.mean_kl:.4f} top-1 {100 * self.top1_agree:.1f}% ppl {self.ppl:.3f}"


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64 (max-subtracted, so large logits do not overflow)."""
    x = np.asarray(logits, dtype=np.float64)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def logit_quality(ref_logits: np.ndarray, test_logits: np.ndarray, token_ids: Sequence[int]) -> LogitQuality:
    """Compare two [n_tokens, vocab] logit arrays computed on the same `token_ids`.

    Row i predicts token i+1, so the last row (which predicts nothing in the text) is dropped and
    n_tokens - 1 positions are scored. Perplexity is the test engine's, over tokens 1..n-1.
    """
    ref = np.asarray(ref_logits)
    test = np.asarray(test_logits)
    n = len(token_ids)
    if ref.shape != test.shape or ref.ndim != 2 or ref.shape[0] != n:
        raise ValueError(f"logits must both be [n_tokens={n}, vocab]; got {ref.shape} and {test.shape}")
    if n < 2:
        raise ValueError("at least 2 tokens are needed (one predicted from the one before)")
    lp, lq = log_softmax(ref[:-1]), log_softmax(test[:-1])
    kl = (np.exp(lp) * (lp - lq)).sum(axis=1)
    top1 = float((ref[:-1].argmax(axis=1) == test[:-1].argmax(axis=1)).mean())
    targets = np.asarray(token_ids[1:], dtype=np.int64)
    ppl = math.exp(-float(lq[np.arange(n - 1), targets].mean()))
    return LogitQuality(float(kl.mean()), float(kl.max()), top1, ppl, n - 1)
