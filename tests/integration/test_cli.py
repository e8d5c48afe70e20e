"""The `lmengine` command line on the bundled SmolLM2.

Each subprocess loads the model (5-15 s with a warm Numba cache), so the checks are grouped: one
`generate` from a pipe (prompt, threads warning, timings), one failing `generate` (a prompt longer
than the context), one `generate` of a missing file, one `chat` session. What they print is held
against the library run in this process on the same model (greedy, so the text is determined).
`info`, `--version` and the chat's line reader run in this process (no model load).
"""
import os
import re
import subprocess
import sys

import pytest

from lmengine import LLM, SamplingParams
from lmengine.cli import ChatSession, main, read_message
from lmengine.kernels import native

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
N_CTX = 512


@pytest.fixture(scope="module")
def llm(smollm2_path):
    return LLM(smollm2_path, n_ctx=N_CTX)


def lmengine(*args, stdin: str | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -m lmengine ARGS` with `stdin` piped in (or /dev/null)."""
    return subprocess.run([sys.executable, "-m", "lmengine", *args], input=stdin if stdin is not None else "",
                          capture_output=True, text=True, timeout=timeout)


def assert_one_error_line(proc, needle: str) -> None:
    """Exit status 1, and the error as the last line of stderr (`lmengine: error: ...`), no traceback."""
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.rstrip("\n").split("\n")[-1]
    assert last.startswith("lmengine: error: ") and needle in last, proc.stderr


# -- version ------------------------------------------------------------------------------------------
def test_version_agrees_with_pyproject(capsys):
    import lmengine
    with open(os.path.join(REPO, "pyproject.toml"), encoding="utf-8") as f:
        declared = re.search(r'^version\s*=\s*"([^"]+)"', f.read(), re.M).group(1)
    assert lmengine.__version__ == declared
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"lmengine {declared}\n"


# -- generate -----------------------------------------------------------------------------------------
def test_generate_reads_a_piped_prompt_and_warns_once_about_threads(llm):
    """`echo Hello | lmengine generate --threads N` with N above the core count: the prompt is
    stdin less echo's newline (the text equals the library's for "Hello"); the oversubscription
    warning is one line; --verbose prints the prefill and decode rates."""
    too_many = (os.cpu_count() or 1) + 1
    proc = lmengine("generate", "--max-tokens", "8", "--temperature", "0", "--n-ctx", str(N_CTX), "--ignore-eos",
                    "--threads", str(too_many), "--verbose", stdin="Hello\n")
    assert proc.returncode == 0, proc.stderr
    expected = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)).text
    assert proc.stdout == "Hello" + expected + "\n"
    warnings = [line for line in proc.stderr.splitlines() if "warning" in line.lower()]
    assert len(warnings) == 1 and warnings[0].startswith(f"lmengine: warning: n_threads={too_many} is more than"), \
        proc.stderr
    assert "LMEngineWarning" not in proc.stderr and "warnings.warn" not in proc.stderr
    assert "tok/s prefill" in proc.stderr and "decode: 7 tokens" in proc.stderr


def test_generate_errors_are_one_line_on_stderr():
    """A prompt longer than the context: the echoed prompt's line is ended on stdout, the error is
    its own line on stderr, status 1. A missing model file: the same, before any loading."""
    prompt = " ".join(["word"] * 40)
    proc = lmengine("generate", prompt, "--n-ctx", "16")
    assert_one_error_line(proc, "the context holds 16")
    assert proc.stdout == prompt + "\n"
    missing = lmengine("generate", "Hi", "--model", "/nope/missing.gguf")
    assert_one_error_line(missing, "not found")
    assert missing.stdout == ""


# -- chat ---------------------------------------------------------------------------------------------
def test_read_message_lines_continuations_and_blocks():
    def reader(text):
        lines = iter(text.split("\n"))

        def read_line(prompt):
            try:
                return next(lines)
            except StopIteration:
                raise EOFError from None
        return read_line

    read = reader('\n\nhello\nfirst\\\nsecond\n"""\na\n\n/b\n"""\n"""one line"""\n"""start\nend"""\n/reset\nlast\\')
    assert read_message(read) == ("hello", False)              # empty lines before it are skipped
    assert read_message(read) == ("first\nsecond", False)      # a backslash continues the message
    assert read_message(read) == ("a\n\n/b", True)             # a block keeps empty lines and a /
    assert read_message(read) == ("one line", True)
    assert read_message(read) == ("start\nend", True)
    assert read_message(read) == ("/reset", False)
    assert read_message(read) == ("last", True)                # cut short by the end of input: still sent
    assert read_message(read) is None
    assert read_message(reader('"""\nunterminated')) == ("unterminated", True)


def test_chat_commands_change_the_conversation(capsys):
    session = ChatSession(llm=None, params=None, system="Be brief.", verbose=False)
    session.messages.append({"role": "user", "content": "hi"})
    assert session.command("/reset") and session.messages == [{"role": "system", "content": "Be brief."}]
    assert session.command("/system You are a pirate.")
    assert session.messages == [{"role": "system", "content": "You are a pirate."}]
    assert session.command("/system") and session.messages == []
    assert session.command("/help") and "/reset" in capsys.readouterr().err
    assert session.command("/nonsense") and "unknown command" in capsys.readouterr().err
    assert session.command("/exit") is False and session.command("/quit") is False


def test_cli_chat_session(llm):
    """One piped session: a \"\"\" block with an empty line, a backslash continuation, /system,
    /reset, /exit. Each reply equals the library's `chat` on the conversation the commands should
    have left (greedy), so a wrong history or system prompt shows as different text."""
    params = SamplingParams(temperature=0, max_tokens=12)
    script = ['"""', "Name the capital", "", "of France.", '"""',
              "What is 2+\\", "2?",
              "/system You are a pirate.", "Say hello.",
              "/reset", "", "What is 3+3?",
              "/exit", "What is 5+5?"]
    proc = lmengine("chat", "--max-tokens", "12", "--temperature", "0", "--n-ctx", str(N_CTX), "--verbose",
                    stdin="\n".join(script) + "\n")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr

    def answer(messages):
        return llm.chat(messages, params).text

    user1, user2 = "Name the capital\n\nof France.", "What is 2+\n2?"
    reply1 = answer([{"role": "user", "content": user1}])
    reply2 = answer([{"role": "user", "content": user1}, {"role": "assistant", "content": reply1},
                     {"role": "user", "content": user2}])
    pirate = {"role": "system", "content": "You are a pirate."}
    reply3 = answer([pirate, {"role": "user", "content": "Say hello."}])
    reply4 = answer([pirate, {"role": "user", "content": "What is 3+3?"}])
    # input() writes "> " before a message's first line and ". " before each further line; piped
    # input is not echoed, so a reply follows its prompts on the same line. A note on stderr (after
    # /system, /reset) and the end of the chat first end the open stdout line.
    expected = ("> " + ". " * 4 + reply1 + "\n" + "> . " + reply2 + "\n" + "> \n" + "> " + reply3 + "\n"
                + "> \n" + "> > " + reply4 + "\n" + "> \n")
    assert proc.stdout == expected, (proc.stdout, expected)
    assert "(system prompt set; new conversation)" in proc.stderr and "(new conversation)" in proc.stderr
    timings = [line for line in proc.stderr.splitlines() if line.startswith("prompt: ")]
    assert len(timings) == 4 and all("tok/s" in line for line in timings), proc.stderr


# -- info ---------------------------------------------------------------------------------------------
def test_info_on_the_bundled_model_and_on_onnx_exports(tmp_path, capsys):
    assert main(["info", "smollm2"]) == 0
    out = capsys.readouterr().out
    for needle in ("n_layers             30", "dim                  576", "n_heads              9",
                   "n_kv_heads           3", "vocab_size           49152", "Q4_1", "Q8_0"):
        assert needle in out
    kernels = next(line for line in out.splitlines() if line.startswith("kernels:"))
    if native.HAVE_NATIVE:
        assert f"C kernels loaded ({native.ISA_NAMES[native.get_isa()]} path)" in kernels
    else:
        assert "Numba kernels only" in kernels and "C compiler" in kernels

    # a folder that is no export: a plain error, not a listing
    (tmp_path / "notes.txt").write_text("hello")
    assert main(["info", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"lmengine: error: {tmp_path} is a directory but not an ONNX export of lmengine "
                          f"(no genai_config.json"), err
    (tmp_path / "model.onnx").write_bytes(b"not a protobuf")
    assert main(["info", str(tmp_path)]) == 1
    assert "model.onnx is not an LSTM export" in capsys.readouterr().err

    # a transformer export (genai_config.json + model.onnx; the tiny model has no tokenizer to save)
    from tiny_models import make_tiny_model

    from lmengine.config import config_from_gguf
    from lmengine.converters.gguf_file import GGUFFile
    from lmengine.converters.onnx_export import export_onnx
    make_tiny_model(tmp_path / "tiny.gguf", n_layers=2, dim=64, n_heads=4, n_kv_heads=2)
    f = GGUFFile(tmp_path / "tiny.gguf")
    export_onnx(f, config_from_gguf(f), str(tmp_path / "onnx"), weights="f32", progress=None)
    assert main(["info", str(tmp_path / "onnx")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ONNX export (transformer decoder") and "layers 2" in out and "kv heads 2" in out
    assert "genai_config.json" in out and "model.onnx" in out

    # an LSTM export (model.onnx carrying the lmengine.lstm metadata)
    import torch

    from lmengine.converters.onnx_lstm import export_lstm_onnx
    from lmengine.converters.torch_lstm import convert_torch_lstm
    torch.manual_seed(0)
    modules = {"embed": torch.nn.Embedding(20, 8), "rnn": torch.nn.LSTM(8, 16), "fc": torch.nn.Linear(16, 20)}
    state = {f"{prefix}.{name}": p for prefix, m in modules.items() for name, p in m.state_dict().items()}
    convert_torch_lstm(state, tmp_path / "lstm.gguf", [f"w{i}" for i in range(20)], progress=None)
    export_lstm_onnx(tmp_path / "lstm.gguf", tmp_path / "lstm", progress=None)
    assert main(["info", str(tmp_path / "lstm")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ONNX export (LSTM)") and "hidden_sizes" in out and "[16]" in out


def test_info_says_when_only_the_numba_kernels_run():
    """An install without the C extension (here: LMENGINE_NO_NATIVE=1) says so in `lmengine info`,
    with why and how to get the fast path."""
    env = dict(os.environ, LMENGINE_NO_NATIVE="1")
    info = subprocess.run([sys.executable, "-m", "lmengine", "info", "smollm2"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert info.returncode == 0, info.stderr[-2000:]
    kernels = next(line for line in info.stdout.splitlines() if line.startswith("kernels:"))
    assert "Numba kernels only" in kernels and "C compiler" in kernels and "prebuilt wheel" in kernels
