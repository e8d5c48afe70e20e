"""RowThreads (engine/models/row_threads.py): every item of [0, n) is handed out exactly once, in
at most n_threads contiguous ranges of at least min_per_thread items, and an error in any range
reaches the caller after every range has finished."""
import threading

import pytest

from lmengine.models.row_threads import RowThreads


@pytest.mark.parametrize("n_threads", [1, 2, 3])
@pytest.mark.parametrize("n,min_per_thread", [(0, 1), (1, 1), (5, 1), (7, 3), (100, 64), (1000, 64)])
def test_split_covers_every_row_once(n_threads, n, min_per_thread):
    rows = RowThreads(n_threads)
    seen, lock = [], threading.Lock()

    def record(begin, end):
        with lock:
            seen.append((begin, end))
    rows.split(record, n, min_per_thread)
    rows.close()
    covered = sorted(i for begin, end in seen for i in range(begin, end))
    assert covered == list(range(n))
    assert len(seen) <= n_threads
    if len(seen) > 1:
        assert all(end - begin >= min_per_thread for begin, end in seen)


def test_an_error_in_a_range_is_raised_after_all_ranges_finish():
    rows = RowThreads(3)
    finished = []

    def work(begin, end):
        if begin > 0:
            raise ValueError(f"range {begin}")
        finished.append((begin, end))
    with pytest.raises(ValueError, match="range"):
        rows.split(work, 30)
    assert finished == [(0, 10)]                      # the caller's own range ran to its end
    rows.split(lambda b, e: finished.append((b, e)), 3)   # the pool still works afterwards
    rows.close()
    assert len(finished) == 4
