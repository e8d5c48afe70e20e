"""`lmengine embed`: sentence embeddings from the command line (engine/embed.py).

    lmengine embed "first text" "second text"            # one JSON array of floats per line
    lmengine embed -m my-bert.gguf -o vectors.npy "a" "b" # float32 [n, dim] in a .npy file
    lmengine embed --file texts.txt -o vectors.npy        # one text per line ("-": stdin)

The model defaults to the bundled encoder "minilm" (all-MiniLM-L6-v2).
"""
from __future__ import annotations

import contextlib
import json
import sys


def add_parser(sub) -> None:
    p = sub.add_parser("embed", help="embed texts into vectors (bert, gpt2, llama-family models; default: the bundled minilm)",
                       description="Print one embedding per text (a JSON array per line), or write all of "
                                   "them as a float32 [n, dim] .npy file with -o.")
    p.add_argument("texts", nargs="*", help="texts to embed")
    p.add_argument("--model", "-m", default="minilm", help="a bert, gpt2 or llama-family .gguf, or a bundled name (default: minilm)")
    p.add_argument("--file", "-f", default=None, help="also embed each line of this file ('-': stdin)")
    p.add_argument("--output", "-o", default=None, help="write the vectors to this .npy file instead of printing")
    p.add_argument("--pooling", choices=("mean", "cls", "last"), default=None,
                   help="pooling (default: the model's; last token for decoders)")
    p.add_argument("--no-normalize", action="store_true", help="do not L2-normalize the vectors")
    p.add_argument("--batch-size", type=int, default=32, help="texts per forward pass (default 32)")
    p.add_argument("--threads", "-t", type=int, default=None, help="compute threads (default: all cores)")
    p.set_defaults(func=run)


def run(args) -> int:
    import numpy as np

    from .errors import InvalidParameterError
    from .llm import LLM

    texts = list(args.texts)
    if args.file is not None:
        stream = sys.stdin if args.file == "-" else open(args.file, encoding="utf-8")
        with contextlib.nullcontext() if stream is sys.stdin else stream:
            texts += [line.rstrip("\r\n") for line in stream]
    if not texts:
        raise InvalidParameterError("give at least one text (arguments or --file)")
    if args.output is not None and not args.output.endswith(".npy"):
        raise InvalidParameterError(f"--output {args.output!r}: the file name must end in .npy")
    print(f"lmengine: embedding {len(texts)} text(s) with {args.model}", file=sys.stderr)
    with LLM(args.model, n_threads=args.threads) as llm:
        vectors = llm.embed(texts, normalize=not args.no_normalize, pooling=args.pooling,
                            batch_size=args.batch_size)
    if args.output is not None:
        np.save(args.output, vectors)
        print(f"lmengine: wrote {vectors.shape[0]} x {vectors.shape[1]} float32 to {args.output}", file=sys.stderr)
    else:
        for row in vectors:
            sys.stdout.write(json.dumps([float(v) for v in row]) + "\n")
    return 0
