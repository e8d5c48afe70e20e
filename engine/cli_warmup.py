"""`lmengine warmup`: compile every kernel ahead of the first request (engine/warmup.py).

    lmengine warmup                        # this CPU; e.g. in a Dockerfile, after pip install
    lmengine warmup --model my.gguf        # also load and run a model of your own
    lmengine warmup --portable --bake-wheel dist/lmengine-*.whl   # how .ci/wheel ships a cache
"""
from __future__ import annotations

import os
import subprocess
import sys

from .kernels import jit_cache


def add_parser(sub) -> None:
    p = sub.add_parser("warmup", help="compile the kernels ahead (for images and wheels), with progress",
                       description="Compile (or load from the disk cache) every kernel a request needs, so "
                                   "that the first request does not wait for it.")
    p.add_argument("--model", "-m", nargs="+", default=[],
                   help="also load and run these models (paths or bundled names)")
    p.add_argument("--portable", action="store_true",
                   help="compile for the x86-64-v3 CPU level instead of this CPU (a cache every AVX2 "
                        "machine can use: for wheels and images built on another machine)")
    p.add_argument("--bake-wheel", metavar="WHEEL", default=None,
                   help="then add the cache to WHEEL (a wheel of this very installation; needs --portable)")
    p.set_defaults(func=run)


def run(args) -> int:
    from .errors import InvalidParameterError
    from .warmup import bake_wheel, warmup
    if args.bake_wheel and not args.portable:
        raise InvalidParameterError("--bake-wheel needs --portable (a wheel's cache must fit every AVX2 CPU)")
    if args.portable and not jit_cache.portable_target_active():
        return _rerun_portable(args)
    report = warmup(args.model, portable=args.portable)
    target = "x86-64-v3 (portable)" if report.portable else "this CPU"
    print(f"lmengine warmup: {report.n_compiled} functions compiled for {target} in {report.seconds:.1f} s; "
          f"{report.cache_files} files in the cache", file=sys.stderr)
    if args.bake_wheel:
        n = bake_wheel(args.bake_wheel)
        print(f"lmengine warmup: added {n} cache files to {args.bake_wheel}", file=sys.stderr)
    return 0


def _rerun_portable(args) -> int:
    """The Numba target is chosen when lmengine is imported, so --portable runs this command again
    in a new process started with LMENGINE_NUMBA_TARGET=portable."""
    from .errors import InvalidParameterError
    if not jit_cache.host_supports_portable_target():
        raise InvalidParameterError("--portable: this CPU lacks the x86-64-v3 level (AVX2, FMA, F16C, BMI2)")
    if os.environ.get("LMENGINE_NUMBA_TARGET") == "portable" or os.environ.get("NUMBA_CPU_NAME"):
        raise InvalidParameterError("--portable: the portable target could not be set (NUMBA_CPU_NAME is "
                                    "set, or Numba compiled before lmengine was imported)")
    env = dict(os.environ, LMENGINE_NUMBA_TARGET="portable")
    argv = ["warmup", "--portable"] + (["--model", *args.model] if args.model else [])
    argv += ["--bake-wheel", args.bake_wheel] if args.bake_wheel else []
    return subprocess.run([sys.executable, "-m", "lmengine", *argv], env=env).returncode


def main(argv=None) -> int:
    import argparse
    parser = argparse.ArgumentParser(prog="lmengine")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["warmup", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)
