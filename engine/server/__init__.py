"""`lmengine serve`: an OpenAI-compatible HTTP server over the batching scheduler.

    from lmengine import LLM
    from lmengine.server import create_app
    app = create_app(LLM("smollm2"), api_key="secret")     # a FastAPI app; run it with uvicorn

Needs the `server` extra (`pip install "lmengine[server]"`: fastapi, uvicorn, prometheus-client).
Modules: app.py (routes, security, streaming), protocol.py (request models), metrics.py
(Prometheus). The request/response mapping itself is engine/openai_compat.py, shared with
`LLM.create_chat_completion`. See docs/SERVER.md.
"""
from .app import create_app

__all__ = ["create_app"]
