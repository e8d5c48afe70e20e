"""The HTTP API on the fake model (fast; the model's math does not matter here), with a raw
httpx client against a real uvicorn server: response shapes, greedy outputs equal to the
offline API, streaming, error objects and statuses for every fault, and the server staying
healthy after each."""
import json
import socket
import time

import httpx
import pytest

from conftest import serve
from fake_backend import expected_text

GREEDY = {"temperature": 0, "ignore_eos": True}


def events(response) -> list:
    """The data: payloads of an SSE response, JSON-decoded (the final [DONE] kept as a str)."""
    out = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            payload = line[6:]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def assert_healthy(url, fake_llm):
    r = httpx.get(f"{url}/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "hello", "max_tokens": 5, **GREEDY})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == expected_text(fake_llm, "hello", 5)
    for _ in range(200):                     # every cache slot given back
        if not any(fake_llm.slots.busy):
            break
        time.sleep(0.01)
    assert not any(fake_llm.slots.busy)


def test_completion_matches_offline_generate(fake_server, fake_llm):
    r = httpx.post(f"{fake_server}/v1/completions", json={"model": "fake", "prompt": "hello", "max_tokens": 12,
                                                          **GREEDY})
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == "fake" and body["id"].startswith("cmpl-")
    assert body["choices"][0]["text"] == expected_text(fake_llm, "hello", 12)
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 12, "total_tokens": 17}


def test_chat_and_stop_and_n(fake_server, fake_llm):
    full = expected_text(fake_llm, "hello ", 20)
    stop = full[6:8]
    r = httpx.post(f"{fake_server}/v1/chat/completions",
                   json={"messages": [{"role": "user", "content": "hello"}], "max_tokens": 20, "stop": [stop],
                         "n": 2, **GREEDY})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion"
    want = full[:full.index(stop)]
    assert [c["message"] for c in body["choices"]] == [{"role": "assistant", "content": want}] * 2
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert {c["finish_reason"] for c in body["choices"]} == {"stop"}


def test_streaming_completion_and_usage(fake_server, fake_llm):
    with httpx.stream("POST", f"{fake_server}/v1/completions",
                      json={"prompt": "hello", "max_tokens": 12, "stream": True,
                            "stream_options": {"include_usage": True}, **GREEDY}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        got = events(r)
    assert got[-1] == "[DONE]"
    chunks = got[:-1]
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == expected_text(fake_llm, "hello", 12)
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 12
    assert all(c["usage"] is None for c in chunks[:-1])


def test_streaming_chat_deltas(fake_server, fake_llm):
    with httpx.stream("POST", f"{fake_server}/v1/chat/completions",
                      json={"messages": [{"role": "user", "content": "hello"}], "max_tokens": 10,
                            "stream": True, "n": 2, **GREEDY}) as r:
        got = events(r)
    assert got[-1] == "[DONE]"
    for i in (0, 1):
        mine = [c["choices"][0] for c in got[:-1] if c["choices"][0]["index"] == i]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert "".join(c["delta"].get("content", "") for c in mine) == expected_text(fake_llm, "hello ", 10)
        assert mine[-1]["finish_reason"] == "length"


def test_logprobs_shapes(fake_server, fake_llm):
    offline = fake_llm.generate("hello", max_tokens=4, logprobs=2, **GREEDY)
    r = httpx.post(f"{fake_server}/v1/completions", json={"prompt": "hello", "max_tokens": 4, "logprobs": 2, **GREEDY})
    lp = r.json()["choices"][0]["logprobs"]
    assert lp["token_logprobs"] == pytest.approx([t.logprob for t in offline.logprobs], abs=1e-6)
    assert lp["tokens"] == [fake_llm.tokenizer.decode([t]) for t in offline.token_ids]
    assert lp["text_offset"] == [0, 1, 2, 3] and all(len(t) == 2 for t in lp["top_logprobs"])
    r = httpx.post(f"{fake_server}/v1/chat/completions",
                   json={"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4, "logprobs": True,
                         "top_logprobs": 3, **GREEDY})
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert len(content) == 4
    for entry in content:
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}
        assert len(entry["top_logprobs"]) == 3
        assert entry["top_logprobs"][0]["logprob"] == pytest.approx(entry["logprob"])   # greedy: the top one
        assert bytes(entry["bytes"]).decode() == entry["token"]


def test_models_health_metrics(fake_server):
    assert httpx.get(f"{fake_server}/v1/models").json()["data"][0]["id"] == "fake"
    assert httpx.get(f"{fake_server}/health").json() == {"status": "ok"}
    text = httpx.get(f"{fake_server}/metrics").text
    for name in ("lmengine_requests_total", "lmengine_queue_depth", "lmengine_batch_size",
                 "lmengine_time_to_first_token_seconds_bucket", "lmengine_inter_token_latency_seconds_bucket",
                 "lmengine_scheduler_steps_total", "lmengine_scheduler_preemptions_total"):
        assert name in text


@pytest.mark.parametrize("body, status, param", [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    (json.dumps({"prompt": "hi", "max_tokens": 4, "frobnicate": 1}).encode(), 400, "frobnicate"),
    (json.dumps({"prompt": "hi", "max_tokens": -3}).encode(), 400, "max_tokens"),
    (json.dumps({"prompt": "hi", "max_tokens": 0}).encode(), 400, "max_tokens"),
    (json.dumps({"prompt": "hi", "temperature": "hot"}).encode(), 400, "temperature"),
    (json.dumps({"prompt": "hi", "top_p": 1.5}).encode(), 400, "top_p"),
    (json.dumps({"prompt": "hi", "n": 0}).encode(), 400, "n"),
    (json.dumps({"prompt": "hi", "logit_bias": {"x": 1}}).encode(), 400, "logit_bias"),
    (json.dumps({"prompt": "hi", "stop_token_ids": [-1]}).encode(), 400, "stop_token_ids"),
    (json.dumps({"prompt": [99999]}).encode(), 400, "prompt"),
    (json.dumps({"prompt": "hi " * 300}).encode(), 400, "messages"),
    (json.dumps({"prompt": ""}).encode(), 400, "prompt"),
    (json.dumps({"max_tokens": 3}).encode(), 400, "prompt"),
    (json.dumps({"prompt": "hi", "model": "gpt-4"}).encode(), 404, "model"),
])
def test_faults_get_openai_errors(fake_server, fake_llm, body, status, param):
    r = httpx.post(f"{fake_server}/v1/completions", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param, error
    assert_healthy(fake_server, fake_llm)


def test_unknown_route_is_an_openai_404(fake_server):
    r = httpx.get(f"{fake_server}/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()


def test_api_key(fake_llm):
    with serve(fake_llm, api_key="s3cret") as url:
        body = {"prompt": "hello", "max_tokens": 3, **GREEDY}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"},
                        {"Authorization": "Bearer s3cret-and-more"}):
            r = httpx.post(f"{url}/v1/completions", json=body, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(f"{url}/metrics").status_code == 401
        assert httpx.get(f"{url}/health").status_code == 200          # health needs no key
        r = httpx.post(f"{url}/v1/completions", json=body, headers={"Authorization": "Bearer s3cret"})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected_text(fake_llm, "hello", 3)


def test_oversize_bodies(fake_llm):
    with serve(fake_llm, max_body_bytes=1000) as url:
        big = json.dumps({"prompt": "a" * 2000}).encode()
        r = httpx.post(f"{url}/v1/completions", content=big, headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["message"]

        def chunked():                      # no Content-Length: the limit holds while reading
            for i in range(0, len(big), 100):
                yield big[i:i + 100]

        r = httpx.post(f"{url}/v1/completions", content=chunked(), headers={"Content-Type": "application/json"})
        assert r.status_code == 413
        assert_healthy(url, fake_llm)


def slow_down(llm, seconds=0.02):
    """Make every decode step of the fake model take `seconds` (the fake model is otherwise so
    fast that a request ends before the test can act during it)."""
    fast = llm.backend.forward_batch

    def slow(*args):
        time.sleep(seconds)
        return fast(*args)

    llm.backend.forward_batch = slow


def test_too_many_requests_in_flight_get_429(fake_llm):
    slow_down(fake_llm)
    with serve(fake_llm, max_pending=1) as url:
        long = {"prompt": "hello", "max_tokens": 150, "stream": True, **GREEDY}
        with httpx.stream("POST", f"{url}/v1/completions", json=long) as first:
            lines = first.iter_lines()       # kept: dropping the iterator closes the connection
            next(lines)
            r = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 2})
            assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
        assert_healthy(url, fake_llm)


def test_max_tokens_limit(fake_llm):
    with serve(fake_llm, max_tokens_limit=8) as url:
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 9})
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"


def test_cors_is_off_unless_asked(fake_llm):
    preflight = {"Origin": "http://example.com", "Access-Control-Request-Method": "POST"}
    with serve(fake_llm) as url:
        r = httpx.options(f"{url}/v1/completions", headers=preflight)
        assert "access-control-allow-origin" not in r.headers
    with serve(fake_llm, cors_origins=["http://example.com"]) as url:
        r = httpx.options(f"{url}/v1/completions", headers=preflight)
        assert r.headers.get("access-control-allow-origin") == "http://example.com"


def _raw_request(url: str, body: dict) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    data = json.dumps(body).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


@pytest.mark.parametrize("stream", [True, False])
def test_disconnect_cancels_the_request(fake_llm, stream):
    """A client that goes away mid-request: its request ends at the next step (the slot comes
    back long before its 150 tokens could be generated), and the server goes on."""
    slow_down(fake_llm, 0.02)                # 150 tokens would take 3 s
    with serve(fake_llm) as url:
        sock = _raw_request(url, {"prompt": "hello", "max_tokens": 150, "stream": stream, **GREEDY})
        for _ in range(100):
            if any(fake_llm.slots.busy):
                break
            time.sleep(0.01)
        if stream:
            assert sock.recv(100)            # headers and a first event came
        t0 = time.monotonic()
        sock.close()
        for _ in range(200):
            if not any(fake_llm.slots.busy):
                break
            time.sleep(0.01)
        assert not any(fake_llm.slots.busy), "the request was not cancelled"
        assert time.monotonic() - t0 < 1.5
        n_generated = len(fake_llm.scheduler.stats) and sum(
            1 for c in fake_llm.backend.calls if c[0] == "forward_batch")
        assert n_generated < 149
        assert_healthy(url, fake_llm)
        metrics = httpx.get(f"{url}/metrics").text
        assert "lmengine_requests_in_progress 0.0" in metrics


def test_embeddings_route(fake_llm):
    """The route's mapping of the embed path (engine/embed.py over a stand-in `hidden` on the fake
    backend, which has no encoder; the model math of LLM.embed is tested in
    tests/engine/test_embed.py): OpenAI's list shape, base64 as little-endian float32, usage
    counted from the tokens the embed path computed (each text encoded once), and a model that
    cannot embed gets a 400."""
    import base64

    import numpy as np

    with serve(fake_llm) as url:
        r = httpx.post(f"{url}/v1/embeddings", json={"input": "hello"})
        assert r.status_code == 400 and "cannot embed" in r.json()["error"]["message"]

        def hidden(tokens, lengths):             # [B, T] ids -> [B, T, 4]: row t = (id, id+1, id+2, id+3)
            return (tokens[:, :, None] + np.arange(4)).astype(np.float32)

        backend = fake_llm.backend
        backend.hidden, backend.hidden_size, backend.max_embed_tokens = hidden, 4, 64
        backend.default_pooling = "mean"
        encodes = []
        encode = fake_llm.tokenizer.encode
        fake_llm.tokenizer.encode = lambda text, *a, **k: encodes.append(text) or encode(text, *a, **k)

        def reference(text):                     # NumPy: mean over the text's tokens, L2-normalized
            v = (np.array(encode(text), dtype=np.float64)[:, None] + np.arange(4)).mean(axis=0)
            return v / np.linalg.norm(v)

        try:
            r = httpx.post(f"{url}/v1/embeddings", json={"input": ["hi", "hello"]})
        finally:
            fake_llm.tokenizer.encode = encode
        assert r.status_code == 200, r.text
        body = r.json()
        # float32 arithmetic on small integers: agrees with float64 to ~1e-7 relative
        np.testing.assert_allclose([d["embedding"] for d in body["data"]],
                                   [reference("hi"), reference("hello")], rtol=1e-6)
        n_tokens = len(encode("hi")) + len(encode("hello"))
        assert [d["index"] for d in body["data"]] == [0, 1] and body["usage"]["prompt_tokens"] == n_tokens
        assert sorted(encodes) == ["hello", "hi"]            # each text encoded once, not twice
        r = httpx.post(f"{url}/v1/embeddings", json={"input": "hello", "encoding_format": "base64", "dimensions": 2})
        raw = base64.b64decode(r.json()["data"][0]["embedding"])
        np.testing.assert_allclose(np.frombuffer(raw, "<f4"), reference("hello")[:2], rtol=1e-6)
        for bad, param in [({"input": []}, "input"), ({"input": "x", "dimensions": 9}, "dimensions"),
                           ({"input": "x", "encoding_format": "int8"}, "encoding_format"),
                           ({"input": [1, 2]}, "input")]:
            r = httpx.post(f"{url}/v1/embeddings", json=bad)
            assert r.status_code == 400 and r.json()["error"]["param"] == param, (bad, r.text)
