"""Offline batch jobs: a file of requests in, one result row per request out, resumable.

    from lmengine import LLM, SamplingParams
    from lmengine.batch import run_batch
    summary = run_batch(LLM("smollm2"), "requests.jsonl", "results.jsonl",
                        defaults=SamplingParams(temperature=0, max_tokens=64))

INPUT is a `.jsonl` file (one JSON object per line) or a Parquet file, one request per row, in
either form:

  - OpenAI's batch-file format:
      {"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions",
       "body": {"model": "any", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 64}}
    (`"url": "/v1/completions"` with a `"prompt"` in the body for plain completions);
  - plain rows: {"prompt": "Once upon a time"} or {"messages": [...]}, with an optional
    custom_id and sampling fields beside them ({"prompt": "...", "temperature": 0}).

A row without a custom_id is named "row-N", N its 0-based index in INPUT. Sampling fields are
those the server takes, mapped by the same code (lmengine.openai_compat): OpenAI's names
(max_tokens, max_completion_tokens, temperature, top_p, stop, seed, n = 1, presence_penalty,
frequency_penalty, logit_bias, response_format), vLLM's (top_k, min_p, repetition_penalty,
min_tokens, stop_token_ids, ignore_eos, ...) and the structured-output extras (json_schema,
regex, grammar, guided_json, ...); a row's fields override the job's `defaults`.

OUTPUT is JSONL, one line per input row, in the order rows finish (match them by custom_id):

    {"custom_id": "r1", "row": 0, "text": "...", "finish_reason": "stop" | "length",
     "usage": {"prompt_tokens": 12, "completion_tokens": 30, "total_tokens": 42}, "error": null}

A row that cannot run (malformed JSON, a missing prompt, an invalid sampling value, a prompt
longer than the context, a duplicate custom_id) gets `"error": {"code": ..., "message": ...}`
and null text; it never stops the job.

Durability: finished rows are appended in chunks, each chunk one write() followed by fsync, at
most every `flush_seconds`. Rerunning with the same OUTPUT skips the rows it already holds, so a
crash loses at most the rows in flight and those finished in the last `flush_seconds`. A crash
in the middle of a write leaves an unterminated last line: it is detected and dropped on resume.

Work goes through the LLM's continuous-batching scheduler: up to `window` requests are queued at
once and a finished one is replaced at once, so the batch stays full (no chunk waits for its
slowest row).
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

from .errors import (BatchFileError, ChatTemplateError, ContextLengthError, InvalidParameterError, LMEngineError,
                     TokenizerError)
from .openai_compat import SAMPLING_MAP, RequestError, apply_response_format, sampling_fields
from .params import SamplingParams


class RowError(Exception):
    """One input row that cannot run: becomes an error row with `code` and `message`."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


CHAT_URL, COMPLETIONS_URL = "/v1/chat/completions", "/v1/completions"

# body fields besides those of openai_compat.SAMPLING_MAP (the server's mapping: OpenAI's sampling
# fields, vLLM's extras, structured output), which batch rows take too
LENGTH_FIELDS = ("max_tokens", "max_completion_tokens")
SAMPLING_FIELDS = frozenset(SAMPLING_MAP) | {"logit_bias", "response_format", *LENGTH_FIELDS}
# body fields accepted and ignored: they describe the request, not how to answer it
IGNORED_FIELDS = frozenset({"model", "user", "metadata", "store", "stream", "logprobs"})
ROW_FIELDS = frozenset({"custom_id", "method", "url", "body", "prompt", "messages", "row"})


# -- requests ----------------------------------------------------------------------------------------
@dataclass
class BatchRequest:
    """One parsed input row: a prompt (str or token ids) or chat messages, and sampling overrides."""

    row: int                                   # 0-based index of the row in INPUT
    custom_id: str
    prompt: str | list[int] | None = None
    messages: list[dict] | None = None
    sampling: dict[str, Any] = field(default_factory=dict)   # SamplingParams field -> value
    error: RowError | None = None              # set: this row is an error row, nothing to run


def _drop_nulls(mapping: dict) -> dict:
    """The mapping without None values: a Parquet/Arrow struct holds every field of every row,
    with None where a row has no such field (a JSON null means "default" too)."""
    return {k: v for k, v in mapping.items() if v is not None}


def _custom_id(row: int, raw: Any) -> str:
    if isinstance(raw, dict) and raw.get("custom_id") is not None:
        cid = raw["custom_id"]
        return cid if isinstance(cid, str) else json.dumps(cid)
    return f"row-{row}"


def parse_request(row: int, raw: Any) -> BatchRequest:
    """The request of input row `row` (a dict as read from JSONL or Parquet, or a RowError met
    while reading it). Never raises for a bad row: the result then carries `error`."""
    custom_id = _custom_id(row, raw)
    try:
        if isinstance(raw, RowError):
            raise raw
        return _parse(row, custom_id, raw)
    except RowError as e:
        return BatchRequest(row, custom_id, error=e)


def _parse(row: int, custom_id: str, raw: Any) -> BatchRequest:
    if not isinstance(raw, dict):
        raise RowError("invalid_request", f"a row is a JSON object, got {type(raw).__name__}")
    raw = _drop_nulls(raw)
    if not isinstance(raw.get("custom_id", ""), str):
        raise RowError("invalid_request", f"custom_id must be a string, got {raw['custom_id']!r}")
    if "body" in raw:                          # OpenAI batch-file format
        method = raw.get("method", "POST")
        if method != "POST":
            raise RowError("invalid_request", f"method must be 'POST', got {method!r}")
        body = raw["body"]
        if isinstance(body, str):              # a Parquet column may hold the body as JSON text
            try:
                body = json.loads(body)
            except json.JSONDecodeError as e:
                raise RowError("invalid_json", f"body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise RowError("invalid_request", f"body must be an object, got {type(body).__name__}")
        body = _drop_nulls(body)
        extra = sorted(k for k in raw if k not in ROW_FIELDS)
        if extra:
            raise RowError("invalid_request", f"unknown field {extra[0]!r} beside body")
        url = raw.get("url")
        if url is not None and url not in (CHAT_URL, COMPLETIONS_URL):
            raise RowError("invalid_request", f"url must be {CHAT_URL!r} or {COMPLETIONS_URL!r}, got {url!r}")
        want = "messages" if url == CHAT_URL else "prompt" if url == COMPLETIONS_URL else None
        fields, where = body, "body."
    else:                                      # a plain row: prompt or messages, sampling beside
        fields, where, want = {k: v for k, v in raw.items() if k not in ("custom_id", "row")}, "", None
    prompt, messages = fields.get("prompt"), fields.get("messages")
    if (prompt is None) == (messages is None):
        raise RowError("invalid_request", f"a row needs exactly one of {where}prompt and {where}messages")
    if want == "messages" and messages is None:
        raise RowError("invalid_request", f"url {CHAT_URL!r} needs body.messages")
    if want == "prompt" and prompt is None:
        raise RowError("invalid_request", f"url {COMPLETIONS_URL!r} needs body.prompt")
    if prompt is not None:
        prompt = _check_prompt(prompt, where)
    if messages is not None:
        messages = _check_messages(messages, where)
    sampling = _sampling(fields, where)
    return BatchRequest(row, custom_id, prompt=prompt, messages=messages, sampling=sampling)


def _check_prompt(prompt: Any, where: str) -> str | list[int]:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return prompt                          # token ids (checked against the vocabulary later)
    raise RowError("invalid_request", f"{where}prompt must be a string or a list of token ids (one prompt "
                                      f"per row), got {type(prompt).__name__}")


def _check_messages(messages: Any, where: str) -> list[dict]:
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise RowError("invalid_request", f"{where}messages must be a non-empty list of objects")
    return [_drop_nulls(m) for m in messages]


def _sampling(fields: dict, where: str) -> dict[str, Any]:
    """SamplingParams overrides from a row's fields, mapped as the server maps a request body
    (openai_compat.sampling_fields); RowError for an unknown or invalid field."""
    for key, value in fields.items():
        if key in ("prompt", "messages") or key in IGNORED_FIELDS and not _asks_unsupported(key, value):
            continue
        if key in IGNORED_FIELDS:
            raise RowError("invalid_request", f"{where}{key}={value!r} is not supported by batch jobs")
        if key not in SAMPLING_FIELDS:
            raise RowError("invalid_request", f"unknown field {where}{key}")
    if all(key in fields for key in LENGTH_FIELDS):
        raise RowError("invalid_parameter", f"{where}max_tokens and {where}max_completion_tokens are both set")
    try:
        out = sampling_fields(fields)
        apply_response_format(fields.get("response_format"), out)
    except RequestError as e:
        raise RowError("invalid_parameter", f"{where}{e}") from None
    for key in LENGTH_FIELDS:
        if key in fields:
            out["max_tokens"] = fields[key]
    if out.get("n", 1) != 1:
        raise RowError("invalid_parameter", f"{where}n must be 1 in a batch job (one row per answer), got {out['n']!r}")
    out.pop("n", None)
    try:
        SamplingParams(**out)                  # validates each value, naming the field
    except (InvalidParameterError, TypeError) as e:
        raise RowError("invalid_parameter", f"{where}{e}") from None
    return out


def _asks_unsupported(key: str, value: Any) -> bool:
    """stream=true and logprobs (an answer field this output has no place for) are refused."""
    return key in ("stream", "logprobs") and bool(value)


# -- reading INPUT -----------------------------------------------------------------------------------
def input_format(path: str | os.PathLike) -> str:
    """"jsonl" or "parquet", from the file name; BatchFileError for anything else."""
    name = os.fspath(path).lower()
    if name.endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl"
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    raise BatchFileError(f"{os.fspath(path)}: a batch INPUT is a .jsonl or .parquet file")


def count_rows(path: str | os.PathLike) -> int:
    """Rows of INPUT (non-blank lines of a JSONL file; the row count in a Parquet footer)."""
    if input_format(path) == "parquet":
        import pyarrow.parquet as pq
        return pq.ParquetFile(path).metadata.num_rows
    n = 0
    with open(path, "rb") as fh:
        for line in fh:
            n += bool(line.strip())
    return n


def read_rows(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """(row index, row) for every row of INPUT: a dict, or a RowError for a line that is not
    JSON. Blank lines of a JSONL file are not rows."""
    if input_format(path) == "parquet":
        yield from _read_parquet(path)
        return
    with open(path, "rb") as fh:
        row = 0
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield row, json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                yield row, RowError("invalid_json", f"line {number} is not valid JSON: {e}")
            row += 1


def _read_parquet(path) -> Iterator[tuple[int, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise BatchFileError(f"{os.fspath(path)}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    row = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        for item in batch.to_pylist():
            yield row, item
            row += 1


def iter_requests(path: str | os.PathLike, done: dict[int, str] | None = None) -> Iterator[BatchRequest]:
    """The requests of INPUT in order, less the rows in `done` (row -> custom_id, from OUTPUT).
    A custom_id seen before in INPUT makes the later row an error row. BatchFileError if `done`
    names a row whose custom_id differs from INPUT's: OUTPUT belongs to another INPUT."""
    done = done or {}
    seen: set[str] = set()
    for row, raw in read_rows(path):
        request = parse_request(row, raw)
        if row in done and done[row] != request.custom_id:
            raise BatchFileError(
                f"{os.fspath(path)}: row {row} has custom_id {request.custom_id!r}, but the output already "
                f"holds {done[row]!r} for that row: the output was written for another input "
                f"(use a new output file)")
        duplicate = request.custom_id in seen
        seen.add(request.custom_id)
        if row in done:
            continue
        if duplicate and request.error is None:
            request.error = RowError("duplicate_custom_id", f"custom_id {request.custom_id!r} appears in an "
                                                            f"earlier row; custom_ids must be unique")
        yield request


# -- running -----------------------------------------------------------------------------------------
ERROR_CODES: tuple[tuple[type, str], ...] = (
    (ContextLengthError, "context_length_exceeded"),
    (InvalidParameterError, "invalid_parameter"),
    (ChatTemplateError, "invalid_request"),
    (TokenizerError, "invalid_request"),
)


def error_row(request: BatchRequest, code: str, message: str) -> dict:
    """The output row of a request that failed."""
    return {"custom_id": request.custom_id, "row": request.row, "text": None, "finish_reason": None,
            "usage": None, "error": {"code": code, "message": message}}


def _exception_row(request: BatchRequest, e: BaseException) -> dict:
    code = next((c for cls, c in ERROR_CODES if isinstance(e, cls)), "engine_error")
    return error_row(request, code, str(e) or type(e).__name__)


def _prompt_ids(llm, request: BatchRequest) -> list[int]:
    """Token ids of the request's prompt or chat (checked: in the vocabulary, shorter than the
    context)."""
    if request.messages is not None:
        ids = llm.chat_prompt_ids(request.messages)
    else:
        ids = request.prompt
    return llm._prompt_ids(ids)      # the checks LLM.generate applies to every prompt


def complete_requests(llm, requests: Iterable[BatchRequest], defaults: SamplingParams | None = None,
                      window: int | None = None) -> Iterator[list[dict]]:
    """Run requests through llm's scheduler; yield lists of output rows as rows finish (error
    rows as soon as they are met). At most `window` requests (default 2 * max_batch_size) are
    queued at once, so the batch stays full while INPUT streams by. Closing the iterator (or an
    exception, KeyboardInterrupt included) cancels the requests in flight."""
    scheduler = llm.scheduler
    window = window or 2 * llm.max_batch_size
    source = iter(requests)
    pending: list[tuple[Any, BatchRequest]] = []        # (scheduler Request, its BatchRequest)
    exhausted = False
    try:
        while True:
            finished: list[dict] = []
            while not exhausted and len(pending) < window:
                request = next(source, None)
                if request is None:
                    exhausted = True
                elif request.error is not None:
                    finished.append(error_row(request, request.error.code, str(request.error)))
                else:
                    try:
                        params = llm.resolve_params(defaults, request.sampling)
                        pending.append((scheduler.submit(_prompt_ids(llm, request), params), request))
                    except LMEngineError as e:
                        finished.append(_exception_row(request, e))
            if pending:
                with scheduler.lock:
                    scheduler.step()
                still = []
                for r, request in pending:
                    if not r.done:
                        still.append((r, request))
                    elif r.error is not None:
                        finished.append(_exception_row(request, r.error))
                    else:
                        finished.append(_result_row(request, r))
                pending = still
            if finished:
                yield finished
            if exhausted and not pending:
                return
    finally:
        for r, _ in pending:
            scheduler.cancel(r)


def _result_row(request: BatchRequest, r) -> dict:
    out = r.generator.completion()
    n_prompt, n_gen = len(r.prompt_ids), len(out.token_ids)
    return {"custom_id": request.custom_id, "row": request.row, "text": out.text,
            "finish_reason": out.finish_reason,
            "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_gen, "total_tokens": n_prompt + n_gen},
            "error": None}


# -- writing OUTPUT ----------------------------------------------------------------------------------
class OutputFile:
    """OUTPUT of a batch job: a JSONL file rows are appended to in durable chunks.

    Opening it reads the rows already there (`done`: row index -> custom_id) and drops an
    unterminated last line (a write torn by a crash; `dropped_torn_line` says so). A line that
    is not a JSON object with a "row" and a "custom_id" anywhere else is BatchFileError."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if not self.path.lower().endswith((".jsonl", ".ndjson", ".json")):
            raise BatchFileError(f"{self.path}: a batch OUTPUT is a .jsonl file")
        self.done: dict[int, str] = {}
        self.dropped_torn_line = False
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            self._load()
        except BaseException:
            os.close(self._fd)
            raise

    def _load(self) -> None:
        good_end = 0                          # bytes up to the end of the last complete line
        with open(self._fd, "rb", closefd=False) as fh:
            fh.seek(0)
            for number, line in enumerate(fh, 1):
                if not line.endswith(b"\n"):  # a torn last write
                    self.dropped_torn_line = True
                    break
                good_end += len(line)
                if not line.strip():
                    continue
                try:
                    item = json.loads(line)
                    row, cid = item["row"], item["custom_id"]
                    if not isinstance(row, int) or not isinstance(cid, str):
                        raise TypeError
                except (ValueError, KeyError, TypeError):
                    raise BatchFileError(f"{self.path}: line {number} is not a batch output row (a JSON object "
                                         f"with 'row' and 'custom_id'); is this the output of another program?"
                                         ) from None
                self.done[row] = cid
        if self.dropped_torn_line:
            os.ftruncate(self._fd, good_end)
            os.fsync(self._fd)

    def append(self, rows: list[dict]) -> None:
        """Write rows as one chunk: a single write() of whole lines, then fsync."""
        if not rows:
            return
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
        view = memoryview(data)
        while view:                           # write() may be partial (a signal, a full pipe)
            view = view[os.write(self._fd, view):]
        os.fsync(self._fd)
        for r in rows:
            self.done[r["row"]] = r["custom_id"]

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "OutputFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- progress ----------------------------------------------------------------------------------------
class Progress:
    """A progress line on stderr: rows done of the total, errors, generated tok/s, ETA. On a
    terminal the line is redrawn in place every `interval` seconds; otherwise a new line is
    printed every `interval` (10 s by default there), and a last one at the end."""

    def __init__(self, total: int, already_done: int = 0, stream=None, interval: float | None = None):
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = interval if interval is not None else (0.25 if self.tty else 10.0)
        self.total, self.already_done = total, already_done
        self.rows = self.errors = self.tokens = 0         # counted in this run
        self.t0 = time.perf_counter()
        self._last = -math.inf

    def update(self, rows: list[dict]) -> None:
        self.rows += len(rows)
        for r in rows:
            if r["error"] is not None:
                self.errors += 1
            else:
                self.tokens += r["usage"]["completion_tokens"]
        if time.perf_counter() - self._last >= self.interval:
            self._show()

    def line(self) -> str:
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        done = self.already_done + self.rows
        pct = 100.0 * done / self.total if self.total else 100.0
        left = max(self.total - done, 0)
        eta = _clock(left * elapsed / self.rows) if self.rows else "?"
        return (f"lmengine batch: {done}/{self.total} rows ({pct:.1f}%), {self.errors} errors, "
                f"{self.tokens / elapsed:.1f} tok/s, elapsed {_clock(elapsed)}, ETA {eta}")

    def _show(self, end: bool = False) -> None:
        self._last = time.perf_counter()
        if self.tty:
            self.stream.write("\r\x1b[K" + self.line() + ("\n" if end else ""))
        else:
            self.stream.write(self.line() + "\n")
        self.stream.flush()

    def finish(self) -> None:
        self._show(end=True)


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


# -- the job -----------------------------------------------------------------------------------------
@dataclass
class BatchSummary:
    """What one run of a batch job did."""

    total_rows: int            # rows in INPUT
    skipped_rows: int          # already in OUTPUT before this run
    completed_rows: int        # written by this run (error rows included)
    error_rows: int            # of those, error rows
    generated_tokens: int
    seconds: float
    dropped_torn_line: bool    # OUTPUT ended in a torn line, dropped before resuming

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds > 0 else 0.0


def run_batch(llm, input_path: str | os.PathLike, output_path: str | os.PathLike, *,
              defaults: SamplingParams | None = None, window: int | None = None, flush_seconds: float = 1.0,
              progress: bool = True, progress_interval: float | None = None,
              run_rows: Callable[[Iterator[BatchRequest]], Iterator[list[dict]]] | None = None) -> BatchSummary:
    """Answer every row of INPUT not yet in OUTPUT, appending result rows to OUTPUT (see the
    module docstring). `defaults`: sampling for fields a row does not set. `run_rows` replaces
    the in-process engine (lmengine.ray passes one that runs on a Ray cluster); llm is then
    unused (None is fine)."""
    input_format(input_path)
    if not os.path.isfile(input_path):
        raise FileNotFoundError(2, "No such file or directory", os.fspath(input_path))
    total = count_rows(input_path)
    with OutputFile(output_path) as out:
        skipped = len(out.done)
        bar = Progress(total, skipped, interval=progress_interval) if progress else None
        t0 = time.perf_counter()
        buffered: list[dict] = []
        last_flush = time.perf_counter()
        completed = errors = tokens = 0
        requests = iter_requests(input_path, dict(out.done))
        chunks = run_rows(requests) if run_rows is not None else complete_requests(llm, requests, defaults, window)
        try:
            for rows in chunks:
                buffered.extend(rows)
                completed += len(rows)
                errors += sum(r["error"] is not None for r in rows)
                tokens += sum(r["usage"]["completion_tokens"] for r in rows if r["error"] is None)
                if bar is not None:
                    bar.update(rows)
                if time.perf_counter() - last_flush >= flush_seconds:
                    out.append(buffered)
                    buffered, last_flush = [], time.perf_counter()
        finally:           # finished rows are kept, even when interrupted
            out.append(buffered)
            close = getattr(chunks, "close", None)
            if close is not None:
                close()
            if bar is not None:
                bar.finish()
        return BatchSummary(total, skipped, completed, errors, tokens, time.perf_counter() - t0,
                            out.dropped_torn_line)
