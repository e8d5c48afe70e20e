"""The FastAPI app of `lmengine serve`: OpenAI's routes over an AsyncLLM.

    POST /v1/chat/completions, POST /v1/completions   (stream=true: server-sent events, then
                                                       `data: [DONE]`)
    POST /v1/embeddings                               (models LLM.embed supports: bert, gpt2)
    GET  /v1/models, GET /health, GET /metrics

A request goes: size-limited body -> JSON -> pydantic model (types, unknown fields) -> Plan
(engine/openai_compat.py: fields mapped onto SamplingParams, which validates the values) ->
AsyncLLM (the scheduler's background loop batches it with the others) -> response dicts.

Every error is an OpenAI error object {"error": {"message", "type", "param", "code"}} with its
HTTP status: 400 bad request (bad JSON, unknown or ill-typed field, invalid value, prompt too
long), 401 wrong or missing API key, 404 unknown model or route, 413 body too large, 429 too
many requests in flight, 500 an internal error (no details leak), 503 the model is closed.

Security: the API key (if any) is compared in constant time (hmac.compare_digest); the body
size is limited before it is read; CORS is off unless origins are given; no request field names
a file (the model is chosen at start).
"""
from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import time
from contextlib import aclosing, asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmengine.async_llm import AsyncLLM
from lmengine.errors import LLMClosedError, LMEngineError
from lmengine.openai_compat import (ChunkShaper, Plan, RequestError, chat_response, completion_response,
                                    error_body, plan_chat, plan_completion)
from lmengine.openai_compat import model_name as default_model_name

from .metrics import CONTENT_TYPE, Metrics, RequestTimer
from .protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest

log = logging.getLogger("lmengine.server")

DEFAULT_MAX_BODY_BYTES = 1 << 20          # 1 MiB: a long prompt is ~100 KB
DEFAULT_MAX_PENDING = 256                 # requests in flight (running + queued) before 429s
DEFAULT_PREFILL_CHUNK = 256               # prompt tokens per scheduler step (chunked prefill)
DEFAULT_PREFILL_PACE = 1.0                # while streams decode, a chunk takes about one decode step's time
                                          # (docs/SERVER.md, "Choosing the pace")
MAX_EMBED_INPUTS = 2048                   # texts per embeddings request (OpenAI's limit)


def create_app(llm, *, api_key: str | None = None, model_name: str | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, max_pending: int = DEFAULT_MAX_PENDING,
               max_tokens_limit: int | None = None, prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK,
               prefill_pace: float | None = DEFAULT_PREFILL_PACE,
               cors_origins: list[str] | None = None, close_llm: bool = False) -> FastAPI:
    """A FastAPI app serving `llm` (an lmengine.LLM).

    api_key: required as `Authorization: Bearer KEY` on every route but /health (None: open).
    model_name: the id in /v1/models and responses (default: the model file's name); requests
        naming another model get 404. max_body_bytes: larger bodies get 413. max_pending: more
        requests in flight get 429. max_tokens_limit: larger max_tokens get 400 (None: the
        context is the limit). prefill_chunk: the scheduler's chunked-prefill budget (None: off);
        prefill_pace: while streams decode, chunks sized to about this many decode steps' time
        (lmengine.scheduler; None: fixed chunks).
    cors_origins: allowed origins for browser clients (None: CORS off). close_llm: close the LLM
        when the app shuts down.
    The scheduler's background loop runs while the app does (its lifespan)."""
    served = model_name or default_model_name(llm)
    key = api_key.encode("utf-8") if api_key else None
    metrics = Metrics(llm.scheduler)
    state = {"allm": None, "pending": 0}
    created = int(time.time())
    llm.scheduler.prefill_chunk = prefill_chunk
    llm.scheduler.prefill_pace = prefill_pace

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state["allm"] = AsyncLLM(llm, close_llm=close_llm)
        try:
            yield
        finally:
            await state["allm"].close()

    app = FastAPI(title="lmengine", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.llm, app.state.metrics = llm, metrics
    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])

    # -- errors ------------------------------------------------------------------------------------
    @app.exception_handler(RequestError)
    async def _request_error(request: Request, e: RequestError):
        return JSONResponse(error_body(e.message, _error_type(e.status), e.param, e.code), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        return JSONResponse(error_body(str(e.detail), _error_type(e.status_code)), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, e: Exception):
        log.exception("internal error")
        return JSONResponse(error_body("internal server error", "internal_error"), status_code=500)

    # -- auth --------------------------------------------------------------------------------------
    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if key is not None and request.url.path != "/health":
            given = request.headers.get("authorization", "")
            token = given[7:].strip() if given[:7].lower() == "bearer " else ""
            if not hmac.compare_digest(token.encode("utf-8"), key):
                return JSONResponse(error_body("invalid API key", "authentication_error", code="invalid_api_key"),
                                    status_code=401, headers={"WWW-Authenticate": "Bearer"})
        return await call_next(request)

    # -- routes ------------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        ok = not llm._closed and llm.scheduler.background
        return JSONResponse({"status": "ok" if ok else "unavailable"}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics_route():
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": served, "object": "model", "created": created,
                                            "owned_by": "lmengine"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _serve(request, "chat", ChatCompletionRequest, plan_chat)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _serve(request, "completion", CompletionRequest, plan_completion)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        status = 500
        try:
            body = await _read_json(request, max_body_bytes)
            try:
                parsed = EmbeddingRequest.model_validate(body)
            except ValidationError as e:
                raise _validation_error(e) from None
            if parsed.model not in (None, served):
                raise RequestError(f"the model {parsed.model!r} does not exist; this server serves {served!r}",
                                   "model", status=404, code="model_not_found")
            texts = [parsed.input] if isinstance(parsed.input, str) else list(parsed.input)
            if not texts or len(texts) > MAX_EMBED_INPUTS:
                raise RequestError(f"input must hold 1 to {MAX_EMBED_INPUTS} texts", "input")
            if not hasattr(llm, "embed"):
                raise RequestError("this lmengine build has no LLM.embed", None, status=404)
            try:
                vectors, counts = await asyncio.to_thread(_embed, llm, texts)   # [n, dim] float32
                n_tokens = sum(counts)
            except LLMClosedError as e:
                raise RequestError(str(e), None, status=503) from None
            except LMEngineError as e:
                raise RequestError(str(e), "input") from None
            if parsed.dimensions is not None:
                if not 1 <= parsed.dimensions <= vectors.shape[1]:
                    raise RequestError(f"dimensions must be in [1, {vectors.shape[1]}], got {parsed.dimensions}",
                                       "dimensions")
                vectors = vectors[:, :parsed.dimensions]
            data = []
            for i, v in enumerate(vectors):
                value = (base64.b64encode(v.astype("<f4").tobytes()).decode("ascii")
                         if parsed.encoding_format == "base64" else [float(x) for x in v])
                data.append({"object": "embedding", "index": i, "embedding": value})
            status = 200
            metrics.prompt_tokens.inc(n_tokens)
            return {"object": "list", "data": data, "model": served,
                    "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}}
        except RequestError as e:
            status = e.status
            raise
        finally:
            metrics.requests.labels("embedding", str(status)).inc()

    # -- one request -------------------------------------------------------------------------------
    async def _serve(request: Request, endpoint: str, model_cls, planner):
        t_arrival = time.perf_counter()
        status, streaming = 500, False
        try:
            body = await _read_json(request, max_body_bytes)
            try:
                parsed = model_cls.model_validate(body)
            except ValidationError as e:
                raise _validation_error(e) from None
            fields = parsed.model_dump(exclude_unset=True)
            if fields.get("stream_options") is not None:
                fields["stream_options"] = dict(fields["stream_options"])
            _check_unsupported(fields)
            if fields.get("model") not in (None, served):
                raise RequestError(f"the model {fields['model']!r} does not exist; this server serves {served!r}",
                                   "model", status=404, code="model_not_found")
            if state["pending"] >= max_pending:
                raise RequestError(f"too many requests in flight ({max_pending}); retry later", None, status=429,
                                   code="rate_limit_exceeded")
            try:
                plan = planner(llm, fields, served)
            except LLMClosedError as e:
                raise RequestError(str(e), None, status=503) from None
            except RequestError:
                raise
            except LMEngineError as e:             # any other mistake in the request's content
                raise RequestError(str(e), None) from None
            if max_tokens_limit is not None and (plan.params.max_tokens or 0) > max_tokens_limit:
                raise RequestError(f"max_tokens must be <= {max_tokens_limit} on this server, got "
                                   f"{plan.params.max_tokens}", "max_tokens")
            metrics.prompt_tokens.inc(len(plan.prompt_ids))
            timer = RequestTimer(metrics, t_arrival)
            if plan.stream:
                status, streaming = 200, True       # _sse counts it when it ends
                state["pending"] += 1               # _sse gives it back
                metrics.in_progress.inc()
                return StreamingResponse(_sse(plan, timer, endpoint), media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            response = await _complete(plan, timer, request)
            status = 200
            return response
        except RequestError as e:
            status = e.status
            raise
        finally:
            if not streaming:
                metrics.requests.labels(endpoint, str(status)).inc()

    async def _complete(plan: Plan, timer: RequestTimer, request: Request):
        allm: AsyncLLM = state["allm"]
        requests: list = []
        watcher = asyncio.create_task(_cancel_on_disconnect(request, requests, llm.scheduler))
        state["pending"] += 1
        metrics.in_progress.inc()
        try:
            async with aclosing(allm.stream_ids(plan.prompt_ids, plan.params, on_requests=requests.extend)) as chunks:
                async for chunk in chunks:
                    timer.tokens(chunk.index, len(chunk.token_ids), time.perf_counter())
        except LLMClosedError as e:
            raise RequestError(str(e), None, status=503) from None
        except LMEngineError as e:
            raise RequestError(str(e), None, status=500, code="engine_error") from None
        finally:
            watcher.cancel()
            state["pending"] -= 1
            metrics.in_progress.dec()
        timer.done(time.perf_counter())
        outputs = [r.generator.completion() for r in requests]
        build = chat_response if plan.kind == "chat" else completion_response
        return JSONResponse(build(plan, outputs))

    async def _sse(plan: Plan, timer: RequestTimer, endpoint: str):
        """The event stream of one request. A client that disconnects cancels this generator
        (Starlette watches for it), which cancels the engine requests at the next step."""
        allm: AsyncLLM = state["allm"]
        shaper = ChunkShaper(plan, len(plan.prompt_ids))
        status = "200"
        try:
            for d in shaper.first():
                yield _event(d)
            async with aclosing(allm.stream_ids(plan.prompt_ids, plan.params)) as chunks:
                async for chunk in chunks:
                    timer.tokens(chunk.index, len(chunk.token_ids), time.perf_counter())
                    for d in shaper.add(chunk):
                        yield _event(d)
            for d in shaper.last():
                yield _event(d)
            timer.done(time.perf_counter())
        except LMEngineError as e:                 # after the headers: the error goes in the stream
            status = "503" if isinstance(e, LLMClosedError) else "500"
            yield _event(error_body(str(e), "internal_error", code="engine_error"))
        except (asyncio.CancelledError, GeneratorExit):
            status = "499"                          # the client went away
            raise
        finally:
            state["pending"] -= 1
            metrics.in_progress.dec()
            metrics.requests.labels(endpoint, status).inc()
        yield "data: [DONE]\n\n"

    return app


# -- helpers ---------------------------------------------------------------------------------------
def _embed(llm, texts: list[str]):
    """(float32 [n, dim] embeddings, tokens per text) as LLM.embed computes them, under the
    scheduler's lock (the loop thread's forwards use the same backend); each text is encoded once."""
    from lmengine.embed import embed_texts
    with llm.scheduler.lock:
        llm.check_open()
        return embed_texts(llm, texts, return_counts=True)


def _event(data: dict) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


def _error_type(status: int) -> str:
    return {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
            413: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable"}.get(status,
                                                                                                   "internal_error")


async def _read_json(request: Request, limit: int) -> dict:
    """The body as a JSON object; 413 past `limit` bytes (checked on the declared length, then
    while reading, so a chunked upload cannot exceed it either)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise RequestError("invalid Content-Length header", None)
        if int(declared) > limit:
            raise RequestError(f"the request body is larger than {limit} bytes", None, status=413)
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise RequestError(f"the request body is larger than {limit} bytes", None, status=413)
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(f"the request body is not valid JSON: {e}", None) from None
    if not isinstance(value, dict):
        raise RequestError("the request body must be a JSON object", None)
    return value


def _validation_error(e: ValidationError) -> RequestError:
    """The first pydantic error as a 400 naming the top-level request field."""
    err = e.errors()[0]
    loc = [str(p) for p in err.get("loc", ())]
    param = loc[0] if loc else None
    if err.get("type") == "extra_forbidden":
        return RequestError(f"Unrecognized request argument supplied: {'.'.join(loc)}", param)
    return RequestError(f"{'.'.join(loc)}: {err.get('msg')}", param)


def _check_unsupported(fields: dict) -> None:
    if fields.get("suffix"):
        raise RequestError("suffix is not supported", "suffix")
    best_of = fields.get("best_of")
    if best_of is not None and best_of != (fields.get("n") or 1):
        raise RequestError("best_of other than n is not supported", "best_of")


async def _cancel_on_disconnect(request: Request, requests: list, scheduler) -> None:
    """Wait for the client to go away, then cancel its engine requests (at the next step)."""
    try:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                break
    except Exception:
        return
    for r in requests:
        scheduler.request_cancel(r)
