"""The `lmengine` command line: generate, chat, convert, bench, info.

    lmengine generate "Once upon a time" --max-tokens 64
    lmengine chat
    lmengine info smollm2
    lmengine convert smollm2 out_dir --to onnx --weights int4
    lmengine bench --threads 1 2
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from .errors import LMEngineError

DEFAULT_PROMPT = "Once upon a time"


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=None,
                   help="a .gguf file, an ONNX export directory, or a bundled name (default: smollm2)")
    p.add_argument("--n-ctx", type=int, default=2048, help="context window (tokens)")
    p.add_argument("--threads", "-t", type=int, default=None, help="compute threads (default: all cores)")
    p.add_argument("--backend", choices=("numba", "onnxruntime"), default="numba")
    p.add_argument("--activations", choices=("mixed", "int8x2", "int8", "f32"), default="mixed",
                   help="matrix product arithmetic: mixed (default: int8, two terms for k/v), int8x2 "
                        "(float accuracy), int8 (llama.cpp's), f32 (exact)")
    p.add_argument("--kv-cache-dtype", choices=("auto", "f16", "f32"), default="auto",
                   help="KV cache elements: f16 (half the memory), f32, auto (default: f32 with "
                        "--activations f32, else f16)")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", "-n", type=int, default=128)
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy (default: model's or 1.0)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--min-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")


def _params(args):
    from .params import SamplingParams
    given = {"max_tokens": args.max_tokens}
    for name in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed", "stop"):
        value = getattr(args, name)
        if value is not None:
            given[name] = value
    if args.ignore_eos:
        given["ignore_eos"] = True
    return SamplingParams(**given)


def _load(args):
    from .llm import LLM
    t0 = time.perf_counter()
    if sys.stderr.isatty() or getattr(args, "verbose", False):
        print("loading the model and its compiled kernels (the very first run compiles them, about a "
              "minute; later runs load them from the disk cache)...", file=sys.stderr, flush=True)
    llm = LLM(args.model, n_ctx=args.n_ctx, n_threads=args.threads, backend=args.backend, activations=args.activations,
              kv_cache_dtype=args.kv_cache_dtype)
    if getattr(args, "verbose", False):
        print(f"loaded {llm.path} in {time.perf_counter() - t0:.2f} s", file=sys.stderr)
    return llm


def cmd_generate(args) -> int:
    llm = _load(args)
    params = _params(args)
    prompt = args.prompt if args.prompt is not None else DEFAULT_PROMPT
    if args.chat_template:
        prompt = llm.render_chat([{"role": "user", "content": prompt}])
    n_prompt = len(llm.tokenizer.encode(prompt))
    if not args.chat_template:
        print(prompt, end="", flush=True)
    t0 = time.perf_counter()
    t_first = None
    n_tokens = 0
    for chunk in llm.stream(prompt, params):
        if t_first is None:
            t_first = time.perf_counter()
        n_tokens += len(chunk.token_ids)
        print(chunk.text, end="", flush=True)
    t_end = time.perf_counter()
    print()
    if args.verbose:
        prefill_s = t_first - t0
        decode_s = t_end - t_first
        print(f"prompt: {n_prompt} tokens in {prefill_s:.3f} s ({n_prompt / prefill_s:.1f} tok/s prefill, "
              f"time to first token {prefill_s:.3f} s)", file=sys.stderr)
        if n_tokens > 1:
            print(f"decode: {n_tokens - 1} tokens in {decode_s:.3f} s "
                  f"({(n_tokens - 1) / decode_s:.1f} tok/s)", file=sys.stderr)
    return 0


def cmd_chat(args) -> int:
    """Interactive chat. The conversation is re-rendered each turn; the KV cache keeps the
    common prefix, so only the new turn is computed."""
    llm = _load(args)
    params = _params(args)
    messages = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    print("chat with the model; an empty line or Ctrl-D ends.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        reply = []
        for chunk in llm.stream(llm.render_chat(messages), params):
            print(chunk.text, end="", flush=True)
            reply.append(chunk.text)
        print()
        messages.append({"role": "assistant", "content": "".join(reply)})
    return 0


def cmd_info(args) -> int:
    from lmengine.converters.gguf_file import GGUFFile

    from .config import config_from_gguf
    from .models.registry import resolve_model
    path = resolve_model(args.model)
    if os.path.isdir(path):
        print(f"ONNX export directory: {path}")
        for name in sorted(os.listdir(path)):
            print(f"  {name:32s} {os.path.getsize(os.path.join(path, name)):>14,d} bytes")
        return 0
    f = GGUFFile(path)
    config = config_from_gguf(f)
    print(f"file:          {path} ({f.file_size:,d} bytes)")
    print(f"architecture:  {f.get('general.architecture')}  name: {f.get('general.name', '')}")
    for key in config.__dataclass_fields__:
        if key != "tensor_types":
            print(f"  {key:20s} {getattr(config, key)}")
    by_type: dict = {}
    for info in f.tensors.values():
        n, b = by_type.get(info.type_name, (0, 0))
        by_type[info.type_name] = (n + 1, b + info.n_bytes)
    print("tensor types:")
    for name, (n, b) in sorted(by_type.items(), key=lambda kv: -kv[1][1]):
        print(f"  {name:8s} {n:5d} tensors {b:>14,d} bytes")
    print(f"tokenizer:     model={f.get('tokenizer.ggml.model')} pre={f.get('tokenizer.ggml.pre')} "
          f"tokens={len(f.get('tokenizer.ggml.tokens') or [])} bos={f.get('tokenizer.ggml.bos_token_id')} "
          f"eos={f.get('tokenizer.ggml.eos_token_id')}")
    template = f.get("tokenizer.chat_template")
    print(f"chat template: {'none (chatml fallback)' if not template else repr(template[:120]) + ('...' if len(template) > 120 else '')}")
    return 0


def cmd_convert(args) -> int:
    from .convert import convert
    convert(args.source, args.dest, to=args.to, weights=args.weights, description=args.description,
            vocab=args.vocab, progress=lambda msg: print(msg, file=sys.stderr, flush=True),
            accuracy_level=args.accuracy_level)
    print(f"wrote {args.dest}", file=sys.stderr)
    return 0


def cmd_quantize(args) -> int:
    from lmengine.converters.quantize import quantize_gguf
    tty = sys.stderr.isatty()

    def show(p) -> None:
        if tty:     # one line, redrawn: a progress bar
            print(f"\r{str(p)[:150]:150s}", end="\n" if p.tensor_done and p.index == p.n_tensors else "",
                  file=sys.stderr, flush=True)
        elif p.tensor_done:
            print(p, file=sys.stderr, flush=True)

    def warn(msg: str) -> None:
        print(("\n" if tty else "") + f"warning: {msg}", file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    types = quantize_gguf(args.source, args.dest, args.type, pure=args.pure,
                          allow_requantize=args.allow_requantize, force=args.force, progress=show, warn=warn)
    counts: dict = {}
    for type_name in types.values():
        counts[type_name] = counts.get(type_name, 0) + 1
    summary = ", ".join(f"{n} {t}" for t, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    print(f"wrote {args.dest} ({os.path.getsize(args.dest):,d} bytes; tensors: {summary}) "
          f"in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 0


def cmd_bench(args) -> int:
    from .bench.runner import run_bench
    run_bench(args)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmengine", description="LLM inference on the CPU (GGUF, Numba, cffi, onnxruntime)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="generate text from a prompt")
    p.add_argument("prompt", nargs="?", default=None, help=f"prompt text (default: {DEFAULT_PROMPT!r})")
    _model_args(p)
    _sampling_args(p)
    p.add_argument("--chat-template", action="store_true", help="wrap the prompt as a user message in the chat template")
    p.add_argument("--verbose", "-v", action="store_true", help="print load time and prefill/decode tok/s")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat (keeps the cache between turns)")
    _model_args(p)
    _sampling_args(p)
    p.add_argument("--system", default=None, help="system message")
    p.add_argument("--verbose", "-v", action="store_true")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("info", help="print a model's architecture, sizes, quant types, tokenizer")
    p.add_argument("model", nargs="?", default=None)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("convert", help="convert a model: HF/Keras/PyTorch -> GGUF, GGUF -> ONNX")
    p.add_argument("source", help="HF model dir, .keras/.h5, .pt state_dict, or a GGUF/bundled name (with --to onnx)")
    p.add_argument("dest", help="output .gguf file, or a directory for --to onnx")
    p.add_argument("--to", choices=("gguf", "onnx"), default=None, help="output format (default: by dest)")
    p.add_argument("--weights", default=None, help="gguf: f32|f16|q8_0|q4_0|q4_1; onnx: f32|int4")
    p.add_argument("--accuracy-level", type=int, choices=(0, 1, 2, 3, 4), default=0,
                   help="onnx int4: MatMulNBits activation precision (0: float32, exact; 4: int8, "
                        "faster, as onnxruntime-genai's own builder exports for CPU)")
    p.add_argument("--description", default=None, help="JSON describing a PyTorch LSTM state_dict's architecture")
    p.add_argument("--vocab", default=None, help="LSTM vocabulary: a JSON list of tokens, or a text file (one token a line)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("quantize", help="requantize a GGUF file (F32/F16/BF16 in) to Q4_K_M, Q8_0, IQ4_XS, ...")
    p.add_argument("source", help="input .gguf file (F32, F16 or BF16; a quantized one with --allow-requantize)")
    p.add_argument("dest", help="output .gguf file")
    p.add_argument("type", help="Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K_M, Q4_K_S, Q5_K_M, Q5_K_S, Q6_K, "
                                "IQ4_NL, IQ4_XS (or F16, BF16, F32); per-tensor types as llama.cpp's quantizer")
    p.add_argument("--pure", action="store_true", help="every matrix in TYPE (no mix; output and embeddings too)")
    p.add_argument("--allow-requantize", action="store_true", help="allow tensors already in a quantized type")
    p.add_argument("--force", action="store_true", help="replace DEST if it exists")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("bench", help="measure prefill/decode tok/s, TTFT, start times, RSS; compare with peers")
    p.add_argument("--model", "-m", nargs="+", default=None,
                   help="GGUF files (or bundled names) to measure, one row per file and engine (default: smollm2)")
    p.add_argument("--no-cold", action="store_true", help="skip the cold-start run (empty Numba cache)")
    p.add_argument("--backend", choices=("numba", "onnxruntime"), default="numba")
    p.add_argument("--onnx-dir", default=None, help="ONNX export to use with --backend onnxruntime")
    p.add_argument("--threads", type=int, nargs="+", default=None, help="thread counts (default: 1 and all cores)")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch", type=int, nargs="*", default=None, help="concurrent sequences for the batch table (e.g. 1 4 16 64)")
    p.add_argument("--peers", nargs="*", default=None, help="peers to run when installed (llama_cpp, onnxruntime_genai, ctranslate2, transformers)")
    p.add_argument("--lstm", action="store_true", help="also run the LSTM benchmark against torch nn.LSTM")
    p.add_argument("--activations", choices=("mixed", "int8x2", "int8", "f32"), default="mixed",
                   help="our matrix product arithmetic (see `lmengine generate --help`)")
    p.add_argument("--kv-cache-dtype", choices=("auto", "f16", "f32"), default="auto",
                   help="our KV cache elements (see `lmengine generate --help`)")
    p.add_argument("--ct2-dir", default=None,
                   help="CTranslate2 model dir (default: converted once into ~/.cache/lmengine/ct2)")
    p.add_argument("--json", default="bench_results.json", help="where to write the JSON results")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except LMEngineError as e:
        print(f"lmengine: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
