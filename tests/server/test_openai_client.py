"""The server on the bundled SmolLM2 model, through the official `openai` client (and its async
client for the load test): the answers equal the offline API's (greedy and seeded requests are
deterministic whatever is batched with them), structured output validates against its schema
(checked with `jsonschema`, an independent validator), and a forced tool call is parsed into
`tool_calls`."""
import asyncio
import json
import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(smollm2_server):
    return openai.OpenAI(base_url=f"{smollm2_server}/v1", api_key="unused", max_retries=0, timeout=120)


def test_chat_greedy_equals_offline_chat(client, smollm2_llm):
    want = smollm2_llm.chat(MESSAGES, temperature=0, max_tokens=16)
    r = client.chat.completions.create(model="smollm2", messages=MESSAGES, temperature=0, max_tokens=16)
    assert r.choices[0].message.content == want.text
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == want.finish_reason
    assert r.usage.prompt_tokens == len(want.prompt_token_ids)
    assert r.usage.completion_tokens == len(want.token_ids)
    # the helper on LLM returns the same dict shape
    offline = smollm2_llm.create_chat_completion(MESSAGES, temperature=0, max_tokens=16, model="smollm2")
    assert offline["choices"][0]["message"] == r.choices[0].message.model_dump(exclude_none=True)


def test_completion_and_streaming_equal_offline_generate(client, smollm2_llm):
    prompt = "The three primary colors are"
    want = smollm2_llm.generate(prompt, temperature=0, max_tokens=20)
    r = client.completions.create(model="smollm2", prompt=prompt, temperature=0, max_tokens=20)
    assert r.choices[0].text == want.text
    stream = client.completions.create(model="smollm2", prompt=prompt, temperature=0, max_tokens=20, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want.text
    assert chunks[-1].usage.completion_tokens == len(want.token_ids)
    chat = client.chat.completions.create(model="smollm2", messages=MESSAGES, temperature=0, max_tokens=16,
                                          stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in chat)
    assert text == smollm2_llm.chat(MESSAGES, temperature=0, max_tokens=16).text


def test_n2_seeded_samples_equal_offline(client, smollm2_llm):
    want = smollm2_llm.chat(MESSAGES, temperature=0.9, seed=5, n=2, max_tokens=12)
    r = client.chat.completions.create(model="smollm2", messages=MESSAGES, temperature=0.9, seed=5, n=2,
                                       max_tokens=12)
    assert [c.message.content for c in r.choices] == [o.text for o in want.outputs]
    assert r.usage.completion_tokens == sum(len(o.token_ids) for o in want.outputs)


def test_logprobs_equal_offline(client, smollm2_llm):
    want = smollm2_llm.chat(MESSAGES, temperature=0, max_tokens=6, logprobs=3)
    r = client.chat.completions.create(model="smollm2", messages=MESSAGES, temperature=0, max_tokens=6,
                                       logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == len(want.logprobs)
    for entry, lp in zip(content, want.logprobs):
        # 1e-4: the same logits, but the server's decode batch may hold other rows
        assert entry.logprob == pytest.approx(lp.logprob, abs=1e-4)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(list(lp.top_logprobs), abs=1e-4)
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token
    assert "".join(e.token for e in content) == want.text


PERSON = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 24},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "city": {"type": "string", "enum": ["Paris", "London", "Tokyo"]}},
          "required": ["name", "age", "city"], "additionalProperties": False}


def test_json_schema_responses_validate_for_20_seeds(client):
    messages = [{"role": "user", "content": "Describe a person as JSON with name, age and city."}]

    def ask(seed):
        r = client.chat.completions.create(
            model="smollm2", messages=messages, temperature=1.0, seed=seed, max_tokens=80,
            response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON,
                                                                    "strict": True}})
        return r.choices[0]

    with ThreadPoolExecutor(8) as pool:
        choices = list(pool.map(ask, range(20)))
    for choice in choices:
        assert choice.finish_reason == "stop", choice
        jsonschema.validate(json.loads(choice.message.content), PERSON)


def test_json_object_response(client):
    r = client.chat.completions.create(model="smollm2", messages=MESSAGES, temperature=0, max_tokens=60,
                                       response_format={"type": "json_object"})
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:                                      # cut by max_tokens: a prefix of an object
        assert r.choices[0].message.content.lstrip().startswith("{")


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}


def test_forced_tool_call_is_parsed_into_tool_calls(client):
    messages = [{"role": "user", "content": "What is the weather like in Paris?"}]
    forced = {"type": "function", "function": {"name": "get_weather"}}
    r = client.chat.completions.create(model="smollm2", messages=messages, tools=[WEATHER], tool_choice=forced,
                                       temperature=0, max_tokens=60)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, WEATHER["function"]["parameters"])
    # streamed: one tool_calls delta at the end
    stream = client.chat.completions.create(model="smollm2", messages=messages, tools=[WEATHER],
                                            tool_choice=forced, temperature=0, max_tokens=60, stream=True)
    chunks = [c for c in stream if c.choices]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    (delta_call,) = chunks[-1].choices[0].delta.tool_calls
    assert delta_call.function.name == "get_weather"
    assert json.loads(delta_call.function.arguments) == arguments
    # a conversation that continues after the call: the tool's answer goes back in
    follow = client.chat.completions.create(
        model="smollm2", temperature=0, max_tokens=12, tools=[WEATHER],
        messages=messages + [choice.message.model_dump(exclude_none=True),
                             {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'}])
    assert follow.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_load_32_streaming_clients_x_8_requests(smollm2_server, smollm2_llm):
    """Every request completes, greedy outputs equal offline generate, and /metrics adds up."""
    prompts = [f"Count from {i} to {i + 5}:" for i in range(8)] + [f"A word that rhymes with {w} is"
                                                                  for w in ("cat", "tree", "moon", "light")]
    want = {p: c.text for p, c in zip(prompts, smollm2_llm.generate(prompts, temperature=0, max_tokens=4))}

    def counter(text, name, labels=""):
        m = re.search(rf"^{name}{re.escape(labels)} ([0-9.e+]+)$", text, re.M)
        return float(m.group(1)) if m else 0.0

    before = httpx.get(f"{smollm2_server}/metrics").text
    client = openai.AsyncOpenAI(base_url=f"{smollm2_server}/v1", api_key="unused", max_retries=0, timeout=120)

    async def one_client(k):
        results = []
        for j in range(8):
            prompt = prompts[(k + j) % len(prompts)]
            stream = await client.completions.create(model="smollm2", prompt=prompt, temperature=0, max_tokens=4,
                                                     stream=True, stream_options={"include_usage": True})
            text, used = "", None
            async for chunk in stream:
                if chunk.choices:
                    text += chunk.choices[0].text
                if chunk.usage is not None:
                    used = chunk.usage.completion_tokens
            results.append((prompt, text, used))
        return results

    async def main():
        return await asyncio.wait_for(asyncio.gather(*(one_client(k) for k in range(32))), 300)

    results = [r for group in asyncio.run(main()) for r in group]
    assert len(results) == 256
    for prompt, text, _ in results:
        assert text == want[prompt], prompt
    after = httpx.get(f"{smollm2_server}/metrics").text
    label = '{endpoint="completion",status="200"}'
    assert counter(after, "lmengine_requests_total", label) - counter(before, "lmengine_requests_total", label) == 256
    generated = counter(after, "lmengine_generation_tokens_total") - counter(before, "lmengine_generation_tokens_total")
    assert generated == sum(u for _, _, u in results)
    assert counter(after, "lmengine_requests_in_progress") == 0
    assert counter(after, "lmengine_time_to_first_token_seconds_count") - \
        counter(before, "lmengine_time_to_first_token_seconds_count") == 256
    assert httpx.get(f"{smollm2_server}/health").status_code == 200
