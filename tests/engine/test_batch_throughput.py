"""The accounting of bench/batch_throughput.py (issue 17's figures): end-to-end and steady-state
rates from the arrival times of finished rows, and the arrival log kept around run_batch.

The rates are checked against values worked out by hand for made-up arrivals; the arrival log
against run_batch's own summary on the fake model (fake_backend.py, no Numba compile)."""
import json

import pytest
from fake_backend import make_fake_llm

from lmengine.batch import complete_requests, run_batch
from lmengine.bench.batch_throughput import _timed, rates


def test_rates_by_hand():
    # started at t=10; 100 tokens at 12 (the first rows), 50 at 14, 150 at 16
    r = rates([(12.0, 100), (14.0, 50), (16.0, 150)], 10.0)
    assert r["tokens"] == 300
    assert r["s"] == 6.0 and r["tok_s"] == 50.0               # 300 / (16 - 10)
    assert r["first_row_s"] == 2.0                            # 12 - 10
    assert r["steady_tok_s"] == 50.0                          # (50 + 150) / (16 - 12)


def test_rates_first_arrival_only_has_no_steady_state():
    r = rates([(3.0, 64)], 1.0)
    assert r["tok_s"] == 32.0 and r["first_row_s"] == 2.0 and r["steady_tok_s"] is None


def test_rates_groups_arriving_with_the_first_are_first():
    # two groups at the first instant are both "first rows": only the later one is steady state
    r = rates([(2.0, 10), (2.0, 30), (4.0, 20)], 0.0)
    assert r["steady_tok_s"] == 10.0                          # 20 / (4 - 2)


def test_timed_run_batch_logs_every_generated_token(tmp_path):
    """The arrival log the bench keeps around run_batch counts exactly the tokens run_batch
    reports, and leaves the output as run_batch alone writes it (one row per input row)."""
    llm = make_fake_llm(n_slots=5)
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    with open(inp, "w") as f:
        for i in range(10):
            f.write(json.dumps({"custom_id": f"p{i}", "prompt": "hello " + "abcdefghij"[i], "max_tokens": 3 + i % 4,
                                "temperature": 0, "ignore_eos": True}) + "\n")
        f.write("not json\n")                                  # an error row: no tokens
    arrivals = []
    summary = run_batch(llm, inp, out, progress=False,
                        run_rows=lambda requests: _timed(complete_requests(llm, requests), arrivals))
    assert summary.completed_rows == 11 and summary.error_rows == 1
    assert sum(n for _, n in arrivals) == summary.generated_tokens == sum(3 + i % 4 for i in range(10))
    assert [t for t, _ in arrivals] == sorted(t for t, _ in arrivals)
    rows = [json.loads(line) for line in open(out)]
    assert sorted(r["custom_id"] for r in rows) == sorted([f"p{i}" for i in range(10)] + ["row-10"])
    llm.close()


if __name__ == "__main__":
    pytest.main([__file__, "-q"])
