"""Offline batch jobs (engine/batch.py): parsing rows, error rows, durable resumable output.

Most tests run on the fake model (fake_backend.py), whose greedy continuation `greedy_reference`
computes without any cache or batching: the expected text of every row is independent of the
batch machinery under test. One test runs the bundled SmolLM2 and holds the job's greedy texts
against `LLM.generate`/`LLM.chat` called directly.
"""
import io
import json
import os

import pytest
from fake_backend import CHARS, greedy_reference, make_fake_llm

from lmengine import SamplingParams
from lmengine.batch import (BatchFileError, OutputFile, Progress, complete_requests, iter_requests, parse_request,
                            run_batch)

GREEDY = SamplingParams(temperature=0, max_tokens=6)


def expected_text(llm, prompt: str, max_tokens: int = 6) -> str:
    """The fake model's greedy answer to `prompt`, computed without the engine."""
    ids = llm.tokenizer.encode(prompt)
    out = greedy_reference(ids, max_tokens, llm.vocab_size, stop_ids=llm.eos_token_ids)
    out = [t for t in out if t not in llm.eos_token_ids]
    return llm.tokenizer.decode(out)


def write_jsonl(path, rows) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(r if isinstance(r, str) else json.dumps(r))
            f.write("\n")


def read_output(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def prompts(n: int) -> list[str]:
    return ["".join(CHARS[(i * 7 + j * 3) % 26] for j in range(3 + i % 9)) for i in range(n)]


# -- parsing -------------------------------------------------------------------------------------------
def test_openai_batch_rows_and_plain_rows_parse():
    chat = parse_request(0, {"custom_id": "c1", "method": "POST", "url": "/v1/chat/completions",
                             "body": {"model": "x", "messages": [{"role": "user", "content": "hi", "name": None}],
                                      "max_completion_tokens": 9, "temperature": 0, "stop": ["\n"], "top_p": None}})
    assert chat.error is None and chat.custom_id == "c1"
    assert chat.messages == [{"role": "user", "content": "hi"}]         # Arrow's nulls dropped
    assert chat.sampling == {"max_tokens": 9, "temperature": 0, "stop": ["\n"]}
    comp = parse_request(1, {"custom_id": "c2", "url": "/v1/completions",
                             "body": json.dumps({"prompt": "abc", "logit_bias": {"3": 1.5}, "seed": 4})})
    assert comp.error is None and comp.prompt == "abc" and comp.sampling == {"logit_bias": {3: 1.5}, "seed": 4}
    plain = parse_request(7, {"prompt": [1, 2, 3], "top_k": 5})
    assert plain.error is None and plain.custom_id == "row-7" and plain.prompt == [1, 2, 3]
    assert plain.sampling == {"top_k": 5}


@pytest.mark.parametrize("raw, code, needle", [
    ([1, 2], "invalid_request", "JSON object"),
    ({"custom_id": "a"}, "invalid_request", "exactly one of prompt and messages"),
    ({"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "invalid_request", "exactly one"),
    ({"prompt": ["a", "b"]}, "invalid_request", "one prompt per row"),
    ({"prompt": "a", "temprature": 0}, "invalid_request", "unknown field temprature"),
    ({"prompt": "a", "temperature": -1}, "invalid_parameter", "temperature"),
    ({"prompt": "a", "n": 2}, "invalid_parameter", "n must be 1"),
    ({"prompt": "a", "stream": True}, "invalid_request", "stream"),
    ({"body": {"prompt": "a"}, "url": "/v1/embeddings"}, "invalid_request", "url must be"),
    ({"body": {"prompt": "a"}, "method": "GET"}, "invalid_request", "method must be 'POST'"),
    ({"body": {"prompt": "a"}, "url": "/v1/chat/completions"}, "invalid_request", "needs body.messages"),
    ({"body": "{not json"}, "invalid_json", "body is not valid JSON"),
    ({"body": {"messages": []}}, "invalid_request", "non-empty list"),
    ({"custom_id": 5, "prompt": "a"}, "invalid_request", "custom_id must be a string"),
])
def test_a_bad_row_is_an_error_row_naming_the_problem(raw, code, needle):
    request = parse_request(3, raw)
    assert request.error is not None and request.error.code == code
    assert needle in str(request.error)


def test_duplicate_custom_id_and_bad_json_lines(tmp_path):
    path = tmp_path / "in.jsonl"
    write_jsonl(path, [{"custom_id": "a", "prompt": "x"}, "{broken", "", {"custom_id": "a", "prompt": "y"}])
    requests = list(iter_requests(path))
    assert [r.row for r in requests] == [0, 1, 2]                  # the blank line is not a row
    assert requests[0].error is None
    assert requests[1].error.code == "invalid_json" and "line 2" in str(requests[1].error)
    assert requests[2].error.code == "duplicate_custom_id"


# -- running -------------------------------------------------------------------------------------------
def test_job_answers_every_row_once_with_error_rows(tmp_path):
    llm = make_fake_llm(n_slots=4, n_ctx=64)
    texts = prompts(23)
    rows = [{"custom_id": f"id{i}", "body": {"prompt": p}} for i, p in enumerate(texts)]
    rows[4] = "{\"custom_id\": \"id4\", "                    # malformed JSON
    rows[9] = {"custom_id": "id9", "prompt": "ab" * 40}      # 80 tokens: longer than n_ctx=64
    rows[12] = {"custom_id": "id12", "prompt": texts[12], "max_tokens": 3}   # a row's own sampling
    write_jsonl(tmp_path / "in.jsonl", rows)
    summary = run_batch(llm, tmp_path / "in.jsonl", tmp_path / "out.jsonl", defaults=GREEDY, progress=False)
    out = read_output(tmp_path / "out.jsonl")
    assert sorted(r["row"] for r in out) == list(range(23))
    assert summary.completed_rows == 23 and summary.error_rows == 2 and summary.skipped_rows == 0
    by_row = {r["row"]: r for r in out}
    assert by_row[4]["error"]["code"] == "invalid_json" and by_row[4]["custom_id"] == "row-4"
    assert by_row[9]["error"]["code"] == "context_length_exceeded" and by_row[9]["custom_id"] == "id9"
    assert "80 tokens" in by_row[9]["error"]["message"] and by_row[9]["text"] is None
    for i, p in enumerate(texts):
        if i in (4, 9):
            continue
        r = by_row[i]
        n = 3 if i == 12 else 6
        assert r["custom_id"] == f"id{i}" and r["error"] is None
        assert r["text"] == expected_text(llm, p, n), i
        assert r["usage"]["prompt_tokens"] == len(llm.tokenizer.encode(p))
        assert r["usage"]["total_tokens"] == r["usage"]["prompt_tokens"] + r["usage"]["completion_tokens"]
        assert r["finish_reason"] in ("stop", "length")
    assert summary.generated_tokens == sum(r["usage"]["completion_tokens"] for r in out if r["error"] is None)
    assert not any(llm.slots.busy)                                  # every slot given back


def test_scheduler_keeps_the_batch_full():
    """Rows stream in: the decode batch stays at max_batch_size until INPUT runs dry."""
    llm = make_fake_llm(n_slots=5, n_ctx=64)                        # max_batch_size 4
    requests = [parse_request(i, {"prompt": p}) for i, p in enumerate(prompts(20))]
    rows = [r for chunk in complete_requests(llm, iter(requests), SamplingParams(temperature=0, max_tokens=8,
                                                                                  ignore_eos=True)) for r in chunk]
    assert sorted(r["row"] for r in rows) == list(range(20))
    sizes = [len(c[1]) for c in llm.backend.calls if c[0] == "forward_batch"]
    # 20 rows x 7 decode steps each = 140 sequence-steps; at 4 per call that is 35 calls, plus a
    # short tail while the last rows finish (the prompts' first token comes from the prefill).
    assert sum(sizes) == 20 * 7 and len(sizes) <= 35 + 8, sizes


def test_failing_request_is_an_error_row_and_the_rest_go_on(tmp_path):
    llm = make_fake_llm(n_slots=3, n_ctx=64, backend_options={"poison_token": CHARS.index("q")})
    write_jsonl(tmp_path / "in.jsonl", [{"prompt": "abc"}, {"prompt": "aqa"}, {"prompt": "xyz"}])
    run_batch(llm, tmp_path / "in.jsonl", tmp_path / "out.jsonl", defaults=GREEDY, progress=False)
    by_row = {r["row"]: r for r in read_output(tmp_path / "out.jsonl")}
    assert by_row[1]["error"]["code"] == "engine_error" and "token" in by_row[1]["error"]["message"]
    assert by_row[0]["text"] == expected_text(llm, "abc") and by_row[2]["text"] == expected_text(llm, "xyz")


# -- resuming ------------------------------------------------------------------------------------------
def interrupted_after(n_chunks: int, llm):
    """A run_rows that runs the engine and raises KeyboardInterrupt after n_chunks chunks."""
    def run_rows(requests):
        for i, chunk in enumerate(complete_requests(llm, requests, GREEDY)):
            if i == n_chunks:
                raise KeyboardInterrupt
            yield chunk
    return run_rows


def test_interrupted_job_resumes_without_duplicates(tmp_path):
    llm = make_fake_llm(n_slots=4, n_ctx=64)
    texts = prompts(30)
    write_jsonl(tmp_path / "in.jsonl", [{"custom_id": f"k{i}", "prompt": p} for i, p in enumerate(texts)])
    with pytest.raises(KeyboardInterrupt):
        run_batch(llm, tmp_path / "in.jsonl", tmp_path / "out.jsonl", progress=False, flush_seconds=1e9,
                  run_rows=interrupted_after(4, llm))
    first = (tmp_path / "out.jsonl").read_bytes()
    done_first = read_output(tmp_path / "out.jsonl")
    assert 0 < len(done_first) < 30          # the finished rows were written even though flush never came due
    assert not any(llm.slots.busy)           # the interrupted rows' slots are free
    summary = run_batch(llm, tmp_path / "in.jsonl", tmp_path / "out.jsonl", defaults=GREEDY, progress=False)
    assert (tmp_path / "out.jsonl").read_bytes().startswith(first)   # appended, never rewritten
    out = read_output(tmp_path / "out.jsonl")
    assert sorted(r["row"] for r in out) == list(range(30))          # each row exactly once
    assert summary.skipped_rows == len(done_first) and summary.completed_rows == 30 - len(done_first)
    for r in out:
        assert r["text"] == expected_text(llm, texts[r["row"]]) and r["custom_id"] == f"k{r['row']}"
    again = run_batch(llm, tmp_path / "in.jsonl", tmp_path / "out.jsonl", defaults=GREEDY, progress=False)
    assert again.completed_rows == 0 and again.skipped_rows == 30


def test_a_torn_last_line_is_dropped_on_resume(tmp_path):
    llm = make_fake_llm(n_slots=4, n_ctx=64)
    texts = prompts(5)
    write_jsonl(tmp_path / "in.jsonl", [{"prompt": p} for p in texts])
    good = {"custom_id": "row-0", "row": 0, "text": expected_text(llm, texts[0]), "finish_reason": "length",
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}, "error": None}
    torn = json.dumps({**good, "custom_id": "row-1", "row": 1})[:25]          # a write cut by a crash
    (tmp_path / "out.jsonl").write_text(json.dumps(good) + "\n" + torn, encoding="utf-8")
    summary = run_batch(llm, tmp_path / "in.jsonl", tmp_path / "out.jsonl", defaults=GREEDY, progress=False)
    assert summary.dropped_torn_line and summary.skipped_rows == 1 and summary.completed_rows == 4
    out = read_output(tmp_path / "out.jsonl")                                  # every line parses
    assert sorted(r["row"] for r in out) == [0, 1, 2, 3, 4]
    assert out[0] == good


def test_output_of_another_input_or_a_corrupt_output_is_refused(tmp_path):
    llm = make_fake_llm()
    write_jsonl(tmp_path / "in.jsonl", [{"custom_id": "a", "prompt": "abc"}, {"custom_id": "b", "prompt": "x"}])
    write_jsonl(tmp_path / "other.jsonl", [{"custom_id": "zz", "row": 0}])
    with pytest.raises(BatchFileError, match="row 0 has custom_id 'a'.*'zz'"):
        run_batch(llm, tmp_path / "in.jsonl", tmp_path / "other.jsonl", progress=False)
    write_jsonl(tmp_path / "corrupt.jsonl", ["not json", json.dumps({"custom_id": "a", "row": 0})])
    with pytest.raises(BatchFileError, match="corrupt.jsonl: line 1"):
        run_batch(llm, tmp_path / "in.jsonl", tmp_path / "corrupt.jsonl", progress=False)
    with pytest.raises(BatchFileError, match=r"\.jsonl or \.parquet"):
        run_batch(llm, tmp_path / "in.csv", tmp_path / "out.jsonl", progress=False)
    with pytest.raises(FileNotFoundError):
        run_batch(llm, tmp_path / "missing.jsonl", tmp_path / "out.jsonl", progress=False)


def test_output_chunks_are_whole_lines_written_by_one_write(tmp_path, monkeypatch):
    writes = []
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: writes.append(bytes(data)) or real_write(fd, data))
    with OutputFile(tmp_path / "o.jsonl") as out:
        out.append([{"custom_id": "a", "row": 0, "error": None}, {"custom_id": "b", "row": 1, "error": None}])
    assert len(writes) == 1 and writes[0].count(b"\n") == 2 and writes[0].endswith(b"\n")


# -- Parquet and progress --------------------------------------------------------------------------------
def test_parquet_input(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    llm = make_fake_llm(n_slots=4, n_ctx=64)
    texts = prompts(6)
    rows = [{"custom_id": f"p{i}", "method": "POST", "url": "/v1/completions",
             "body": {"prompt": p, "max_tokens": 4 if i == 2 else None}} for i, p in enumerate(texts)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "in.parquet")    # body: a struct column
    run_batch(llm, tmp_path / "in.parquet", tmp_path / "out.jsonl", defaults=GREEDY, progress=False)
    by_id = {r["custom_id"]: r for r in read_output(tmp_path / "out.jsonl")}
    assert sorted(by_id) == [f"p{i}" for i in range(6)]
    for i, p in enumerate(texts):
        assert by_id[f"p{i}"]["text"] == expected_text(llm, p, 4 if i == 2 else 6)


def test_progress_line_shows_rows_rate_and_eta():
    stream = io.StringIO()
    bar = Progress(total=10, already_done=2, stream=stream, interval=0)
    bar.update([{"error": None, "usage": {"completion_tokens": 7}}, {"error": {"code": "x"}, "usage": None}])
    bar.finish()
    lines = stream.getvalue().splitlines()
    assert lines and lines[-1].startswith("lmengine batch: 4/10 rows (40.0%), 1 errors, ")
    assert "tok/s" in lines[-1] and "ETA 0:" in lines[-1]


def test_job_prints_progress(tmp_path, capsys):
    llm = make_fake_llm(n_slots=4, n_ctx=64)
    write_jsonl(tmp_path / "in.jsonl", [{"prompt": p} for p in prompts(8)])
    run_batch(llm, tmp_path / "in.jsonl", tmp_path / "out.jsonl", defaults=GREEDY, progress_interval=0)
    err = capsys.readouterr().err
    assert "lmengine batch: 8/8 rows (100.0%), 0 errors" in err and err.count("\n") >= 2


# -- the real model ------------------------------------------------------------------------------------
def test_real_model_greedy_rows_equal_generate(tmp_path, smollm2_path):
    """The job's answers equal LLM.generate / LLM.chat on the same prompts (greedy, so
    determined), whatever the batch composition (batched greedy equals one by one: test_llm.py)."""
    from lmengine import LLM
    llm = LLM(smollm2_path, n_ctx=256, max_batch_size=4)
    texts = ["The capital of France is", "def add(a, b):", "1, 2, 3, 4,", "Roses are red,", "Water is made of"]
    chat = [{"role": "user", "content": "Name a color."}]
    rows = [{"custom_id": f"t{i}", "url": "/v1/completions", "body": {"prompt": p, "max_tokens": 8,
                                                                       "temperature": 0}}
            for i, p in enumerate(texts)]
    rows.append({"custom_id": "chat", "url": "/v1/chat/completions",
                 "body": {"messages": chat, "max_tokens": 8, "temperature": 0}})
    write_jsonl(tmp_path / "in.jsonl", rows)
    run_batch(llm, tmp_path / "in.jsonl", tmp_path / "out.jsonl", progress=False)
    by_id = {r["custom_id"]: r for r in read_output(tmp_path / "out.jsonl")}
    params = SamplingParams(temperature=0, max_tokens=8)
    for i, ref in enumerate(llm.generate(texts, params)):
        assert by_id[f"t{i}"]["text"] == ref.text and by_id[f"t{i}"]["finish_reason"] == ref.finish_reason
    ref = llm.chat(chat, params)
    assert by_id["chat"]["text"] == ref.text
    assert by_id["chat"]["usage"]["prompt_tokens"] == len(llm.chat_prompt_ids(chat))
    llm.close()
