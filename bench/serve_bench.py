"""`lmengine bench --serve`: our OpenAI-compatible server against llama-cpp-python's, over HTTP.

    python -m lmengine.bench.serve_bench                       # bundled SmolLM2, 1/8/32 clients
    python -m lmengine.bench.serve_bench --clients 1 8 --rounds 1 --max-tokens 64 --json out.json

What it measures (issue #16's goals), each server started as a subprocess on 127.0.0.1 and a
free port, one after the other (never both at once: they would share the cores):

  1. levels: for each count of concurrent streaming clients (1, 8, 32), every client sends
     `rounds` streaming /v1/completions requests one after the other (greedy, `max_tokens` output
     tokens, `min_tokens` = `max_tokens` so that both engines produce the same lengths: EOS is
     suppressed until then). Per level: aggregate output tok/s (all tokens / wall time), p50/p99
     time to first token (request sent -> first text chunk) and p50/p99 inter-token latency
     (gaps between successive text chunks of a stream, pooled over the streams).
     Both servers: `lmengine serve` and `python -m llama_cpp.server` (same GGUF, same threads;
     `--interrupt_requests False`, else its default cancels a stream whenever another request
     arrives).
  2. interference (ours only): 8 streams decode; p99 inter-token latency of those streams
     without, then with a `long_prompt_tokens` (1,500) token prompt that arrives once every
     stream has `interfere_after` tokens; the ratio (goal: under 2x). The scheduler's chunked
     prefill budget (`--prefill-chunk`) is what keeps it low.
  3. structured output (ours only): decode tok/s of one JSON-schema-constrained request against
     the same prompt unconstrained, one request at a time (goal: 90% or more).

Prints a markdown table, writes JSON (--json), progress on stderr. The pure parts (percentiles,
aggregation, SSE parsing, the server command lines) are tested in tests/bench/test_serve_bench.py.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

DEFAULT_CLIENTS = (1, 8, 32)
PROMPT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
          "combined movable metal type with an oil-based ink and a wooden press. Explain how")
JSON_PROMPT = "Write a short story about a lighthouse keeper, as a JSON object with a title and the story text:"
STORY_SCHEMA = {"type": "object", "properties": {"title": {"type": "string"}, "story": {"type": "string"}},
                "required": ["title", "story"], "additionalProperties": False}
LONG_TEXT = ("In the early morning the harbour was quiet; fishermen checked their nets, gulls circled the "
             "masts, and the smell of salt and tar drifted over the cobbled quay where carts waited. ")


def log(message: str) -> None:
    """Progress on stderr."""
    print(f"[serve-bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- statistics (pure) -----------------------------------------------------------------------------
def percentile(values, q: float) -> float | None:
    """The q-th percentile (0..100) of values, linearly interpolated (NumPy's default); None when
    there are no values."""
    values = np.asarray(list(values), dtype=np.float64)
    if values.size == 0:
        return None
    return float(np.percentile(values, q))


@dataclass
class StreamRecord:
    """One streaming request as the client saw it (time.perf_counter() seconds)."""
    t_sent: float
    token_times: list[float] = field(default_factory=list)   # arrival of each chunk with text
    n_tokens: int | None = None                               # usage.completion_tokens, when sent
    error: str | None = None

    @property
    def ttft(self) -> float | None:
        """Request sent -> first text chunk."""
        return self.token_times[0] - self.t_sent if self.token_times else None

    @property
    def gaps(self) -> list[float]:
        """Inter-token latencies: gaps between successive text chunks."""
        return [b - a for a, b in zip(self.token_times, self.token_times[1:])]

    @property
    def tokens(self) -> int:
        """Output tokens: the server's count when it sent one, else the text chunks."""
        return self.n_tokens if self.n_tokens is not None else len(self.token_times)

    def decode_tok_s(self) -> float | None:
        """Decode rate after the first token: (chunks - 1) / (last - first)."""
        if len(self.token_times) < 2:
            return None
        return (len(self.token_times) - 1) / (self.token_times[-1] - self.token_times[0])


def summarize(records: list[StreamRecord], wall_s: float) -> dict:
    """Aggregate figures of one level: output tok/s over the wall time, p50/p99 TTFT and
    inter-token latency in milliseconds, request and error counts."""
    ok = [r for r in records if r.error is None]
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    gaps = [g for r in ok for g in r.gaps]
    tokens = sum(r.tokens for r in ok)

    def ms(v):
        return None if v is None else round(v * 1000, 2)
    return {"requests": len(records), "errors": len(records) - len(ok), "output_tokens": tokens,
            "wall_s": round(wall_s, 3), "tok_s": round(tokens / wall_s, 2) if wall_s > 0 else None,
            "ttft_p50_ms": ms(percentile(ttfts, 50)), "ttft_p99_ms": ms(percentile(ttfts, 99)),
            "itl_p50_ms": ms(percentile(gaps, 50)), "itl_p99_ms": ms(percentile(gaps, 99)),
            "itl_max_ms": ms(max(gaps) if gaps else None)}


def ratio(a, b) -> float | None:
    """a / b, None when either is missing or b is zero."""
    if a is None or b is None or b == 0:
        return None
    return round(a / b, 2)


def parse_sse_line(line: str) -> dict | None:
    """A server-sent-events line -> the JSON of its `data:` field; None for other lines, empty
    lines and `data: [DONE]`."""
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    if not data or data == "[DONE]":
        return None
    return json.loads(data)


def chunk_text(chunk: dict) -> str:
    """The text a completion (or chat) stream chunk carries ("" for none)."""
    text = ""
    for choice in chunk.get("choices") or []:
        text += choice.get("text") or (choice.get("delta") or {}).get("content") or ""
    return text


# -- the servers (command lines are pure) ----------------------------------------------------------
def lmengine_command(model: str | None, port: int, threads: int, max_batch: int, n_ctx: int,
                     prefill_chunk: int | None = None, python: str = sys.executable,
                     prefill_pace: float | None = None) -> list[str]:
    """`lmengine serve` on 127.0.0.1:port."""
    cmd = [python, "-m", "lmengine", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--threads", str(threads), "--max-batch", str(max_batch), "--n-ctx", str(n_ctx),
           "--model-name", "bench"]
    if model:
        cmd += ["--model", model]
    if prefill_chunk is not None:
        cmd += ["--prefill-chunk", str(prefill_chunk)]
    if prefill_pace is not None:
        cmd += ["--prefill-pace", str(prefill_pace)]
    return cmd


def llama_cpp_command(gguf_path: str, port: int, threads: int, n_ctx: int,
                      python: str = sys.executable) -> list[str]:
    """`python -m llama_cpp.server` on 127.0.0.1:port with the same file and threads. Requests
    do not interrupt each other (its default, interrupt_requests=True, ends a running stream as
    soon as another request arrives); it serves one request at a time."""
    return [python, "-m", "llama_cpp.server", "--model", gguf_path, "--host", "127.0.0.1",
            "--port", str(port), "--n_threads", str(threads), "--n_threads_batch", str(threads),
            "--n_ctx", str(n_ctx), "--model_alias", "bench", "--interrupt_requests", "False",
            "--verbose", "False"]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(name: str, cmd: list[str], port: int, ready_path: str, start_timeout: float) -> Iterator[str]:
    """Start cmd (a server), wait until GET ready_path answers 200, yield its base URL; stop it
    (SIGTERM, then SIGKILL after 20 s) on exit. Its output goes to a temporary log, shown when it
    fails to start."""
    import httpx
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile(mode="w+") as out:
        log(f"starting {name}: {' '.join(cmd)}")
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=tempfile.gettempdir())
        try:
            t0 = time.perf_counter()
            while True:
                if proc.poll() is not None or time.perf_counter() - t0 > start_timeout:
                    out.seek(0)
                    tail = out.read()[-3000:]
                    raise RuntimeError(f"{name} did not start (exit status {proc.poll()}, "
                                       f"{time.perf_counter() - t0:.0f} s):\n{tail}")
                try:
                    if httpx.get(url + ready_path, timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)
            log(f"{name} ready in {time.perf_counter() - t0:.1f} s")
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# -- clients ---------------------------------------------------------------------------------------
async def stream_request(client, url: str, body: dict, record: StreamRecord) -> StreamRecord:
    """POST a streaming /v1/completions body; fill record's token times and usage."""
    record.t_sent = time.perf_counter()
    try:
        async with client.stream("POST", url + "/v1/completions", json=dict(body, stream=True)) as r:
            if r.status_code != 200:
                record.error = f"HTTP {r.status_code}: {(await r.aread())[:300]!r}"
                return record
            async for line in r.aiter_lines():
                chunk = parse_sse_line(line)
                if chunk is None:
                    continue
                if chunk_text(chunk):
                    record.token_times.append(time.perf_counter())
                usage = chunk.get("usage")
                if usage and usage.get("completion_tokens") is not None:
                    record.n_tokens = int(usage["completion_tokens"])
    except Exception as e:                    # a failed request is counted, not fatal
        record.error = f"{type(e).__name__}: {e}"
    return record


def completion_body(prompt, max_tokens: int, exact: bool = True, **extra) -> dict:
    """A greedy completion body; exact: min_tokens = max_tokens (EOS suppressed until then), so
    every engine produces max_tokens tokens."""
    body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "stream_options": {"include_usage": True}}
    if exact:
        body["min_tokens"] = max_tokens
    body.update(extra)
    return body


def request_prompt(client: int, round_: int) -> str:
    """A distinct prompt per request, so that no engine answers from a cached prefix alone."""
    return f"Request {client}-{round_}. {PROMPT}"


async def run_level(url: str, n_clients: int, rounds: int, max_tokens: int, timeout: float,
                    prompt_for: Callable[[int, int], str] = request_prompt) -> dict:
    """n_clients concurrent clients, each sending `rounds` streaming requests in turn (prompts
    prompt_for(client, round))."""
    import httpx
    limits = httpx.Limits(max_connections=n_clients + 4, max_keepalive_connections=n_clients + 4)
    records: list[StreamRecord] = []
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        async def one_client(c: int):
            for k in range(rounds):
                records.append(await stream_request(client, url, completion_body(prompt_for(c, k), max_tokens),
                                                    StreamRecord(0.0)))
        t0 = time.perf_counter()
        await asyncio.gather(*(one_client(c) for c in range(n_clients)))
        wall = time.perf_counter() - t0
    out = summarize(records, wall)
    out["clients"], out["rounds"], out["max_tokens"] = n_clients, rounds, max_tokens
    for r in records:
        if r.error is not None:
            out.setdefault("first_error", r.error)
            break
    return out


def long_prompt_ids(tokenizer, n_tokens: int) -> list[int]:
    """Exactly n_tokens ids of English text (LONG_TEXT repeated and cut)."""
    ids = tokenizer.encode(LONG_TEXT)
    reps = n_tokens // max(len(ids), 1) + 2
    ids = tokenizer.encode(LONG_TEXT * reps)
    return ids[:n_tokens]


async def run_interference(url: str, n_streams: int, max_tokens: int, long_ids: list[int] | None,
                           after_tokens: int, timeout: float) -> dict:
    """n_streams concurrent streams of max_tokens; with long_ids, that prompt (max_tokens=1) is
    sent once every stream has after_tokens tokens. The streams' figures (the long request's own
    TTFT apart)."""
    import httpx
    async with httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_connections=n_streams + 4)) as client:
        records = [StreamRecord(0.0) for _ in range(n_streams)]
        t0 = time.perf_counter()
        tasks = [asyncio.create_task(stream_request(
            client, url, completion_body(f"Stream {i}. {PROMPT}", max_tokens), records[i])) for i in range(n_streams)]
        long_record = None
        if long_ids is not None:
            deadline = time.perf_counter() + timeout
            while (any(len(r.token_times) < after_tokens and r.error is None for r in records)
                   and not all(t.done() for t in tasks) and time.perf_counter() < deadline):
                await asyncio.sleep(0.005)
            long_record = await stream_request(client, url, completion_body(long_ids, 1, exact=False),
                                               StreamRecord(0.0))
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - t0
    out = summarize(records, wall)
    if long_record is not None:
        out["long_prompt_tokens"] = len(long_ids)
        out["long_prompt_ttft_ms"] = None if long_record.ttft is None else round(long_record.ttft * 1000, 1)
        out["long_prompt_error"] = long_record.error
    return out


async def run_structured(url: str, max_tokens: int, repeats: int, timeout: float) -> dict:
    """Decode tok/s (after the first token) of a JSON-schema-constrained request and of the same
    prompt unconstrained, one request at a time, alternating; medians over `repeats`."""
    import httpx
    fmt = {"type": "json_schema", "json_schema": {"name": "story", "schema": STORY_SCHEMA, "strict": True}}
    rates: dict[str, list[float]] = {"unconstrained": [], "json_schema": []}
    tokens: dict[str, list[int]] = {"unconstrained": [], "json_schema": []}
    errors = []
    async with httpx.AsyncClient(timeout=timeout) as client:
        for _ in range(repeats):
            for name, body in (("unconstrained", completion_body(JSON_PROMPT, max_tokens)),
                               ("json_schema", completion_body(JSON_PROMPT, max_tokens, exact=False,
                                                               response_format=fmt))):
                r = await stream_request(client, url, body, StreamRecord(0.0))
                if r.error is not None:
                    errors.append(r.error)
                elif r.decode_tok_s() is not None:
                    rates[name].append(r.decode_tok_s())
                    tokens[name].append(r.tokens)
    med = {k: (round(float(np.median(v)), 2) if v else None) for k, v in rates.items()}
    return {"unconstrained_decode_tok_s": med["unconstrained"], "json_schema_decode_tok_s": med["json_schema"],
            "ratio": ratio(med["json_schema"], med["unconstrained"]), "tokens": tokens,
            "repeats": repeats, "errors": errors}


async def warm_up(url: str, timeout: float) -> None:
    """Two concurrent short requests (the single and the batched forward run once before timing)."""
    import httpx
    async with httpx.AsyncClient(timeout=timeout) as client:
        await asyncio.gather(*(stream_request(client, url, completion_body(f"Warm {i}. {PROMPT}", 8),
                                              StreamRecord(0.0)) for i in range(2)))


# -- the benchmark ---------------------------------------------------------------------------------
def run_serve_bench(model: str | None = None, clients=DEFAULT_CLIENTS, rounds: int = 2, max_tokens: int = 128,
                    threads: int | None = None, max_batch: int = 32, n_ctx: int = 2048,
                    prefill_chunk: int | None = None, prefill_pace: float | None = None,
                    long_prompt_tokens: int = 1500, interfere_streams: int = 8,
                    interfere_tokens: int = 128, interfere_after: int = 32, structured_repeats: int = 3,
                    peer: bool = True, start_timeout: float = 900.0, request_timeout: float = 300.0) -> dict:
    """Every measurement of the module docstring; returns the results dict (see write_markdown)."""
    from lmengine.converters.gguf_file import GGUFFile
    from lmengine.models.registry import resolve_model
    from lmengine.tokenizer import Tokenizer

    threads = threads or os.cpu_count() or 1
    path = resolve_model(model)
    tokenizer = Tokenizer.from_gguf(GGUFFile(path))
    long_ids = long_prompt_ids(tokenizer, long_prompt_tokens)
    results = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "processor": _cpu_name(),
                           "load_average_start": list(os.getloadavg())},
               "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "settings": {"model": path, "clients": list(clients), "rounds": rounds, "max_tokens": max_tokens,
                            "threads": threads, "max_batch": max_batch, "n_ctx": n_ctx,
                            "prefill_chunk": prefill_chunk, "prefill_pace": prefill_pace,
                            "long_prompt_tokens": len(long_ids),
                            "interfere_streams": interfere_streams, "interfere_tokens": interfere_tokens},
               "levels": {}}

    def levels(engine: str, url: str) -> None:
        asyncio.run(warm_up(url, request_timeout))
        for n in clients:
            log(f"{engine}: {n} client(s) x {rounds} request(s) x {max_tokens} tokens")
            row = asyncio.run(run_level(url, n, rounds, max_tokens, request_timeout))
            results["levels"].setdefault(str(n), {})[engine] = row
            log(f"{engine}: {n} client(s): {row['tok_s']} tok/s, TTFT p50 {row['ttft_p50_ms']} ms, "
                f"ITL p99 {row['itl_p99_ms']} ms, errors {row['errors']}")

    port = free_port()
    with running_server("lmengine serve", lmengine_command(model, port, threads, max_batch, n_ctx, prefill_chunk,
                                                         prefill_pace=prefill_pace),
                        port, "/health", start_timeout) as url:
        levels("lmengine", url)
        log(f"interference: {interfere_streams} streams, without the long prompt")
        base = asyncio.run(run_interference(url, interfere_streams, interfere_tokens, None, interfere_after,
                                            request_timeout))
        log(f"interference: {interfere_streams} streams, a {len(long_ids)}-token prompt after {interfere_after} tokens")
        hit = asyncio.run(run_interference(url, interfere_streams, interfere_tokens, long_ids, interfere_after,
                                           request_timeout))
        results["interference"] = {"without": base, "with": hit,
                                   "itl_p99_ratio": ratio(hit["itl_p99_ms"], base["itl_p99_ms"])}
        log(f"interference: ITL p99 {base['itl_p99_ms']} -> {hit['itl_p99_ms']} ms "
            f"(x{results['interference']['itl_p99_ratio']})")
        log(f"structured output: {structured_repeats} x (unconstrained, json_schema)")
        results["structured"] = asyncio.run(run_structured(url, max_tokens, structured_repeats, request_timeout))
        log(f"structured output: ratio {results['structured']['ratio']}")

    if peer:
        import importlib.util
        if importlib.util.find_spec("llama_cpp") is None:
            log("llama_cpp is not installed: no peer (pip install 'llama-cpp-python[server]')")
            results["peer_skipped"] = "llama_cpp not installed"
        else:
            port = free_port()
            try:
                with running_server("llama_cpp.server", llama_cpp_command(path, port, threads, n_ctx),
                                    port, "/v1/models", start_timeout) as url:
                    levels("llama_cpp", url)
            except RuntimeError as e:
                log(str(e))
                results["peer_skipped"] = str(e)[:500]
    results["machine"]["load_average_end"] = list(os.getloadavg())
    return results


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _fmt(v, suffix: str = "") -> str:
    return "-" if v is None else f"{v:g}{suffix}"


def markdown(results: dict) -> str:
    """The results as markdown tables."""
    s = results["settings"]
    lines = [f"Model {os.path.basename(s['model'])}, {s['threads']} threads, {s['max_tokens']} output tokens "
             f"per request, {s['rounds']} request(s) per client; lmengine --max-batch {s['max_batch']}.", "",
             "| clients | engine | output tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | errors |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for n, engines in results["levels"].items():
        for engine, r in engines.items():
            lines.append(f"| {n} | {engine} | {_fmt(r['tok_s'])} | {_fmt(r['ttft_p50_ms'])} | "
                         f"{_fmt(r['ttft_p99_ms'])} | {_fmt(r['itl_p50_ms'])} | {_fmt(r['itl_p99_ms'])} | "
                         f"{r['errors']} |")
        if {"lmengine", "llama_cpp"} <= engines.keys():
            ours, peer = engines["lmengine"], engines["llama_cpp"]
            lines.append(f"| {n} | ratio | x{_fmt(ratio(ours['tok_s'], peer['tok_s']))} | "
                         f"x{_fmt(ratio(ours['ttft_p50_ms'], peer['ttft_p50_ms']))} | "
                         f"x{_fmt(ratio(ours['ttft_p99_ms'], peer['ttft_p99_ms']))} | "
                         f"x{_fmt(ratio(ours['itl_p50_ms'], peer['itl_p50_ms']))} | "
                         f"x{_fmt(ratio(ours['itl_p99_ms'], peer['itl_p99_ms']))} | |")
    if "interference" in results:
        i = results["interference"]
        lines += ["", f"Interference ({s['interfere_streams']} streams, a {s['long_prompt_tokens']}-token prompt "
                      f"mid-way; prefill chunk {s['prefill_chunk'] or 'server default'}, pace "
                      f"{s.get('prefill_pace') or 'server default'}): ITL p99 "
                      f"{_fmt(i['without']['itl_p99_ms'])} ms -> {_fmt(i['with']['itl_p99_ms'])} ms "
                      f"(x{_fmt(i['itl_p99_ratio'])}; goal < x2), ITL max {_fmt(i['without']['itl_max_ms'])} -> "
                      f"{_fmt(i['with']['itl_max_ms'])} ms, the long prompt's TTFT "
                      f"{_fmt(i['with'].get('long_prompt_ttft_ms'))} ms."]
    if "structured" in results:
        st = results["structured"]
        lines += ["", f"Structured output (one request at a time, median of {st['repeats']}): unconstrained "
                      f"{_fmt(st['unconstrained_decode_tok_s'])} tok/s, json_schema "
                      f"{_fmt(st['json_schema_decode_tok_s'])} tok/s (x{_fmt(st['ratio'])}; goal >= x0.9)."]
    m = results["machine"]
    lines += ["", f"{m['processor']}, {m['cpus']} CPUs, {results['date_utc']}, load average "
                  f"{' '.join(f'{x:.2f}' for x in m['load_average_start'])} (start), "
                  f"{' '.join(f'{x:.2f}' for x in m.get('load_average_end', []))} (end)."]
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `python -m lmengine.bench.serve_bench`."""
    p.add_argument("--model", "-m", default=None, help="a .gguf file or a bundled name (default: smollm2)")
    p.add_argument("--clients", type=int, nargs="+", default=list(DEFAULT_CLIENTS),
                   help="concurrent streaming clients per level (default: 1 8 32)")
    p.add_argument("--rounds", type=int, default=2, help="requests per client per level (default: 2)")
    p.add_argument("--max-tokens", type=int, default=128, help="output tokens per request (default: 128)")
    p.add_argument("--threads", type=int, default=None, help="threads of both servers (default: all cores)")
    p.add_argument("--max-batch", type=int, default=32, help="lmengine serve --max-batch (default: 32)")
    p.add_argument("--n-ctx", type=int, default=2048, help="context of both servers (default: 2048)")
    p.add_argument("--prefill-chunk", type=int, default=None,
                   help="lmengine serve --prefill-chunk (default: the server's default)")
    p.add_argument("--prefill-pace", type=float, default=None,
                   help="lmengine serve --prefill-pace (default: the server's default)")
    p.add_argument("--long-prompt-tokens", type=int, default=1500, help="the interfering prompt (default: 1500)")
    p.add_argument("--structured-repeats", type=int, default=3, help="structured-output pairs (default: 3)")
    p.add_argument("--no-peer", action="store_true", help="skip llama_cpp.server")
    p.add_argument("--json", default="serve_bench.json", help="where to write the JSON results")


def main(argv=None) -> int:
    """`python -m lmengine.bench.serve_bench [options]`: run, print the markdown, write JSON."""
    p = argparse.ArgumentParser(prog="python -m lmengine.bench.serve_bench", description=__doc__.split("\n")[0])
    add_arguments(p)
    args = p.parse_args(argv)
    for name in ("rounds", "max_tokens", "max_batch", "n_ctx", "long_prompt_tokens", "structured_repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if any(c < 1 for c in args.clients):
        p.error("--clients must be positive")
    if args.long_prompt_tokens + 16 > args.n_ctx or args.max_tokens + 64 > args.n_ctx:
        p.error("--n-ctx is too small for --long-prompt-tokens / --max-tokens")
    results = run_serve_bench(model=args.model, clients=args.clients, rounds=args.rounds, max_tokens=args.max_tokens,
                              threads=args.threads, max_batch=args.max_batch, n_ctx=args.n_ctx,
                              prefill_chunk=args.prefill_chunk, prefill_pace=args.prefill_pace,
                              long_prompt_tokens=args.long_prompt_tokens,
                              structured_repeats=args.structured_repeats, peer=not args.no_peer)
    print(markdown(results))
    with open(args.json, "w") as f:
        json.dump(results, f, indent=1)
    log(f"wrote {args.json}")
    return 0


def run_from_bench_args(args) -> int:
    """`lmengine bench --serve`: the bench verb's options (model, threads, gen_tokens, json) and
    --clients mapped onto main's defaults."""
    argv = ["--clients", *map(str, args.clients or DEFAULT_CLIENTS), "--max-tokens", str(args.gen_tokens)]
    if args.model:
        argv += ["--model", args.model[0]]
    if args.threads:
        argv += ["--threads", str(args.threads[-1])]
    if args.json and args.json != "bench_results.json":
        argv += ["--json", args.json]
    return main(argv)


if __name__ == "__main__":
    sys.exit(main())
