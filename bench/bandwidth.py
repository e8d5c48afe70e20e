"""The memory bandwidth decode is measured against: a plain multi-threaded read loop over a buffer
as large as the model's weights (each thread sums its share as uint64 words). Decode streams every
weight once per token, so weight bytes x decode tok/s over this figure is how close it runs to
the machine's ceiling. (Its own module: the workers of peer engines do not import Numba.)"""
from __future__ import annotations

import time

import numba
import numpy as np
from numba import njit, prange


@njit(parallel=True, nogil=True)
def _read_all(words, n_parts):
    chunk = (words.size + n_parts - 1) // n_parts
    sums = np.zeros(n_parts, dtype=np.uint64)
    for p in prange(n_parts):
        acc = np.uint64(0)
        for i in range(p * chunk, min(words.size, (p + 1) * chunk)):
            acc += words[i]
        sums[p] = acc
    return sums.sum()


def memory_read_gb_s(n_bytes: int, threads: int, repeats: int = 5) -> float:
    """The best of `repeats` passes over an n_bytes buffer with `threads` threads, in GB/s."""
    numba.set_num_threads(threads)
    words = np.ones(max(n_bytes // 8, threads * 8), dtype=np.uint64)
    _read_all(words, threads)                      # compiles, and faults the pages in
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        _read_all(words, threads)
        best = max(best, words.nbytes / (time.perf_counter() - t0) / 1e9)
    return best
