"""Request bodies of the OpenAI API, as pydantic models: types are checked here (a wrong type
is a 400 naming the field), unknown fields are refused (OpenAI answers "Unrecognized request
argument"), and vLLM's extra sampling fields are accepted. Value checks that SamplingParams
already makes (ranges, relations) are left to it (engine/openai_compat.py maps the fields)."""
from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

Stop = Union[str, list[str], None]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: Optional[bool] = None
    continuous_usage_stats: Optional[bool] = None     # vLLM's; accepted, not used


class _Common(BaseModel):
    """Fields both endpoints take."""

    model_config = ConfigDict(extra="forbid")
    model: Optional[str] = None
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    n: Optional[int] = None
    stop: Stop = None
    seed: Optional[int] = None
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logit_bias: Optional[dict[str, float]] = None
    user: Optional[str] = None                         # accepted, not used
    response_format: Optional[dict[str, Any]] = None
    # vLLM's extras
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    typical_p: Optional[float] = None
    repetition_penalty: Optional[float] = None
    min_tokens: Optional[int] = None
    ignore_eos: Optional[bool] = None
    stop_token_ids: Optional[list[int]] = None
    skip_special_tokens: Optional[bool] = None
    include_stop_str_in_output: Optional[bool] = None
    allowed_token_ids: Optional[list[int]] = None
    bad_words: Optional[list[str]] = None
    guided_json: Union[dict[str, Any], str, None] = None
    guided_regex: Optional[str] = None
    guided_grammar: Optional[str] = None
    json_schema: Union[dict[str, Any], str, None] = None
    regex: Optional[str] = None
    grammar: Optional[str] = None


class ChatCompletionRequest(_Common):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: Optional[int] = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = None
    tools: Optional[list[dict[str, Any]]] = None
    tool_choice: Union[Literal["none", "auto", "required"], dict[str, Any], None] = None
    parallel_tool_calls: Optional[bool] = None         # accepted, not used
    store: Optional[bool] = None                       # accepted, not used
    metadata: Optional[dict[str, str]] = None          # accepted, not used
    service_tier: Optional[str] = None                 # accepted, not used


class CompletionRequest(_Common):
    prompt: Union[str, list[int], list[str], list[list[int]]]
    logprobs: Optional[int] = None
    echo: Optional[bool] = None
    suffix: Optional[str] = None
    best_of: Optional[int] = None


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    input: Union[str, list[str]]
    model: Optional[str] = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Optional[int] = None
    user: Optional[str] = None                         # accepted, not used
