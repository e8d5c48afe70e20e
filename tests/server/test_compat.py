"""Pieces of the server that need no HTTP: tool-call parsing, request planning (field mapping
and its errors), the OpenAI-shaped helpers on LLM (fake model), and `lmengine serve`'s options
(uvicorn replaced by a recorder)."""
import argparse
import json

import pytest

from conftest import PlainChat
from fake_backend import expected_text, make_fake_llm
from lmengine import cli_serve
from lmengine.openai_compat import RequestError, plan_chat, plan_completion
from lmengine.tools import parse_tool_calls, plan_tools

WEATHER = {"type": "function", "function": {"name": "get_weather",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


@pytest.fixture
def llm():
    llm = make_fake_llm(n_slots=4, n_ctx=120)
    llm.chat_template = PlainChat()
    yield llm
    llm.close()


def test_tool_calls_are_parsed_from_tags_or_bare_json():
    plan = plan_tools([WEATHER], None, None)
    assert plan.choice == "auto" and plan.parse and plan.json_schema is None
    calls = parse_tool_calls('<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>', plan)
    assert [(c["type"], c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == \
        [("function", "get_weather", {"city": "Oslo"})]
    assert parse_tool_calls('{"name": "get_weather", "parameters": {"city": "Rome"}}', plan)[0]["function"][
        "arguments"] == '{"city": "Rome"}'
    two = parse_tool_calls('<tool_call>{"name": "get_weather", "arguments": {}}</tool_call>\n'
                           '<tool_call>{"name": "get_weather", "arguments": {"city": "X"}}', plan)   # unclosed last
    assert len(two) == 2 and two[0]["id"] != two[1]["id"]
    for text in ("The weather is fine.", '{"name": "delete_files", "arguments": {}}', "<tool_call>{oops",
                 '{"city": "Oslo"}'):
        assert parse_tool_calls(text, plan) is None, text


def test_tool_choice_forced_and_errors():
    plan = plan_tools([WEATHER], {"type": "function", "function": {"name": "get_weather"}}, None)
    assert plan.forced == "get_weather"
    schema = plan.json_schema
    assert schema["properties"]["name"] == {"const": "get_weather"} and schema["required"] == ["name", "arguments"]
    assert plan_tools([WEATHER], "required", None).json_schema["anyOf"][0] == schema
    assert not plan_tools([WEATHER], "none", None).parse
    for tools, choice, param in [
        (None, "required", "tool_choice"),
        ([WEATHER], {"type": "function", "function": {"name": "nope"}}, "tool_choice"),
        ([WEATHER], "sometimes", "tool_choice"),
        ([{"type": "function", "function": {"name": "bad name!"}}], None, "tools"),
        ([WEATHER, WEATHER], None, "tools"),
        ([{"type": "retrieval"}], None, "tools"),
        ([], None, "tools"),
    ]:
        with pytest.raises(RequestError) as e:
            plan_tools(tools, choice, None)
        assert e.value.param == param


def test_tools_go_into_a_system_message_when_the_template_has_none():
    plan = plan_tools([WEATHER], "auto", None)
    messages = plan.prepare_messages([
        {"role": "user", "content": [{"type": "text", "text": "weather"}, {"type": "text", "text": "?"}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "A"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}])
    assert messages[0]["role"] == "system" and '"get_weather"' in messages[0]["content"]
    assert messages[1] == {"role": "user", "content": "weather?"}
    assert messages[2] == {"role": "assistant",
                           "content": '<tool_call>{"name": "get_weather", "arguments": {"city": "A"}}</tool_call>'}


def test_request_fields_map_onto_sampling_params(llm):
    plan = plan_completion(llm, {"prompt": "hello", "max_tokens": 7, "temperature": 0.5, "top_k": 3, "min_p": 0.1,
                                 "repetition_penalty": 1.1, "stop": "x", "seed": 4, "n": 2,
                                 "logit_bias": {"3": -100}, "presence_penalty": 0.5, "priority": -2}, "m")
    p = plan.params
    assert (p.max_tokens, p.temperature, p.top_k, p.min_p, p.repetition_penalty, p.stop, p.seed, p.n, p.priority) == \
        (7, 0.5, 3, 0.1, 1.1, ("x",), 4, 2, -2)
    assert dict(p.logit_bias) == {3: -100.0} and p.presence_penalty == 0.5
    assert plan_completion(llm, {"prompt": "hello"}, "m").params.max_tokens == 16       # OpenAI's default
    chat = plan_chat(llm, {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 5,
                           "max_tokens": 9, "logprobs": True, "top_logprobs": 2}, "m")
    assert chat.params.max_tokens == 5 and chat.params.logprobs == 2 and chat.logprobs == 2
    assert plan_chat(llm, {"messages": [{"role": "user", "content": "hi"}]}, "m").params.max_tokens is None
    fmt = plan_chat(llm, {"messages": [{"role": "user", "content": "hi"}],
                          "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
                              "type": "object", "properties": {"a": {"type": "integer"}}}}}}, "m")
    assert json.loads(fmt.params.json_schema)["properties"] == {"a": {"type": "integer"}}
    for body, param in [({"prompt": "hi", "top_k": -2}, "top_k"), ({"prompt": "hi", "seed": -1}, "seed"),
                        ({"prompt": "hi", "n": 17}, "n"), ({"prompt": "hi", "logprobs": 6}, "logprobs"),
                        ({"prompt": "hi", "temperature": -1}, "temperature"),
                        ({"prompt": "hi", "min_tokens": 20, "max_tokens": 3}, "min_tokens"),
                        ({"prompt": "hi", "response_format": {"type": "yaml"}}, "response_format"),
                        ({"prompt": "hi", "guided_regex": "(", "max_tokens": 3}, "guided_regex")]:
        with pytest.raises(RequestError) as e:
            plan_completion(llm, body, "m")
        assert e.value.param == param, (body, e.value)


def test_create_completion_helpers_on_llm(llm):
    out = llm.create_completion("hello", max_tokens=6, temperature=0, ignore_eos=True)
    assert out["choices"][0]["text"] == expected_text(llm, "hello", 6)
    chunks = list(llm.create_chat_completion([{"role": "user", "content": "hello"}], max_tokens=6, temperature=0,
                                             ignore_eos=True, stream=True, stream_options={"include_usage": True}))
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == expected_text(llm, "hello ", 6)
    assert chunks[-1]["usage"] == {"prompt_tokens": 6, "completion_tokens": 6, "total_tokens": 12}
    echo = llm.create_completion("hello", max_tokens=3, temperature=0, echo=True)
    assert echo["choices"][0]["text"].startswith("hello")
    assert not any(llm.slots.busy)


def _serve_args(**overrides):
    parser = argparse.ArgumentParser()
    cli_serve.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve"])
    for k, v in overrides.items():
        setattr(args, k, v)
    return args


def test_serve_command(monkeypatch, capsys):
    import uvicorn

    import lmengine.llm
    ran = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: ran.update(app=app, **kw))
    monkeypatch.setattr(lmengine.llm, "LLM", lambda *a, **kw: make_fake_llm())
    monkeypatch.delenv("LMENGINE_API_KEY", raising=False)
    assert cli_serve.run(_serve_args()) == 0
    assert ran["host"] == "127.0.0.1" and ran["port"] == 8000
    assert "warning" not in capsys.readouterr().err
    assert cli_serve.run(_serve_args(host="0.0.0.0")) == 0
    assert "without --api-key" in capsys.readouterr().err
    assert cli_serve.run(_serve_args(host="0.0.0.0", api_key="k")) == 0
    assert "warning" not in capsys.readouterr().err
    assert cli_serve.is_loopback("::1") and cli_serve.is_loopback("localhost") and not cli_serve.is_loopback("10.0.0.1")
    from lmengine.errors import InvalidParameterError
    with pytest.raises(InvalidParameterError, match="max-batch"):
        cli_serve.run(_serve_args(max_batch=0))
