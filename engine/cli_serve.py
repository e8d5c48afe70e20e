"""`lmengine serve`: the OpenAI-compatible server (lmengine.server) under uvicorn.

    lmengine serve                                   # smollm2 on http://127.0.0.1:8000/v1
    lmengine serve --model my.gguf --port 8080 --api-key "$KEY" --max-batch 16

Binds 127.0.0.1 unless --host says otherwise; bound elsewhere without --api-key it warns (anyone
who can reach the port can use the model). Needs the `server` extra: pip install "lmengine[server]".
See docs/SERVER.md.
"""
from __future__ import annotations

import ipaddress
import os
import sys

LOOPBACK_NAMES = ("localhost",)


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (/v1/chat/completions, ...)",
                       description="Serve a model over OpenAI's HTTP API, batching concurrent requests.")
    p.add_argument("--model", "-m", default=None,
                   help="a .gguf file, an ONNX export directory, or a bundled name (default: smollm2)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' (default: the LMENGINE_API_KEY environment "
                        "variable, else none)")
    p.add_argument("--max-batch", type=int, default=8, help="sequences decoded together (default: 8)")
    p.add_argument("--n-ctx", type=int, default=None, help="context window per sequence (default: 2048 or "
                                                           "the model's training context)")
    p.add_argument("--threads", "-t", type=int, default=None, help="compute threads (default: all cores)")
    p.add_argument("--model-name", default=None, help="the id clients use (default: the model file's name)")
    p.add_argument("--max-body-bytes", type=int, default=None, help="largest request body (default: 1 MiB)")
    p.add_argument("--max-pending", type=int, default=None,
                   help="requests in flight before 429 Too Many Requests (default: 256)")
    p.add_argument("--max-tokens-limit", type=int, default=None, help="largest max_tokens a request may ask")
    p.add_argument("--prefill-chunk", type=int, default=None,
                   help="prompt tokens per scheduler step, so long prompts do not stall streams (default: 256)")
    p.add_argument("--prefill-pace", type=float, default=None,
                   help="while streams decode, a step's prompt chunk takes about this many times the decode "
                        "step's time, measured (default: 1.0, streams slow about 2x while a long prompt is "
                        "computed; 0 turns pacing off: fixed --prefill-chunk)")
    p.add_argument("--cors-origin", action="append", default=None,
                   help="allow browser requests from this origin (repeatable; default: CORS off)")
    p.set_defaults(func=run)


def is_loopback(host: str) -> bool:
    """Whether `host` only accepts connections from this machine."""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(args) -> int:
    from .errors import InvalidParameterError
    try:
        import uvicorn

        from .server import create_app
    except ImportError as e:
        raise InvalidParameterError(f"lmengine serve needs the server extra: pip install \"lmengine[server]\" "
                                    f"({e})") from None
    for name in ("port", "max_batch", "n_ctx", "max_body_bytes", "max_pending", "max_tokens_limit"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "port" else 1):
            raise InvalidParameterError(f"--{name.replace('_', '-')} must be positive, got {value}")
    api_key = args.api_key or os.environ.get("LMENGINE_API_KEY") or None
    if not is_loopback(args.host) and api_key is None:
        print(f"lmengine: warning: serving on {args.host} without --api-key: anyone who can reach port "
              f"{args.port} can use the model", file=sys.stderr, flush=True)
    from .llm import LLM
    print("lmengine: loading the model (a first run compiles the kernels: minutes)...", file=sys.stderr, flush=True)
    llm = LLM(args.model, n_ctx=args.n_ctx, n_threads=args.threads, max_batch_size=args.max_batch)
    options = {k: v for k, v in dict(model_name=args.model_name, max_body_bytes=args.max_body_bytes,
                                     max_pending=args.max_pending, max_tokens_limit=args.max_tokens_limit,
                                     cors_origins=args.cors_origin).items() if v is not None}
    if args.prefill_chunk is not None:
        options["prefill_chunk"] = args.prefill_chunk
    if args.prefill_pace is not None:
        options["prefill_pace"] = args.prefill_pace or None
    app = create_app(llm, api_key=api_key, close_llm=True, **options)
    print(f"lmengine: serving {llm.path} on http://{args.host}:{args.port}/v1 (batch {args.max_batch}, "
          f"n_ctx {llm.n_ctx})", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=10)
    return 0


def main(argv=None) -> int:
    """`python -m lmengine.cli_serve ...` (until the verb is wired into engine/cli.py)."""
    import argparse
    parser = argparse.ArgumentParser(prog="lmengine")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
