"""OpenAI-shaped requests and responses, shared by the server (lmengine.server) and by
`LLM.create_chat_completion` / `LLM.create_completion` (for code moving from llama-cpp-python).

Three steps, each a function a newcomer can read alone:

1. `plan_chat(llm, body)` / `plan_completion(llm, body)`: an OpenAI request body (a dict, as
   JSON-decoded) -> a `Plan`: prompt token ids, `SamplingParams`, and how to shape the answer.
   OpenAI's fields are mapped onto SamplingParams (`SAMPLING_MAP`); the values are validated by
   SamplingParams itself, and its InvalidParameterError is re-raised as `RequestError` naming
   the request field. vLLM's extra sampling fields (top_k, min_p, repetition_penalty, ...) pass
   through under their own names.
2. The engine runs the plan (`LLM.generate` / `LLM.stream` here, AsyncLLM in the server).
3. `chat_response` / `completion_response` (whole answers) and `chat_chunk` / `completion_chunk`
   (streamed pieces): the response dicts, with `usage`, `finish_reason`, logprobs in OpenAI's
   shape, and tool calls parsed into `tool_calls` (lmengine.tools).
"""
from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import ChatTemplateError, InvalidParameterError
from .openai_common import RequestError, error_body, plain_messages  # noqa: F401 (re-exported)
from .params import SamplingParams
from .tools import parse_tool_calls, plan_tools


# OpenAI request field -> SamplingParams field (values go through unchanged).
SAMPLING_MAP = {
    "n": "n", "temperature": "temperature", "top_p": "top_p", "seed": "seed", "stop": "stop",
    "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
    # vLLM's extras, under their own names
    "top_k": "top_k", "min_p": "min_p", "typical_p": "typical_p", "repetition_penalty": "repetition_penalty",
    "min_tokens": "min_tokens", "ignore_eos": "ignore_eos", "stop_token_ids": "stop_token_ids",
    "skip_special_tokens": "skip_special_tokens", "include_stop_str_in_output": "include_stop_str_in_output",
    "allowed_token_ids": "allowed_token_ids", "bad_words": "bad_words",
    "priority": "priority",     # vLLM's: a lower value is admitted first when requests wait for a slot
    # structured output as extra fields (vLLM's guided_* names, and the SamplingParams names)
    "guided_json": "json_schema", "guided_regex": "regex", "guided_grammar": "grammar",
    "json_schema": "json_schema", "regex": "regex", "grammar": "grammar",
}
MAX_N = 16                  # more samples per request than this is refused (each holds a slot)
MAX_TOP_LOGPROBS = 20       # OpenAI's limit for chat (completions: 5)


@dataclass
class Plan:
    """One OpenAI request, ready to run: the prompt, the sampling, and the answer's shape."""

    kind: str                              # "chat" or "completion"
    model: str
    prompt_ids: list[int]
    params: SamplingParams
    stream: bool = False
    include_usage: bool = False            # stream_options.include_usage
    logprobs: int | None = None            # top alternatives per token, None = no logprobs
    tools: Any = None                      # chat with tools: a lmengine.tools.ToolPlan
    echo_prompt: str | None = None         # completions with echo=True: the prompt text
    created: int = field(default_factory=lambda: int(time.time()))
    id: str = ""
    tokenizer: Any = field(default=None, repr=False)   # renders logprob tokens

    def __post_init__(self) -> None:
        if not self.id:
            prefix = "chatcmpl-" if self.kind == "chat" else "cmpl-"
            self.id = prefix + uuid.uuid4().hex[:24]

    @property
    def buffer_output(self) -> bool:
        """Whether a stream must hold the text back until the end (tool calls are parsed from the
        whole output)."""
        return self.tools is not None and self.tools.parse


# -- 1. requests -> plans --------------------------------------------------------------------------
def plan_chat(llm, body: Mapping[str, Any], model: str) -> Plan:
    """A chat completion request body -> Plan (RequestError for what the client got wrong)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list of messages", "messages")
    sampling = sampling_fields(body)
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    sampling["max_tokens"] = max_tokens                 # None: until the context is full (OpenAI's chat default)
    logprobs = None
    if body.get("logprobs"):
        logprobs = body.get("top_logprobs") or 0
        _check_int_range("top_logprobs", logprobs, 0, MAX_TOP_LOGPROBS)
    elif body.get("top_logprobs") is not None:
        raise RequestError("top_logprobs requires logprobs=true", "top_logprobs")
    sampling["logprobs"] = logprobs
    apply_response_format(body.get("response_format"), sampling)
    tools = plan_tools(body.get("tools"), body.get("tool_choice"), llm.chat_template)
    if tools is not None and tools.json_schema is not None:
        if any(sampling.get(k) not in (None, False) for k in ("json_schema", "regex", "grammar", "json_object")):
            raise RequestError("a forced tool call cannot be combined with response_format or another "
                               "constraint", "tool_choice")
        sampling["json_schema"] = tools.json_schema
    params = _params(llm, sampling, body)
    messages = tools.prepare_messages(messages) if tools is not None else plain_messages(messages)
    try:
        prompt_ids = llm.chat_prompt_ids(messages, **(tools.template_kwargs if tools is not None else {}))
    except ChatTemplateError as e:
        raise RequestError(str(e), "messages") from None
    _check_prompt(llm, prompt_ids, params)
    return Plan("chat", model, prompt_ids, params, stream=bool(body.get("stream")),
                include_usage=_include_usage(body), logprobs=logprobs, tools=tools, tokenizer=llm.tokenizer)


def plan_completion(llm, body: Mapping[str, Any], model: str) -> Plan:
    """A (legacy) completion request body -> Plan. One prompt: a str or a list of token ids."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise RequestError("prompt is empty", "prompt")
        prompt_ids = llm.tokenizer.encode(prompt)
    elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        prompt_ids = prompt
    else:
        raise RequestError("prompt must be a string or a list of token ids (one prompt per request)", "prompt")
    try:
        prompt_ids = llm.check_token_ids(prompt_ids, "prompt token id")
    except InvalidParameterError as e:
        raise RequestError(str(e), "prompt") from None
    if not prompt_ids:
        raise RequestError("prompt is empty (no tokens)", "prompt")
    sampling = sampling_fields(body)
    sampling["max_tokens"] = body.get("max_tokens", 16)   # OpenAI's completions default
    logprobs = body.get("logprobs")
    if logprobs is not None:
        _check_int_range("logprobs", logprobs, 0, 5)
    sampling["logprobs"] = logprobs
    apply_response_format(body.get("response_format"), sampling)
    params = _params(llm, sampling, body)
    _check_prompt(llm, prompt_ids, params)
    echo = None
    if body.get("echo"):
        echo = prompt if isinstance(prompt, str) else llm.tokenizer.decode(prompt_ids)
    return Plan("completion", model, prompt_ids, params, stream=bool(body.get("stream")),
                include_usage=_include_usage(body), logprobs=logprobs, echo_prompt=echo, tokenizer=llm.tokenizer)


def sampling_fields(body: Mapping[str, Any]) -> dict[str, Any]:
    """SamplingParams fields from a request body's SAMPLING_MAP fields and logit_bias (checked:
    RequestError naming the field); max_tokens, logprobs and response_format are the caller's.
    The server and batch jobs (lmengine.batch) share it."""
    out = {}
    for name, target in SAMPLING_MAP.items():
        value = body.get(name)
        if value is not None:
            if target in out:
                raise RequestError(f"{name} sets {target}, which another field of the request sets too", name)
            out[target] = value
    if "n" in out:
        _check_int_range("n", out["n"], 1, MAX_N)
    bias = body.get("logit_bias")
    if bias is not None:
        if not isinstance(bias, Mapping):
            raise RequestError("logit_bias must be an object of token id -> bias", "logit_bias")
        converted = {}
        for key, value in bias.items():
            try:
                token_id = int(key)
            except (TypeError, ValueError):
                raise RequestError(f"logit_bias keys must be token ids, got {key!r}", "logit_bias") from None
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not -100 <= value <= 100:
                raise RequestError(f"logit_bias[{key}] must be a number in [-100, 100], got {value!r}", "logit_bias")
            converted[token_id] = value
        out["logit_bias"] = converted
    return out


def apply_response_format(fmt: Any, sampling: dict[str, Any]) -> None:
    """A request's response_format (text, json_object, json_schema) set as constraints in `sampling`."""
    if fmt is None:
        return
    if not isinstance(fmt, Mapping) or fmt.get("type") not in ("text", "json_object", "json_schema"):
        raise RequestError("response_format.type must be 'text', 'json_object' or 'json_schema'", "response_format")
    if fmt["type"] == "json_object":
        sampling["json_object"] = True
    elif fmt["type"] == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, Mapping) or not isinstance(spec.get("schema", {}), Mapping):
            raise RequestError("response_format.json_schema must be an object with a 'schema' object",
                               "response_format")
        sampling["json_schema"] = dict(spec.get("schema") or {"type": "object"})


def _params(llm, sampling: dict[str, Any], body: Mapping[str, Any]) -> SamplingParams:
    """SamplingParams from the mapped fields; its InvalidParameterError names a SamplingParams
    field, which is turned back into the request's field name."""
    missing = [k for k in sampling if k not in SamplingParams.__dataclass_fields__]
    if missing:
        raise RequestError(f"{missing[0]} is not supported by this lmengine build", missing[0])
    try:
        return llm.resolve_params(SamplingParams(**sampling))
    except InvalidParameterError as e:
        raise RequestError(str(e), _request_field(str(e), body)) from None


def _request_field(message: str, body: Mapping[str, Any]) -> str | None:
    """The request field behind a SamplingParams error (its message starts with the field)."""
    first = message.split(" ", 1)[0].split("[", 1)[0].rstrip(":,")
    for request_name, target in SAMPLING_MAP.items():
        if target == first and body.get(request_name) is not None:
            return request_name
    if first in ("json_schema", "json_object") and body.get("response_format") is not None:
        return "response_format"
    if first in ("json_schema", "json_object") and body.get("tool_choice") is not None:
        return "tool_choice"
    if first == "max_tokens" and body.get("max_completion_tokens") is not None:
        return "max_completion_tokens"
    return first if first in body or first in ("max_tokens", "logprobs") else None


def _check_int_range(name: str, value: Any, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise RequestError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}", name)


def _check_prompt(llm, prompt_ids: list[int], params: SamplingParams) -> None:
    if len(prompt_ids) >= llm.n_ctx:
        raise RequestError(f"the prompt has {len(prompt_ids)} tokens; the context holds {llm.n_ctx} "
                           f"(at least one position must remain for the answer)", "messages", code="context_length_exceeded")


def _include_usage(body: Mapping[str, Any]) -> bool:
    options = body.get("stream_options")
    return bool(isinstance(options, Mapping) and options.get("include_usage"))


# -- 3. results -> response dicts ------------------------------------------------------------------
def usage(n_prompt: int, n_completion: int) -> dict[str, int]:
    return {"prompt_tokens": n_prompt, "completion_tokens": n_completion, "total_tokens": n_prompt + n_completion}


def chat_response(plan: Plan, outputs: list) -> dict:
    """A chat.completion dict from the n Completions of a request."""
    choices = []
    for i, out in enumerate(outputs):
        message: dict[str, Any] = {"role": "assistant", "content": out.text}
        finish = out.finish_reason
        if plan.tools is not None and plan.tools.parse:
            calls = parse_tool_calls(out.text, plan.tools)
            if calls:
                message = {"role": "assistant", "content": None, "tool_calls": calls}
                finish = "tool_calls"
        choice = {"index": i, "message": message, "finish_reason": finish, "logprobs": None}
        if plan.logprobs is not None:
            choice["logprobs"] = {"content": _chat_logprobs(plan, out.logprobs or []), "refusal": None}
        choices.append(choice)
    return {"id": plan.id, "object": "chat.completion", "created": plan.created, "model": plan.model,
            "choices": choices, "usage": usage(len(plan.prompt_ids), sum(len(o.token_ids) for o in outputs)),
            "system_fingerprint": None}


def completion_response(plan: Plan, outputs: list) -> dict:
    """A text_completion dict from the n Completions of a request."""
    choices = []
    for i, out in enumerate(outputs):
        text = (plan.echo_prompt or "") + out.text
        choice = {"index": i, "text": text, "finish_reason": out.finish_reason, "logprobs": None}
        if plan.logprobs is not None:
            choice["logprobs"] = _completion_logprobs(plan, out.logprobs or [], len(plan.echo_prompt or ""))
        choices.append(choice)
    return {"id": plan.id, "object": "text_completion", "created": plan.created, "model": plan.model,
            "choices": choices, "usage": usage(len(plan.prompt_ids), sum(len(o.token_ids) for o in outputs))}


def chat_chunk(plan: Plan, index: int, *, delta: dict | None = None, finish_reason: str | None = None,
               logprobs: list | None = None, usage_dict: dict | None = None) -> dict:
    """One chat.completion.chunk dict (choices empty when it only carries usage)."""
    chunk = {"id": plan.id, "object": "chat.completion.chunk", "created": plan.created, "model": plan.model,
             "system_fingerprint": None, "choices": []}
    if delta is not None:
        choice = {"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        if plan.logprobs is not None and logprobs is not None:
            choice["logprobs"] = {"content": _chat_logprobs(plan, logprobs), "refusal": None}
        chunk["choices"].append(choice)
    if plan.include_usage:
        chunk["usage"] = usage_dict
    return chunk


def completion_chunk(plan: Plan, index: int, *, text: str | None = None, finish_reason: str | None = None,
                     logprobs: list | None = None, usage_dict: dict | None = None, offset: int = 0) -> dict:
    """One streamed text_completion dict."""
    chunk = {"id": plan.id, "object": "text_completion", "created": plan.created, "model": plan.model, "choices": []}
    if text is not None:
        choice = {"index": index, "text": text, "finish_reason": finish_reason, "logprobs": None}
        if plan.logprobs is not None and logprobs is not None:
            choice["logprobs"] = _completion_logprobs(plan, logprobs, offset)
        chunk["choices"].append(choice)
    if plan.include_usage:
        chunk["usage"] = usage_dict
    return chunk


class ChunkShaper:
    """Turns engine chunks (text, token ids, finish reason, index, logprobs) of one request into
    OpenAI stream dicts, in order; used by the server and by `create_*(stream=True)`."""

    def __init__(self, plan: Plan, n_prompt: int):
        self.plan = plan
        self.n_prompt = n_prompt
        self.n_completion = 0
        self.started: set[int] = set()
        self.buffers: dict[int, list[str]] = {}
        self.offsets: dict[int, int] = {}

    def first(self) -> list[dict]:
        """Chunks before any token (a completion echo)."""
        plan = self.plan
        if plan.kind == "completion" and plan.echo_prompt:
            return [completion_chunk(plan, i, text=plan.echo_prompt) for i in range(plan.params.n)]
        return []

    def add(self, chunk) -> list[dict]:
        plan, i = self.plan, chunk.index
        self.n_completion += len(chunk.token_ids)
        out = []
        if plan.kind == "completion":
            offset = self.offsets.get(i, len(plan.echo_prompt or ""))
            out.append(completion_chunk(plan, i, text=chunk.text, finish_reason=chunk.finish_reason,
                                        logprobs=chunk.logprobs, offset=offset))
            self.offsets[i] = offset + len(chunk.text)
            return out
        if i not in self.started:
            self.started.add(i)
            out.append(chat_chunk(plan, i, delta={"role": "assistant", "content": ""}))
        if plan.buffer_output:
            self.buffers.setdefault(i, []).append(chunk.text)
            if chunk.finish_reason is None:
                return out
            text = "".join(self.buffers.pop(i))
            calls = parse_tool_calls(text, plan.tools)
            if calls:
                delta = {"tool_calls": [dict(c, index=k) for k, c in enumerate(calls)]}
                out.append(chat_chunk(plan, i, delta=delta, finish_reason="tool_calls"))
            else:
                out.append(chat_chunk(plan, i, delta={"content": text}, finish_reason=chunk.finish_reason))
            return out
        out.append(chat_chunk(plan, i, delta={"content": chunk.text}, finish_reason=chunk.finish_reason,
                              logprobs=chunk.logprobs))
        return out

    def last(self) -> list[dict]:
        """The usage chunk (stream_options.include_usage)."""
        if not self.plan.include_usage:
            return []
        u = usage(self.n_prompt, self.n_completion)
        if self.plan.kind == "chat":
            return [chat_chunk(self.plan, 0, usage_dict=u)]
        return [completion_chunk(self.plan, 0, usage_dict=u)]


# -- logprobs in OpenAI's shapes -------------------------------------------------------------------
def _token_table(tokenizer) -> list[bytes]:
    table = getattr(tokenizer, "_lmengine_token_bytes", None)
    if table is None:
        table = getattr(tokenizer, "_pieces", None)        # Tokenizer: id -> the bytes it decodes to
        if table is None:
            table = [tokenizer.decode([i]).encode("utf-8") for i in range(tokenizer.vocab_size)]
        try:
            tokenizer._lmengine_token_bytes = table
        except AttributeError:
            pass
    return table


def _token(plan: Plan, token_id: int) -> tuple[str, list[int]]:
    table = _token_table(plan.tokenizer)
    raw = table[token_id] if 0 <= token_id < len(table) else b""
    return raw.decode("utf-8", errors="replace"), list(raw)


def _chat_logprobs(plan: Plan, logprobs: list) -> list[dict]:
    content = []
    for lp in logprobs:
        token, raw = _token(plan, lp.token_id)
        tops = []
        for tid, value in zip(lp.top_token_ids, lp.top_logprobs):
            t, b = _token(plan, tid)
            tops.append({"token": t, "logprob": float(value), "bytes": b})
        content.append({"token": token, "logprob": float(lp.logprob), "bytes": raw, "top_logprobs": tops})
    return content


def _completion_logprobs(plan: Plan, logprobs: list, offset: int) -> dict:
    tokens, values, tops, offsets = [], [], [], []
    for lp in logprobs:
        token, _ = _token(plan, lp.token_id)
        tokens.append(token)
        values.append(float(lp.logprob))
        top = {}
        for tid, value in zip(lp.top_token_ids, lp.top_logprobs):
            top.setdefault(_token(plan, tid)[0], float(value))
        tops.append(top)
        offsets.append(offset)
        offset += len(token)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


# -- the offline helpers on LLM --------------------------------------------------------------------
def create_chat_completion(llm, messages: list, *, model: str | None = None, stream: bool = False,
                           **body: Any) -> dict | Iterator[dict]:
    """`LLM.create_chat_completion`: an OpenAI chat completion dict (or, stream=True, an iterator
    of chunk dicts), the same as the server returns. Keyword arguments are the request's fields."""
    return _run(llm, plan_chat, dict(body, messages=messages, stream=stream), model)


def create_completion(llm, prompt, *, model: str | None = None, stream: bool = False,
                      **body: Any) -> dict | Iterator[dict]:
    """`LLM.create_completion`: an OpenAI text completion dict (or an iterator of chunk dicts)."""
    return _run(llm, plan_completion, dict(body, prompt=prompt, stream=stream), model)


def _run(llm, planner, body: dict, model: str | None):
    from .async_llm import ChunkReader
    plan = planner(llm, body, model or model_name(llm))
    if not plan.stream:
        out = llm.generate(plan.prompt_ids, plan.params)
        build = chat_response if plan.kind == "chat" else completion_response
        return build(plan, out.outputs)

    def chunks() -> Iterator[dict]:
        shaper = ChunkShaper(plan, len(plan.prompt_ids))
        requests = [llm.scheduler.submit(plan.prompt_ids, plan.params, i) for i in range(plan.params.n)]
        readers = [ChunkReader(r) for r in requests]
        try:
            yield from shaper.first()
            while any(r.chunks or not r.done for r in requests):
                for reader in readers:
                    llm.scheduler.wait_for_news(reader.request)
                    for chunk in reader.take():
                        yield from shaper.add(chunk)
                    if reader.request.error is not None:
                        raise reader.request.error
            yield from shaper.last()
        finally:
            for r in requests:
                if not r.done:
                    llm.scheduler.cancel(r)

    return chunks()


def model_name(llm) -> str:
    """The name a model is served under by default: its file name without .gguf."""
    name = os.path.basename(str(llm.path)) if llm.path else "lmengine"
    return name[:-5] if name.endswith(".gguf") else name
