"""Fixtures of the server tests: a real uvicorn server on 127.0.0.1, on a free port, in a
thread of the test process, started and stopped by the fixture; over the fake model
(tests/engine/fake_backend.py: fast, where the model does not matter) or the bundled SmolLM2."""
from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
import time

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "engine"))

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from fake_backend import make_fake_llm  # noqa: E402

from lmengine.server import create_app  # noqa: E402


class PlainChat:
    """A chat template for the fake model's character tokenizer: the contents, space-joined."""

    source = ""

    def encode(self, messages, tokenizer, add_generation_prompt=True, parse_special_in_content=False, **kwargs):
        return tokenizer.encode(" ".join(m["content"] for m in messages) + " ")


@contextlib.contextmanager
def serve(llm, **app_kwargs):
    """Run create_app(llm, **app_kwargs) under uvicorn on 127.0.0.1:<free port>; yield the base
    URL ("http://127.0.0.1:PORT"). Stops the server (and the scheduler loop) on exit."""
    app = create_app(llm, **app_kwargs)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
        assert not thread.is_alive(), "the test server did not stop"


@pytest.fixture
def fake_llm():
    llm = make_fake_llm(n_slots=5, n_ctx=200)
    llm.chat_template = PlainChat()
    yield llm
    llm.close()


@pytest.fixture
def fake_server(fake_llm):
    with serve(fake_llm, model_name="fake") as url:
        yield url


@pytest.fixture(scope="session")
def smollm2_llm(smollm2_path):
    from lmengine import LLM
    llm = LLM(smollm2_path, n_ctx=1024, max_batch_size=8)
    yield llm
    llm.close()


@pytest.fixture(scope="module")
def smollm2_server(smollm2_llm):
    with serve(smollm2_llm, model_name="smollm2") as url:
        yield url
