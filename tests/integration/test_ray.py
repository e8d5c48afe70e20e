"""lmengine on Ray (engine/ray.py) and `lmengine batch` (engine/cli_batch.py) on the bundled SmolLM2.

A local Ray cluster is started by the module fixture (`ray.init(num_cpus=2)`: two actors of one
CPU each) and shut down at the end. The reference for every text is the same model in this
process (`LLM.generate`, greedy, so the text is determined; batched greedy equals one by one,
tests/integration/test_llm.py). The jobs are kept short (4 tokens per answer); each actor loads
the model once (seconds with a warm Numba cache; a cold cache compiles first, minutes).
"""
import json
import signal
import socket
import subprocess
import sys
import time

import pytest

ray = pytest.importorskip("ray")

from lmengine import LLM, SamplingParams  # noqa: E402

N_CTX = 128
MAX_TOKENS = 4
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
PROMPTS = [f"Fact {i}: the number {i} is" for i in range(200)]


@pytest.fixture(scope="module")
def llm(smollm2_path):
    llm = LLM(smollm2_path, n_ctx=N_CTX, max_batch_size=16, n_threads=1)   # as each actor
    yield llm
    llm.close()


@pytest.fixture(scope="module")
def reference(llm):
    """custom_id -> greedy text of PROMPTS, in this process."""
    return {f"p{i}": out.text for i, out in enumerate(llm.generate(PROMPTS, GREEDY))}


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        yield
    finally:
        try:
            from ray import serve
            serve.shutdown()
        finally:
            ray.shutdown()


def run_job(smollm2_path, **kwargs) -> list[dict]:
    from lmengine.ray import batch_infer
    ds = ray.data.from_items([{"custom_id": f"p{i}", "prompt": p} for i, p in enumerate(PROMPTS)])
    out = batch_infer(ds, smollm2_path, GREEDY, concurrency=2, threads_per_actor=1, batch_size=25,
                      llm_kwargs={"n_ctx": N_CTX, "max_batch_size": 16}, **kwargs)
    return out.take_all()


def test_batch_infer_two_actors_equals_in_process_generate(cluster, smollm2_path, reference):
    rows = run_job(smollm2_path)
    assert len(rows) == 200
    assert sorted(r["custom_id"] for r in rows) == sorted(reference)
    for r in rows:
        assert r["error"] is None, r
        assert r["text"] == reference[r["custom_id"]], r["custom_id"]
        assert r["usage"]["completion_tokens"] <= MAX_TOKENS


def test_an_actor_killed_mid_job_is_restarted_and_nothing_is_lost(cluster, smollm2_path, reference, tmp_path):
    """The test hook makes one actor os._exit on its second batch (a killed process): Ray
    restarts it and retries the batch; every row comes out exactly once, still correct."""
    marker = tmp_path / "crashed"
    rows = run_job(smollm2_path, _crash_marker=str(marker))
    assert marker.exists()                                   # an actor did die
    ids = [r["custom_id"] for r in rows]
    assert len(ids) == 200 and len(set(ids)) == 200
    assert all(r["error"] is None and r["text"] == reference[r["custom_id"]] for r in rows)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_deployment_answers_over_http_and_shuts_down(cluster, smollm2_path, llm):
    import httpx
    from ray import serve

    from lmengine.ray import serve_app
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(serve_app(smollm2_path, replicas=1, threads_per_replica=1, llm_kwargs={"n_ctx": N_CTX},
                        app_kwargs={"model_name": "smollm2"}),
              name="lmengine", route_prefix="/", blocking=False)
    try:
        deadline = time.monotonic() + 300
        while True:                                          # the replica loads the model first
            try:
                reply = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                                   json={"model": "smollm2", "prompt": PROMPTS[0], "max_tokens": MAX_TOKENS,
                                         "temperature": 0})
                if reply.status_code not in (404, 503):          # 404/503: the route is not up yet
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the Serve app did not come up"
            time.sleep(1)
        assert reply.status_code == 200, reply.text
        choice = reply.json()["choices"][0]
        assert choice["text"] == llm.generate(PROMPTS[0], GREEDY).text
    finally:
        serve.delete("lmengine")
        serve.shutdown()
    with pytest.raises(httpx.TransportError):
        httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"prompt": "x"}, timeout=5)


# -- the command line ----------------------------------------------------------------------------------
def read_output(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


def batch_command(smollm2_path, *args) -> list[str]:
    return [sys.executable, "-m", "lmengine", "batch", *args, "--model", smollm2_path, "--n-ctx", str(N_CTX),
            "--threads", "1", "--batch-size", "4", "--max-tokens", str(MAX_TOKENS), "--temperature", "0"]


def test_batch_cli_error_rows_and_resume_after_a_kill(smollm2_path, reference, tmp_path):
    """`lmengine batch` on a JSONL with a malformed row and an over-long prompt: those are error
    rows, the others equal the in-process answers. The first run is killed (SIGKILL: no chance
    to clean up) once some rows are out; the rerun completes it, each row exactly once."""
    n = 60
    lines = [json.dumps({"custom_id": f"p{i}", "method": "POST", "url": "/v1/completions",
                         "body": {"model": "smollm2", "prompt": PROMPTS[i]}}) for i in range(n)]
    lines[7] = '{"custom_id": "p7", "body": {"prompt": '                      # malformed
    lines[11] = json.dumps({"custom_id": "p11", "prompt": "word " * 300})     # > N_CTX tokens
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    cmd = batch_command(smollm2_path, str(tmp_path / "in.jsonl"), str(out), "--flush-seconds", "0")
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (out.exists() and len(read_output(out)) >= 10):
            assert first.poll() is None, first.stderr.read()
            assert time.monotonic() < deadline, "no rows written"
            time.sleep(0.05)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
        first.stderr.close()
    n_first = len(read_output(out))
    assert n_first < n, "the first run finished before it was killed: make the job longer"
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr
    assert "lmengine batch: " in second.stderr and "tok/s" in second.stderr and "ETA" in second.stderr
    rows = read_output(out)
    assert sorted(r["row"] for r in rows) == list(range(n))             # each row exactly once
    by_id = {r["custom_id"]: r for r in rows}
    assert by_id["row-7"]["error"]["code"] == "invalid_json"
    assert by_id["p11"]["error"]["code"] == "context_length_exceeded"
    for i in range(n):
        if i not in (7, 11):
            assert by_id[f"p{i}"]["error"] is None and by_id[f"p{i}"]["text"] == reference[f"p{i}"], i
