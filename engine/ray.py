"""lmengine on a Ray cluster: batch inference over a Ray Dataset, and serving with Ray Serve.

Needs `pip install "lmengine[ray]"`. Only this module imports ray (`import lmengine` never does).

Batch inference: each actor holds one `LLM`, loaded once when the actor starts; the dataset's
batches are spread over the actors with `map_batches`.

    import ray
    from lmengine import SamplingParams
    from lmengine.ray import batch_infer

    ds = ray.data.read_json("requests.jsonl")      # rows as for `lmengine batch` (custom_id, body...)
    out = batch_infer(ds, model="smollm2", sampling=SamplingParams(temperature=0, max_tokens=64),
                      concurrency=4, threads_per_actor=2)
    out.write_parquet("results/")                  # custom_id, row, text, finish_reason, usage, error

Fault tolerance: an actor that dies (its process killed, its node lost) is restarted by Ray,
which loads the model again, and the batch it held is retried, so every input row comes out
exactly once (the defaults of Ray Data's actor pool: `max_restarts=-1`, `max_task_retries=-1`).

Compiled kernels: the Numba cache lives beside the installed package (its __pycache__), so on
one machine the first actor to start compiles them (or finds them compiled) and the others load
them from the disk; each machine of a cluster does this once.

Serving: `serve_app(model, replicas=N)` is a Ray Serve application of the OpenAI-compatible
server (`lmengine.server.create_app`), one `LLM` per replica:

    from ray import serve
    from lmengine.ray import serve_app
    serve.run(serve_app("smollm2", replicas=2, threads_per_replica=1), route_prefix="/")
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Iterator

import ray                             # noqa: I001  (the PyPI package, not this module: absolute import)

from .batch import BatchRequest, error_row, parse_request
from .params import SamplingParams

# The output rows' Arrow schema, the same in every batch (a batch without errors would otherwise
# infer a null-typed "error" column that the next batch's struct cannot be merged with).
def result_schema():
    """pyarrow schema of batch_infer's output rows (those of `lmengine batch`'s OUTPUT file)."""
    import pyarrow as pa
    return pa.schema([
        ("custom_id", pa.string()), ("row", pa.int64()), ("text", pa.string()), ("finish_reason", pa.string()),
        ("usage", pa.struct([("prompt_tokens", pa.int64()), ("completion_tokens", pa.int64()),
                             ("total_tokens", pa.int64())])),
        ("error", pa.struct([("code", pa.string()), ("message", pa.string())])),
    ])


class LLMPredictor:
    """The callable class `map_batches` runs in each actor: one LLM, loaded in the constructor.

    model, llm_kwargs: as for `LLM(model, **llm_kwargs)` (or model() when it is callable); threads: the LLM's n_threads.
    sampling: SamplingParams for the fields a row does not set. crash_marker: a test hook (see
    `batch_infer`)."""

    def __init__(self, model: str | Callable[[], Any] | None, sampling: SamplingParams | None, threads: int,
                 llm_kwargs: dict | None, window: int | None, crash_marker: str | None):
        from .llm import LLM
        if callable(model):                    # a factory: LLM.from_pretrained(...), a custom backend
            self.llm = model()
        else:
            self.llm = LLM(model, n_threads=threads, **(llm_kwargs or {}))
        self.sampling, self.window, self.crash_marker = sampling, window, crash_marker
        self.calls = 0

    def __call__(self, batch):            # pyarrow.Table in -> pyarrow.Table out
        import pyarrow as pa

        from .batch import complete_requests
        self.calls += 1
        self._maybe_crash()
        requests = [_request(item) for item in batch.to_pylist()]
        rows = [r for chunk in complete_requests(self.llm, requests, self.sampling, self.window) for r in chunk]
        for r in rows:
            if r["row"] is not None and r["row"] < 0:      # a dataset row without a "row" column
                r["row"] = None
        return pa.Table.from_pylist(rows, schema=result_schema())

    def _maybe_crash(self) -> None:
        """Test hook: on its second batch, the first actor to create `crash_marker` dies at once
        (os._exit, as a killed process would), once per job."""
        if self.crash_marker is None or self.calls != 2:
            return
        try:
            os.close(os.open(self.crash_marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
        os._exit(1)


def _request(item: dict) -> BatchRequest:
    """A dataset row -> BatchRequest. Rows from `lmengine batch --ray` carry the request as JSON
    text in "_json" (beside "row" and "custom_id"); other rows are requests themselves."""
    row = item.get("row")
    row = row if isinstance(row, int) and not isinstance(row, bool) else -1
    if "_json" in item:
        raw = json.loads(item["_json"])
        raw["custom_id"] = item.get("custom_id")
    else:
        raw = {k: v for k, v in item.items() if k != "row"}
    request = parse_request(row, raw)
    if not (isinstance(raw, dict) and raw.get("custom_id") is not None):
        request.custom_id = None              # no id to report (rather than a made-up "row--1")
    return request


def batch_infer(dataset, model: str | Callable[[], Any] | None = None, sampling: SamplingParams | None = None, *,
                concurrency: int = 1, threads_per_actor: int = 1, batch_size: int = 64,
                max_batch_size: int = 16, llm_kwargs: dict | None = None, window: int | None = None,
                _crash_marker: str | None = None):
    """A Ray Dataset of answers to the requests in `dataset`, one output row per input row.

    dataset: a ray.data.Dataset whose rows are requests as `lmengine batch` reads them
        (OpenAI batch-file rows with custom_id and body, or plain prompt/messages rows); give
        each a custom_id to match the answers (the output's order is not the input's).
    model: a .gguf path or bundled name, as for `LLM` (each actor opens it: on a cluster, a
        path every node has), or a function of no arguments that returns an LLM (called once in
        each actor; threads_per_actor and llm_kwargs then do not apply).
    sampling: defaults for the fields a row does not set.
    concurrency: actors, each with one LLM using threads_per_actor threads (and reserving as
        many CPUs from Ray). batch_size: rows per map_batches call. max_batch_size: sequences each
        LLM decodes together. llm_kwargs: other `LLM` arguments (n_ctx, activations...).
    _crash_marker: a test hook: the first actor to create this file dies in the middle of the
        job; Ray restarts it and retries its batch.

    Rows: custom_id, row (the "row" column of the input, if any), text, finish_reason, usage
    (prompt/completion/total tokens), error (code, message: the row failed; text is null)."""
    if concurrency < 1 or threads_per_actor < 1 or batch_size < 1:
        from .errors import InvalidParameterError
        raise InvalidParameterError(f"concurrency, threads_per_actor and batch_size must be >= 1, got "
                                    f"{concurrency}, {threads_per_actor}, {batch_size}")
    llm_kwargs = dict(llm_kwargs or {})
    llm_kwargs.setdefault("max_batch_size", max_batch_size)
    return dataset.map_batches(
        LLMPredictor, batch_format="pyarrow", batch_size=batch_size,
        # Ray Data's actor pool restarts a dead actor and retries its batch by default
        # (max_restarts=-1, max_task_retries=-1); tests/integration/test_ray.py holds it to that.
        # One batch in flight per actor: Ray Data's default (2) hands the first actor to finish
        # loading its model two batches at once, and with few batches the other actor then
        # idles while they run one after the other (a job of 2 batches took twice as long,
        # docs/SCALE_OUT.md); the cost, a short gap while the next batch is sent, is small next to
        # a batch's seconds of work.
        compute=ray.data.ActorPoolStrategy(size=concurrency, max_tasks_in_flight_per_actor=1),
        num_cpus=threads_per_actor,
        fn_constructor_kwargs=dict(model=model, sampling=sampling, threads=threads_per_actor,
                                   llm_kwargs=llm_kwargs, window=window, crash_marker=_crash_marker))


def ray_rows(requests: Iterator[BatchRequest], *, model: str | None, sampling: SamplingParams | None,
             actors: int, threads_per_actor: int, batch_size: int = 32, llm_kwargs: dict | None = None,
             chunk_rows: int = 4096) -> Iterator[list[dict]]:
    """`lmengine batch --ray`: run parsed requests on the connected Ray cluster, yielding lists of
    output rows as batches come back (the `run_rows` of `lmengine.batch.run_batch`). Error rows
    found while reading INPUT are yielded at once; the others go to Ray `chunk_rows` at a time,
    so the driver never holds the whole file."""
    import pyarrow  # noqa: F401  (fail early, before the job starts, if the extra is missing)
    while True:
        errors, items = [], []
        for request in requests:
            if request.error is not None:
                errors.append(error_row(request, request.error.code, str(request.error)))
            else:
                items.append(_ray_item(request))
            if len(items) >= chunk_rows:
                break
        if errors:
            yield errors
        if not items:
            return
        ds = ray.data.from_items(items)
        out = batch_infer(ds, model, sampling, concurrency=actors, threads_per_actor=threads_per_actor,
                          batch_size=batch_size, llm_kwargs=llm_kwargs)
        for batch in out.iter_batches(batch_format="pyarrow", batch_size=None):
            yield batch.to_pylist()


def _ray_item(request: BatchRequest) -> dict:
    raw: dict[str, Any] = dict(request.sampling)
    if request.messages is not None:
        raw["messages"] = request.messages
    else:
        raw["prompt"] = request.prompt
    return {"row": request.row, "custom_id": request.custom_id, "_json": json.dumps(raw)}


# -- serving -----------------------------------------------------------------------------------------
def serve_app(model: str | None = None, *, replicas: int = 1, threads_per_replica: int = 1,
              llm_kwargs: dict | None = None, app_kwargs: dict | None = None):
    """A Ray Serve application of the OpenAI-compatible server (`lmengine.server.create_app`):
    `replicas` replicas, each holding one LLM(model, n_threads=threads_per_replica, **llm_kwargs)
    and reserving as many CPUs. app_kwargs go to create_app (api_key, model_name, ...). Run it
    with `serve.run(serve_app(...), route_prefix="/")`; Ray restarts a replica that dies."""
    from ray import serve
    if replicas < 1 or threads_per_replica < 1:
        from .errors import InvalidParameterError
        raise InvalidParameterError(f"replicas and threads_per_replica must be >= 1, got {replicas}, "
                                    f"{threads_per_replica}")
    deployment = serve.deployment(serve.ingress()(LMEngineServer), name="lmengine", num_replicas=replicas,
                                  ray_actor_options={"num_cpus": threads_per_replica})
    return deployment.bind(model, threads_per_replica, dict(llm_kwargs or {}), dict(app_kwargs or {}))


class LMEngineServer:
    """One Serve replica: an LLM, loaded in the constructor, behind the FastAPI app of
    `lmengine.server` (built by Serve after the constructor: `__serve_build_asgi_app__`)."""

    def __init__(self, model: str | None, threads: int, llm_kwargs: dict, app_kwargs: dict):
        from .llm import LLM
        self.llm = LLM(model, n_threads=threads, **llm_kwargs)
        self.app_kwargs = app_kwargs

    def __serve_build_asgi_app__(self):
        from .server import create_app
        return create_app(self.llm, close_llm=True, **self.app_kwargs)
