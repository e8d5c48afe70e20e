"""The `lmengine` command line (also `python -m lmengine`): generate, chat, info, convert,
quantize, bench; serve, embed, batch, warmup (each in its own module, engine/cli_<verb>.py).

    lmengine generate "Once upon a time" --max-tokens 64
    echo "Once upon a time" | lmengine generate        # the prompt read from standard input
    lmengine chat                                      # /help lists the chat commands
    lmengine info smollm2
    lmengine convert smollm2 out_dir --to onnx --weights int4
    lmengine bench --threads 1 2

Standard output carries only the text (the prompt and its continuation, or the chat); progress,
timings, warnings and errors go to standard error. An error the user can cause (a missing file, a
bad option value, a prompt longer than the context) prints one line, `lmengine: error: ...`, and
the command exits with status 1 (argparse's own usage errors exit with 2). A warning prints one
line, `lmengine: warning: ...`.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import gc
import os
import sys
import time
import warnings

from . import cli_batch, cli_embed, cli_serve, cli_warmup
from .errors import InvalidParameterError, LMEngineError, ModelFileError
from .kernels import native
from .kernels.jit_cache import CompileProgress

DEFAULT_PROMPT = "Once upon a time"


# -- output ------------------------------------------------------------------------------------------
class _Stdout:
    """Writes text to stdout and remembers whether its last line is unfinished, so that a message
    on stderr can first end that line (on a terminal it would otherwise be glued to the text)."""

    def __init__(self) -> None:
        self.line_open = False

    def write(self, text: str) -> None:
        if text:
            sys.stdout.write(text)
            sys.stdout.flush()
            self.line_open = not text.endswith("\n")

    def end_line(self) -> None:
        if self.line_open:
            self.write("\n")


OUT = _Stdout()


def _say(message: str) -> None:
    """One line on stderr, after ending an unfinished line of text on stdout."""
    OUT.end_line()
    print(message, file=sys.stderr, flush=True)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """warnings.showwarning for the command line: `lmengine: warning: MESSAGE` on one line, instead
    of Python's two lines with the file and the source line."""
    from .errors import LMEngineWarning
    kind = "" if issubclass(category, LMEngineWarning) else f"{category.__name__}: "
    _say(f"lmengine: warning: {kind}{message}")


def _os_error_message(e: OSError) -> str:
    """'PATH: No such file or directory' (the engine's 'where: what' order)."""
    if e.filename is None:
        return e.strerror or str(e)
    where = f"{e.filename} -> {e.filename2}" if e.filename2 is not None else f"{e.filename}"
    return f"{where}: {e.strerror or e}"


def _expected_os_error(e: OSError) -> bool:
    """An OSError the user caused and can fix (a file that is missing, unreadable, a directory,
    or a full disk): reported in one line. Others keep their traceback."""
    return e.filename is not None or e.errno in (errno.ENOSPC, errno.EDQUOT)


def version() -> str:
    """The installed distribution's version; the source tree's `lmengine.__version__` when the
    package runs without being installed."""
    from importlib import metadata
    try:
        return metadata.version("lmengine")
    except metadata.PackageNotFoundError:
        from . import __version__
        return __version__


def default_max_tokens() -> int:
    """The API's default (`SamplingParams().max_tokens`): the CLI and the library stop at the same
    length unless told otherwise."""
    from .params import SamplingParams
    return SamplingParams().max_tokens


# -- options shared by the verbs ----------------------------------------------------------------------
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
    n = default_max_tokens()
    p.add_argument("--max-tokens", "-n", type=int, default=n,
                   help=f"most tokens to generate (default: {n}, the same as the API's SamplingParams)")
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
        _say("loading the model and its compiled kernels (a first run compiles them, for a few minutes "
             "on a slow machine, with progress below; later runs load them from the disk cache in a "
             "second or two; `lmengine warmup` does it ahead)...")
    show_compiles = sys.stderr.isatty() or getattr(args, "verbose", False)
    # The model and the compiled code it loads are ~1M Python objects that live as long as this
    # process. The collector is paused while they are made and then told to skip them (freeze):
    # no full collections of them during the load, between tokens, or at exit (about 0.35 s of a
    # 2 s `lmengine generate`, measured in docs/FIRST_START.md). The library does not do this:
    # an embedding application owns its collector (and may load and drop many models).
    gc.disable()
    try:
        with CompileProgress() if show_compiles else contextlib.nullcontext():
            llm = LLM(args.model, n_ctx=args.n_ctx, n_threads=args.threads, backend=args.backend,
                      activations=args.activations, kv_cache_dtype=args.kv_cache_dtype)
    finally:
        gc.freeze()
        gc.enable()
    if getattr(args, "verbose", False):
        _say(f"loaded {llm.path} in {time.perf_counter() - t0:.2f} s; {native.kernels_in_use()}")
    return llm


def _rate(n: int, seconds: float) -> str:
    return f"{n / seconds:.1f} tok/s" if seconds > 0 else "- tok/s"


# -- generate -----------------------------------------------------------------------------------------
def _read_prompt(args) -> str:
    """The prompt argument; else, when standard input is not a terminal (a pipe or a file), all of
    it, less one final newline (the one `echo` adds); else DEFAULT_PROMPT. "-" reads stdin too."""
    if args.prompt is not None and args.prompt != "-":
        return args.prompt
    stdin = sys.stdin
    if stdin is None or (args.prompt is None and stdin.isatty()):
        return DEFAULT_PROMPT
    raw = stdin.buffer.read() if hasattr(stdin, "buffer") else stdin.read()
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    except UnicodeDecodeError as e:
        raise InvalidParameterError(f"standard input is not UTF-8 text ({e})") from None
    text = text[:-1] if text.endswith("\n") else text
    text = text[:-1] if text.endswith("\r") else text
    if not text:
        raise InvalidParameterError("no prompt: standard input is empty (give the prompt as an argument, "
                                    "or pipe it in: echo 'Once upon a time' | lmengine generate)")
    return text


def cmd_generate(args) -> int:
    prompt = _read_prompt(args)
    llm = _load(args)
    params = _params(args)
    if args.chat_template:   # token ids: the prompt stays plain text inside the template
        prompt = llm.chat_prompt_ids([{"role": "user", "content": prompt}])
        n_prompt = len(prompt)
    else:
        n_prompt = len(llm.tokenizer.encode(prompt))
        OUT.write(prompt)
    t0 = time.perf_counter()
    t_first = None
    n_tokens = 0
    for chunk in llm.stream(prompt, params):
        if t_first is None:
            t_first = time.perf_counter()
        n_tokens += len(chunk.token_ids)
        OUT.write(chunk.text)
    t_end = time.perf_counter()
    OUT.write("\n")
    if args.verbose:
        t_first = t_end if t_first is None else t_first
        prefill_s = t_first - t0
        _say(f"prompt: {n_prompt} tokens in {prefill_s:.3f} s ({_rate(n_prompt, prefill_s)} prefill, "
             f"time to first token {prefill_s:.3f} s)")
        if n_tokens > 1:
            _say(f"decode: {n_tokens - 1} tokens in {t_end - t_first:.3f} s "
                 f"({_rate(n_tokens - 1, t_end - t_first)})")
    return 0


# -- chat ---------------------------------------------------------------------------------------------
CHAT_PROMPT, CHAT_MORE, BLOCK = "> ", ". ", '"""'
CHAT_HELP = f"""\
Enter sends the line. A longer message:
  end a line with \\ to go on with the next line, or
  put {BLOCK} before and after the text (on their own lines, or glued to its first and last
  words): everything in between is one message, empty lines included (for pastes).
Commands, alone on a line:
  /help          this list
  /reset         forget the conversation (the system prompt stays)
  /system TEXT   set the system prompt and start a new conversation (/system alone removes it)
  /exit          end the chat (so does Ctrl-D; /quit too)
A message that starts with / goes in a {BLOCK} block. Ctrl-C stops a reply (the turn is dropped)."""


def read_message(read_line) -> tuple[str, bool] | None:
    """The next message typed at the chat prompt, as (text, is_block), or None at the end of
    input. read_line(prompt) returns one line without its newline and raises EOFError at the end.

    A message is a line; or lines joined while each ends with a backslash; or everything between
    a line that starts with \"\"\" and a line that ends with \"\"\". Empty lines between messages are
    skipped. A message cut short by the end of input is still returned."""
    lines: list[str] = []
    try:
        line = read_line(CHAT_PROMPT)
        while not line.strip():
            line = read_line(CHAT_PROMPT)
        if line.lstrip().startswith(BLOCK):
            rest = line.lstrip()[len(BLOCK):]
            if rest.rstrip().endswith(BLOCK):                 # \"\"\"text\"\"\" on one line
                return rest.rstrip()[:-len(BLOCK)], True
            if rest:
                lines.append(rest)
            while True:
                line = read_line(CHAT_MORE)
                if line.rstrip().endswith(BLOCK):
                    last = line.rstrip()[:-len(BLOCK)]
                    if last:                                  # text""" ends the block too
                        lines.append(last)
                    return "\n".join(lines), True
                lines.append(line)
        while line.endswith("\\"):
            lines.append(line[:-1])
            line = read_line(CHAT_MORE)
        lines.append(line)
    except EOFError:
        if not lines:
            return None
        return "\n".join(lines), True
    return "\n".join(lines), False


def _input_line(prompt: str) -> str:
    """input(), keeping OUT's idea of the stdout line: the prompt leaves it open; typed at a terminal,
    the user's Enter ends it (piped, it stays open and the reply follows the prompt)."""
    OUT.line_open = True
    line = input(prompt)          # EOFError (Ctrl-D, end of the pipe) leaves the prompt's line open
    OUT.line_open = not sys.stdin.isatty()
    return line


class ChatSession:
    """The conversation of `lmengine chat`: the messages so far, and the turn that runs the model."""

    def __init__(self, llm, params, system: str | None, verbose: bool) -> None:
        self.llm, self.params, self.verbose = llm, params, verbose
        self.system = system
        self.messages: list[dict] = []
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def command(self, text: str) -> bool:
        """Run a /command; False when it ends the chat."""
        name, _, arg = text.partition(" ")
        if name in ("/exit", "/quit"):
            return False
        if name == "/help":
            _say(CHAT_HELP)
        elif name == "/reset":
            self.reset()
            _say("(new conversation)")
        elif name == "/system":
            self.system = arg.strip() or None
            self.reset()
            _say("(system prompt set; new conversation)" if self.system else "(no system prompt; new conversation)")
        else:
            _say(f"unknown command {name!r}: /help lists the commands (a message that starts with / "
                 f"goes in a {BLOCK} block)")
        return True

    def turn(self, text: str) -> None:
        """Answer one user message, printing the reply as it comes. A turn that fails (the
        conversation outgrew the context, text the tokenizer cannot take) or is interrupted with
        Ctrl-C is dropped from the conversation, and the chat goes on."""
        self.messages.append({"role": "user", "content": text})
        reply: list[str] = []
        n_tokens, finish = 0, None
        t0 = time.perf_counter()
        t_first = None
        stream = None
        try:
            ids = self.llm.chat_prompt_ids(self.messages)
            stream = self.llm.stream(ids, self.params)
            for chunk in stream:
                t_first = t_first or time.perf_counter()
                n_tokens += len(chunk.token_ids)
                finish = chunk.finish_reason or finish
                OUT.write(chunk.text)
                reply.append(chunk.text)
        except LMEngineError as e:
            self.messages.pop()
            _say(f"lmengine: error: {e} (this turn is dropped)")
            return
        except KeyboardInterrupt:
            self.messages.pop()
            _say("(interrupted; this turn is dropped)")
            return
        finally:
            if stream is not None:
                stream.close()          # cancels the request if it is still running
        t_end = time.perf_counter()
        OUT.write("\n")
        self.messages.append({"role": "assistant", "content": "".join(reply)})
        if finish == "length":
            _say(f"(the reply stopped at --max-tokens {self.params.max_tokens})")
        if self.verbose:
            t_first = t_first or t_end
            _say(f"prompt: {len(ids)} tokens in {t_first - t0:.3f} s (until the first reply token; earlier turns "
                 f"come from the cache); reply: {n_tokens} tokens, {_rate(max(n_tokens - 1, 0), t_end - t_first)} "
                 f"after the first")


def cmd_chat(args) -> int:
    """Interactive chat. The conversation is re-encoded each turn (`llm.chat_prompt_ids`: what
    the user types stays plain text, even "<|im_start|>"); the KV cache keeps the common prefix,
    so only the new turn is computed."""
    llm = _load(args)
    if llm.chat_template is None:
        from .errors import ChatTemplateError
        raise ChatTemplateError(f"{llm.path}: this model has no chat template; use `lmengine generate`")
    session = ChatSession(llm, _params(args), args.system, args.verbose)
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        _say("chat with the model: Enter sends, /help lists the commands, /exit or Ctrl-D ends.")
    while True:
        message = read_message(_input_line)
        if message is None:                     # Ctrl-D, or the end of piped input
            OUT.end_line()
            return 0
        text, is_block = message
        if not is_block and text.strip().startswith("/"):
            if not session.command(text.strip()):
                OUT.end_line()
                return 0
        elif text.strip():
            session.turn(text)


# -- info ---------------------------------------------------------------------------------------------
def cmd_info(args) -> int:
    from .models.registry import resolve_model
    path = resolve_model(args.model)
    if os.path.isdir(path) or path.endswith(".onnx"):
        return _info_onnx(path if os.path.isdir(path) else os.path.dirname(path) or ".")
    from lmengine.converters.gguf_file import GGUFFile

    from .config import config_from_gguf
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
    print(f"tokenizer:     {_describe_tokenizer(f)}")
    print(f"chat template: {_describe_chat_template(f)}")
    print(f"kernels:       {native.kernels_in_use()}")
    return 0


def onnx_export_kind(folder: str) -> tuple[str, dict]:
    """What `lmengine convert ... --to onnx` left in `folder`, as the loader (llm.py _load_onnx)
    tells them apart: ("transformer", genai_config) for a decoder export (genai_config.json and the
    .onnx file it names), ("lstm", config) for an LSTM export (model.onnx whose metadata holds the
    lmengine.lstm config). Anything else raises ModelFileError saying what is missing."""
    from lmengine.converters.onnx_lstm import MODEL_FILE, read_lstm_onnx_metadata

    from .backends.ort_backend import GENAI_CONFIG, read_genai_config
    if os.path.isfile(os.path.join(folder, GENAI_CONFIG)):
        config = read_genai_config(folder)          # BackendError names a missing field
        model_file = config["model"]["decoder"]["filename"]
        if not os.path.isfile(os.path.join(folder, model_file)):
            raise ModelFileError(f"{folder}: {GENAI_CONFIG} names the model file {model_file!r}, which is not "
                                 f"in this directory")
        return "transformer", config
    if os.path.isfile(os.path.join(folder, MODEL_FILE)):
        try:
            config, _ = read_lstm_onnx_metadata(folder)
        except LMEngineError as e:
            raise ModelFileError(f"{folder} is a directory but not an ONNX export of lmengine: no {GENAI_CONFIG} "
                                 f"(a transformer export), and {MODEL_FILE} is not an LSTM export ({e})") from None
        return "lstm", config
    raise ModelFileError(f"{folder} is a directory but not an ONNX export of lmengine (no {GENAI_CONFIG} of a "
                         f"transformer export, no {MODEL_FILE} of an LSTM export); "
                         f"`lmengine convert MODEL DIR --to onnx` makes one")


def _info_onnx(folder: str) -> int:
    kind, config = onnx_export_kind(folder)
    if kind == "transformer":
        model, decoder = config["model"], config["model"]["decoder"]
        print(f"ONNX export (transformer decoder, onnxruntime-genai layout): {folder}")
        print(f"  type {model.get('type')!r}  layers {decoder.get('num_hidden_layers')}  "
              f"heads {decoder.get('num_attention_heads')}  kv heads {decoder.get('num_key_value_heads')}  "
              f"head size {decoder.get('head_size')}  hidden {decoder.get('hidden_size')}  "
              f"vocab {model.get('vocab_size')}  context {model.get('context_length')}")
    else:
        print(f"ONNX export (LSTM): {folder}")
        for key, value in config.items():
            print(f"  {key:20s} {value}")
    print("files:")
    for name in sorted(os.listdir(folder)):
        full = os.path.join(folder, name)
        if os.path.isfile(full):
            print(f"  {name:32s} {os.path.getsize(full):>14,d} bytes")
    return 0


def _describe_tokenizer(f) -> str:
    """The tokenizer keys as stored (a value of an unexpected type is shown as such, not used)."""
    tokens = f.get("tokenizer.ggml.tokens")
    count = len(tokens) if isinstance(tokens, (list, tuple)) else f"not a list ({type(tokens).__name__})"
    return (f"model={f.get('tokenizer.ggml.model')!r} pre={f.get('tokenizer.ggml.pre')!r} tokens={count} "
            f"bos={f.get('tokenizer.ggml.bos_token_id')!r} eos={f.get('tokenizer.ggml.eos_token_id')!r}")


def _describe_chat_template(f) -> str:
    """The start of the chat template, or the error that loading it gives."""
    from .chat import ChatTemplate
    if f.get("tokenizer.ggml.model") in ("char", "word"):
        return "none (LSTM vocabulary)"
    try:
        template = ChatTemplate.from_gguf(f)
    except LMEngineError as e:
        return f"error: {e}"
    if template.name == "chatml" and not f.get("tokenizer.chat_template"):
        return "none (chatml fallback)"
    source = template.source
    return repr(source[:120]) + ("..." if len(source) > 120 else "")


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
        print(("\n" if tty else "") + f"lmengine: warning: {msg}", file=sys.stderr, flush=True)

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
    if args.serve:
        from .bench.serve_bench import run_from_bench_args
        return run_from_bench_args(args)
    from .bench.runner import run_bench
    run_bench(args)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmengine", description="LLM inference on the CPU (GGUF, Numba, cffi, onnxruntime)")
    parser.add_argument("--version", action="version", version=f"lmengine {version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="generate text from a prompt")
    p.add_argument("prompt", nargs="?", default=None,
                   help=f"prompt text; without it (or with -), standard input when it is a pipe or a file "
                        f"(echo TEXT | lmengine generate), else {DEFAULT_PROMPT!r}")
    _model_args(p)
    _sampling_args(p)
    p.add_argument("--chat-template", action="store_true", help="wrap the prompt as a user message in the chat template")
    p.add_argument("--verbose", "-v", action="store_true", help="print load time and prefill/decode tok/s")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat (keeps the cache between turns)",
                       description="Chat with the model. " + CHAT_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _model_args(p)
    _sampling_args(p)
    p.add_argument("--system", default=None, help="system message")
    p.add_argument("--verbose", "-v", action="store_true",
                   help="after each reply: prompt tokens and evaluation time, reply tokens and tok/s")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("info", help="print a model's architecture, sizes, quant types, tokenizer")
    p.add_argument("model", nargs="?", default=None,
                   help="a .gguf file, an ONNX export directory, or a bundled name (default: smollm2)")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("convert", help="convert a model: HF/Keras/PyTorch -> GGUF, GGUF -> ONNX")
    p.add_argument("source", help="HF model dir, .keras/.h5, .pt state_dict, or a GGUF/bundled name (with --to onnx)")
    p.add_argument("dest", help="output .gguf file, or a directory for --to onnx")
    p.add_argument("--to", choices=("gguf", "onnx"), default=None, help="output format (default: by dest)")
    p.add_argument("--weights", default=None, help="gguf: f32|f16|q8_0|q4_0|q4_1, or any `lmengine quantize` type "
                        "(Q4_K_M, Q6_K, IQ4_XS, ...: converted to F32, then quantized); onnx: f32|int4")
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
    p.add_argument("--serve", action="store_true",
                   help="benchmark `lmengine serve` against llama_cpp.server: streaming clients, TTFT, "
                        "inter-token latency, a long prompt arriving, structured output (bench/serve_bench.py)")
    p.add_argument("--clients", type=int, nargs="+", default=None,
                   help="--serve: concurrent streaming clients (default: 1 8 32)")
    p.set_defaults(func=cmd_bench)

    for verb in (cli_serve, cli_embed, cli_batch, cli_warmup):    # verbs with modules of their own
        verb.add_parser(sub)
    return parser


def main(argv=None) -> int:
    """Run one command; the exit status: 0, 1 after an error (printed as one line on stderr),
    130 after Ctrl-C."""
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings():         # restores showwarning for callers in this process
        warnings.showwarning = _show_warning
        try:
            return args.func(args)
        except BrokenPipeError:             # `lmengine generate | head`: the reader left; stop quietly
            _silence_stdout()
            return 1
        except LMEngineError as e:
            _say(f"lmengine: error: {e}")
            return 1
        except OSError as e:
            if not _expected_os_error(e):
                raise
            _say(f"lmengine: error: {_os_error_message(e)}")
            return 1
        except KeyboardInterrupt:
            OUT.end_line()
            return 130
        finally:
            OUT.line_open = False


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's last flush raises nothing more."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout replaced by an object without a descriptor
        pass
