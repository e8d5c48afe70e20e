"""`RowThreads`: one pool of Python threads that an encoder forward shares its rows among.

The encoder (engine/models/bert.py) alternates BLAS products with Numba passes (LayerNorm, GELU,
residual adds) and NumPy attention. Run each on its own library's threads and the pools fight:
OpenBLAS's workers spin for a while after each product and Numba's OpenMP workers after each
pass, so the next step starts on cores that are still busy. Measured on MiniLM (32 x 128 tokens,
2 cores, Zen 3, 2026-12-06): attention took 31 ms per layer right after a two-thread GEMM against
18 ms on quiet cores, and a whole batch 790-800 ms.

So the encoder runs every step of a batch on one pool instead: BLAS and Numba run one-threaded
inside it (the caller sets BLAS's limit; the Numba kernels take parallel=False), and each step's
rows are split into n_threads contiguous ranges, one per thread. Idle threads block on a queue;
nothing spins. NumPy and the Numba kernels (nogil) release the GIL, so the threads run at once.
The same batch measured 690-710 ms this way (docs/EMBEDDINGS.md).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable


class RowThreads:
    """Splits [0, n) into up to n_threads contiguous ranges and runs fn(begin, end) on each at
    once: the caller's thread takes the first, a pool of n_threads - 1 threads the others. With
    one thread (or one range) fn runs in the caller's thread alone."""

    def __init__(self, n_threads: int):
        self.n_threads = max(1, int(n_threads))
        self._pool = (ThreadPoolExecutor(self.n_threads - 1, thread_name_prefix="lmengine-rows")
                      if self.n_threads > 1 else None)      # the caller's thread is the n-th

    def split(self, fn: Callable[[int, int], None], n: int, min_per_thread: int = 1) -> None:
        """fn(begin, end) over [0, n) in ranges of at least min_per_thread items (so that a small
        step is not cut into pieces that cost more to hand out than to compute). Waits for every
        range; the first exception raised in one is raised here."""
        parts = min(self.n_threads, max(1, n // max(1, min_per_thread)))
        if parts <= 1 or self._pool is None:
            fn(0, n)
            return
        bounds = [n * i // parts for i in range(parts + 1)]
        futures = [self._pool.submit(fn, bounds[i], bounds[i + 1]) for i in range(1, parts)]
        try:
            fn(bounds[0], bounds[1])                   # the caller's thread takes the first range
        finally:
            errors = [f.exception() for f in futures]   # waits for them all, even after an error here
        for error in errors:
            if error is not None:
                raise error

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
