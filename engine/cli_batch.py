"""`lmengine batch INPUT OUTPUT`: answer every request of a JSONL or Parquet file (see
lmengine.batch for the formats), on this machine or on a Ray cluster.

    lmengine batch requests.jsonl results.jsonl --max-tokens 64 --temperature 0
    lmengine batch requests.jsonl results.jsonl --ray --actors 4 --threads 2            # local Ray
    lmengine batch requests.parquet results.jsonl --ray --address ray://head:10001 --actors 32

Rerunning the same command after an interruption (Ctrl-C, a crash, a lost machine) goes on
where the output stops. Progress goes to stderr; a last line sums up the run.
"""
from __future__ import annotations

import argparse
import sys


def add_parser(sub) -> None:
    """Add the `batch` verb to an argparse subparsers object."""
    from .params import DEFAULTS
    p = sub.add_parser("batch", help="answer a JSONL/Parquet file of requests (OpenAI batch format), resumable",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", help="requests: .jsonl or .parquet (OpenAI batch-file rows, or prompt/messages rows)")
    p.add_argument("output", help="results (.jsonl), one row per request; rows already there are skipped")
    p.add_argument("--model", "-m", default=None,
                   help="a .gguf file or a bundled name (default: smollm2); with --ray, a path every node has")
    p.add_argument("--n-ctx", type=int, default=2048, help="context window per sequence (tokens)")
    p.add_argument("--threads", "-t", type=int, default=None,
                   help="compute threads (default: all cores; with --ray: per actor, default 1)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences decoded together (per LLM)")
    g = p.add_argument_group("sampling defaults (a row's own fields win)")
    g.add_argument("--max-tokens", "-n", type=int, default=DEFAULTS["max_tokens"],
                   help=f"most tokens per answer (default: {DEFAULTS['max_tokens']}, as the API)")
    g.add_argument("--temperature", type=float, default=None, help="0 = greedy (default: model's or 1.0)")
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--min-p", type=float, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    r = p.add_argument_group("Ray")
    r.add_argument("--ray", action="store_true", help="run on a Ray cluster (pip install 'lmengine[ray]')")
    r.add_argument("--address", default=None,
                   help="the cluster's address (ray.init's: auto, ray://HOST:10001); default: a local cluster")
    r.add_argument("--actors", type=int, default=1, help="actors, each holding one model (--ray)")
    p.add_argument("--flush-seconds", type=float, default=1.0,
                   help="write finished rows at least this often (a crash loses at most these and the rows in flight)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress line")
    p.set_defaults(func=run)


def run(args) -> int:
    """Run the job; 0 when every row of INPUT has its output row (error rows included)."""
    from .batch import run_batch
    from .errors import InvalidParameterError
    from .params import SamplingParams
    given = {"max_tokens": args.max_tokens}
    for name in ("temperature", "top_k", "top_p", "min_p", "seed", "stop"):
        if getattr(args, name) is not None:
            given[name] = getattr(args, name)
    defaults = SamplingParams(**given)
    for name in ("n_ctx", "batch_size", "actors"):
        if getattr(args, name) < 1:
            raise InvalidParameterError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.flush_seconds < 0:
        raise InvalidParameterError(f"--flush-seconds must be >= 0, got {args.flush_seconds}")
    progress = not args.quiet
    if args.ray:
        summary = _run_on_ray(args, defaults, progress)
    else:
        import contextlib

        from .kernels.jit_cache import CompileProgress
        from .llm import LLM
        if progress:
            _say("lmengine batch: loading the model (a first run compiles its kernels, minutes; "
                 "`lmengine warmup` does it ahead)...")
        with CompileProgress() if progress else contextlib.nullcontext():
            llm = LLM(args.model, n_ctx=args.n_ctx, n_threads=args.threads, max_batch_size=args.batch_size)
        try:
            summary = run_batch(llm, args.input, args.output, defaults=defaults, flush_seconds=args.flush_seconds,
                                progress=progress)
        finally:
            llm.close()
    _say(f"lmengine batch: {summary.completed_rows} rows written to {args.output} ({summary.error_rows} errors, "
         f"{summary.skipped_rows} already there) in {summary.seconds:.1f} s, "
         f"{summary.tokens_per_second:.1f} tok/s generated"
         + (" (dropped a torn last line left by a crash)" if summary.dropped_torn_line else ""))
    return 0


def _run_on_ray(args, defaults, progress: bool):
    from .batch import run_batch
    from .errors import LMEngineError
    try:
        import ray
        from .ray import ray_rows
    except ImportError as e:
        raise LMEngineError(f"--ray needs Ray: pip install 'lmengine[ray]' ({e})") from None
    threads = args.threads or 1
    started = not ray.is_initialized()
    if started:
        ray.init(address=args.address, log_to_driver=False, include_dashboard=False)
    try:
        return run_batch(None, args.input, args.output, flush_seconds=args.flush_seconds, progress=progress,
                         run_rows=lambda requests: ray_rows(
                             requests, model=args.model, sampling=defaults, actors=args.actors,
                             threads_per_actor=threads, batch_size=4 * args.batch_size,
                             llm_kwargs={"n_ctx": args.n_ctx, "max_batch_size": args.batch_size}))
    finally:
        if started:
            ray.shutdown()


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
