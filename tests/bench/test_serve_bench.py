"""The pure parts of `lmengine bench --serve` (bench/serve_bench.py): statistics, SSE parsing, the
server command lines, and its streaming client against a real uvicorn server over the fake model.
No timing is asserted, and llama_cpp.server is never started (CI does not install it)."""
from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
import threading
import time

import numpy as np
import pytest

from lmengine.bench import serve_bench as sb

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "engine"))


def test_percentile_matches_hand_computed_values():
    # linear interpolation between closest ranks: rank q/100 * (n-1)
    assert sb.percentile([4, 1, 3, 2], 50) == 2.5
    assert sb.percentile([10.0], 99) == 10.0
    assert sb.percentile(range(101), 99) == 99.0
    assert sb.percentile([0, 100], 99) == pytest.approx(99.0)
    assert sb.percentile([], 50) is None


def test_stream_record_and_summarize():
    a = sb.StreamRecord(t_sent=0.0, token_times=[0.5, 0.6, 0.8, 1.1])         # gaps .1 .2 .3
    b = sb.StreamRecord(t_sent=1.0, token_times=[1.2, 1.6], n_tokens=5)        # gap .4; usage says 5
    bad = sb.StreamRecord(t_sent=0.0, error="HTTP 500")
    assert a.ttft == 0.5 and a.gaps == pytest.approx([0.1, 0.2, 0.3]) and a.tokens == 4
    assert a.decode_tok_s() == pytest.approx(3 / 0.6)
    assert b.tokens == 5 and sb.StreamRecord(0.0, [1.0]).decode_tok_s() is None
    out = sb.summarize([a, b, bad], wall_s=2.0)
    assert out["requests"] == 3 and out["errors"] == 1 and out["output_tokens"] == 9
    assert out["tok_s"] == 4.5
    assert out["ttft_p50_ms"] == pytest.approx(350.0)                # TTFTs .5 and .2
    assert out["ttft_p99_ms"] == pytest.approx(200 + 0.99 * 300)
    assert out["itl_p50_ms"] == pytest.approx(250.0)                 # gaps .1 .2 .3 .4
    assert out["itl_max_ms"] == pytest.approx(400.0)
    empty = sb.summarize([bad], wall_s=1.0)
    assert empty["output_tokens"] == 0 and empty["ttft_p50_ms"] is None and empty["itl_p99_ms"] is None
    assert sb.ratio(3.0, 1.5) == 2.0 and sb.ratio(None, 1) is None and sb.ratio(1, 0) is None


def test_sse_parsing():
    assert sb.parse_sse_line('data: {"choices": [{"text": "hi"}]}') == {"choices": [{"text": "hi"}]}
    for line in ("data: [DONE]", "", ": ping", "event: message", "data:"):
        assert sb.parse_sse_line(line) is None
    assert sb.chunk_text({"choices": [{"text": "ab", "index": 0}]}) == "ab"
    assert sb.chunk_text({"choices": [{"delta": {"content": "c"}}]}) == "c"
    assert sb.chunk_text({"choices": [], "usage": {"completion_tokens": 3}}) == ""
    assert sb.chunk_text({"choices": [{"text": "", "finish_reason": "length"}]}) == ""


def test_lmengine_command_parses_with_the_serve_verb():
    from lmengine import cli_serve
    cmd = sb.lmengine_command("my.gguf", 8123, 2, 16, 2048, prefill_chunk=128, python="py", prefill_pace=0.5)
    assert cmd[:4] == ["py", "-m", "lmengine", "serve"]
    parser = argparse.ArgumentParser()
    cli_serve.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(cmd[3:])
    assert (args.host, args.port, args.threads, args.max_batch, args.n_ctx, args.model, args.prefill_chunk,
            args.prefill_pace) == ("127.0.0.1", 8123, 2, 16, 2048, "my.gguf", 128, 0.5)
    assert "--prefill-chunk" not in sb.lmengine_command(None, 1, 1, 1, 64) and \
        "--prefill-pace" not in sb.lmengine_command(None, 1, 1, 1, 64) and \
        "--model" not in sb.lmengine_command(None, 1, 1, 1, 64)


def test_llama_cpp_command():
    cmd = sb.llama_cpp_command("/m/x.gguf", 8124, 2, 4096, python="py")
    assert cmd[:3] == ["py", "-m", "llama_cpp.server"]
    flags = dict(zip(cmd[3::2], cmd[4::2]))
    assert flags == {"--model": "/m/x.gguf", "--host": "127.0.0.1", "--port": "8124", "--n_threads": "2",
                     "--n_threads_batch": "2", "--n_ctx": "4096", "--model_alias": "bench",
                     "--interrupt_requests": "False", "--verbose": "False"}


def test_llama_cpp_command_parses_with_its_own_parser():
    """Where llama-cpp-python's server is installed, its own argparse/pydantic settings read our
    command line as meant (independent of our flag spelling)."""
    pytest.importorskip("llama_cpp.server.app", exc_type=ImportError)
    from llama_cpp.server.cli import add_args_from_model, parse_model_from_args
    from llama_cpp.server.settings import ModelSettings, ServerSettings, Settings
    parser = argparse.ArgumentParser()
    add_args_from_model(parser, Settings)
    args = parser.parse_args(sb.llama_cpp_command("/m/x.gguf", 8124, 2, 4096)[3:])
    server = parse_model_from_args(ServerSettings, args)
    model = parse_model_from_args(ModelSettings, args)
    assert (server.host, server.port, server.interrupt_requests) == ("127.0.0.1", 8124, False)
    assert (model.model, model.n_threads, model.n_threads_batch, model.n_ctx, model.verbose) == \
        ("/m/x.gguf", 2, 2, 4096, False)


def test_completion_body_and_long_prompt():
    body = sb.completion_body("p", 64)
    assert body["min_tokens"] == body["max_tokens"] == 64 and body["temperature"] == 0.0
    assert "min_tokens" not in sb.completion_body("p", 64, exact=False, response_format={"type": "json_object"})

    class Bytes:                                  # a stand-in tokenizer: one id per UTF-8 byte
        def encode(self, text):
            return list(text.encode("utf-8"))
    ids = sb.long_prompt_ids(Bytes(), 1500)
    assert len(ids) == 1500 and bytes(ids) == (sb.LONG_TEXT * 20).encode("utf-8")[:1500]


def test_markdown_and_bench_args(monkeypatch):
    row = {"tok_s": 100.0, "ttft_p50_ms": 10.0, "ttft_p99_ms": 20.0, "itl_p50_ms": 5.0, "itl_p99_ms": 9.0,
           "errors": 0}
    results = {"settings": {"model": "/x/m.gguf", "threads": 2, "max_tokens": 8, "rounds": 1, "max_batch": 8,
                            "interfere_streams": 8, "long_prompt_tokens": 1500, "prefill_chunk": None},
               "levels": {"8": {"lmengine": row, "llama_cpp": dict(row, tok_s=25.0, ttft_p50_ms=40.0)}},
               "machine": {"processor": "cpu", "cpus": 2, "load_average_start": [1.0, 1.0, 1.0]},
               "date_utc": "today"}
    text = sb.markdown(results)
    assert "| 8 | ratio | x4 | x0.25 |" in text and "m.gguf" in text
    for bad in (["--rounds", "0"], ["--clients", "0"], ["--n-ctx", "1000"]):    # (1500-token prompt)
        with pytest.raises(SystemExit):
            sb.main(bad)
    seen = []
    monkeypatch.setattr(sb, "main", lambda argv: seen.append(argv) or 0)
    ns = argparse.Namespace(clients=[1, 4], gen_tokens=32, model=["a.gguf"], threads=[1, 2], json="o.json")
    assert sb.run_from_bench_args(ns) == 0
    assert seen[0] == ["--clients", "1", "4", "--max-tokens", "32", "--model", "a.gguf", "--threads", "2",
                       "--json", "o.json"]


def test_client_against_a_real_server_over_the_fake_model():
    """run_level's client (httpx streaming, SSE parsing, usage) against `create_app` under uvicorn
    on 127.0.0.1: every request completes with exactly max_tokens tokens (min_tokens)."""
    pytest.importorskip("fastapi")
    uvicorn = pytest.importorskip("uvicorn")
    from fake_backend import make_fake_llm

    from lmengine.server import create_app
    llm = make_fake_llm(n_slots=4, n_ctx=128)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(llm, model_name="bench"), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the test server did not start"
            time.sleep(0.02)
        # prompts in the fake tokenizer's characters, distinct per request
        out = asyncio.run(sb.run_level(f"http://127.0.0.1:{port}", 3, 2, 6, timeout=60,
                                       prompt_for=lambda c, k: "ab" * (c + 1) + " x" * (k + 1)))
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
    assert out["errors"] == 0, out.get("first_error")
    assert out["requests"] == 6 and out["output_tokens"] == 6 * 6
    assert out["ttft_p50_ms"] is not None and out["itl_p99_ms"] is not None
    np.testing.assert_equal(out["clients"], 3)
