"""K-quant quality on SmolLM2 (issue #13): our quantizer and engine against llama.cpp's.

    python -m lmengine.bench.kquant_quality [--types Q4_K_M Q5_K_M Q6_K] [--json out.json]

The float source is the bundled SmolLM2-135M Q4_1 file widened to F32 (every Q4_1 / Q8_0 value
is exactly a float32, so nothing is lost). No Hugging Face weights are reachable offline, so this
measures the quantizers and kernels on the model's own values, not the loss from the original
bf16 weights. The F32 file is written once under --cache; each type is then quantized with
`lmengine.converters.quantize` (ours) and with llama.cpp's `llama_model_quantize` (llama-cpp-
python), and the two files' tensor bytes are compared.

Over the tokens of zen.txt (the text of the zen.txt quality tests, tokenized by our tokenizer),
against the reference, our exact path on the F32 file (activations="f32", f32 KV cache: it
matches HF transformers float32 to 1e-4, see tests/integration/test_llama_smollm2.py), with
logits at every position, each row reports mean KL(reference || row), top-1 agreement and
perplexity (`lmengine.bench.quality`) for:

    lmengine default path (activations="mixed", f16 KV) on our file and on llama.cpp's file,
    lmengine exact path (activations="f32") on our file (the quantization's own loss),
    llama.cpp (logits_all, --threads) on its file and on ours,
    llama.cpp on the F32 file (its float error floor: f16 KV cache, float products).

Progress goes to stderr; a markdown table to stdout; --json writes everything with the date,
commit, command and load average (tests/data/kquant_quality_smollm2.json is such a file: the
CI test tests/integration/test_kquant_quality.py reads llama.cpp's figures from it).
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from typing import Callable, Iterator, Sequence

import numpy as np

from lmengine import LLM
from lmengine.bench.quality import LogitQuality, logit_quality
from lmengine.converters.gguf_file import GGUFFile
from lmengine.converters.quantize import quantize_gguf
from lmengine.models.registry import resolve_model

DEFAULT_TYPES = ("Q4_K_M", "Q5_K_M", "Q6_K")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_TEXT = os.path.normpath(os.path.join(REPO_ROOT, "..", "shared", "reference", "zen.txt"))
DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "lmengine", "kquant_quality")

# The rows of the table, in order: key -> what it is.
ROWS = {
    "lmengine_default_ours": "lmengine default (mixed, f16 KV) on our file",
    "lmengine_default_llama_cpp": "lmengine default (mixed, f16 KV) on llama.cpp's file",
    "lmengine_exact_ours": "lmengine exact (f32 activations, f32 KV) on our file",
    "llama_cpp_llama_cpp": "llama.cpp on llama.cpp's file",
    "llama_cpp_ours": "llama.cpp on our file",
}


def log(msg: str) -> None:
    """One progress line on stderr."""
    print(f"[kquant_quality {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- files --------------------------------------------------------------------------------------

def build_float_source(folder: str, model: str = "smollm2") -> str:
    """FOLDER/smollm2-F32.gguf: the bundled model's weights widened to F32 (made once; rebuilt
    when the bundled file is newer). Returns its path."""
    src = resolve_model(model)
    dst = os.path.join(folder, f"{model}-F32.gguf")
    if os.path.exists(dst) and os.path.getmtime(dst) >= os.path.getmtime(src):
        return dst
    os.makedirs(folder, exist_ok=True)
    log(f"widening {os.path.basename(src)} to F32 -> {dst}")
    quantize_gguf(src, dst, "F32", allow_requantize=True, force=True)
    return dst


def quantize_ours(src: str, dst: str, type_name: str) -> float:
    """Quantize SRC to DST (replacing it) with lmengine's quantizer; returns the seconds taken."""
    t0 = time.perf_counter()
    quantize_gguf(src, dst, type_name, force=True)
    return time.perf_counter() - t0


@contextlib.contextmanager
def c_stderr_to(path: str) -> Iterator[None]:
    """Send file descriptor 2 (C libraries' stderr) to PATH for the block: llama.cpp's quantizer
    prints a line per tensor that would bury the progress lines."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "ab") as fh:
        os.dup2(fh.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def quantize_llama_cpp(src: str, dst: str, type_name: str, threads: int | None, log_path: str) -> float:
    """Quantize SRC to DST with llama.cpp's llama_model_quantize (no importance matrix, as ours);
    returns the seconds taken. Raises RuntimeError when llama.cpp reports a failure."""
    import llama_cpp
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{type_name}")
    params.nthread = threads or 0          # 0: all cores
    t0 = time.perf_counter()
    with c_stderr_to(log_path):
        rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({src} -> {dst}, {type_name}) returned {rc}; see {log_path}")
    return time.perf_counter() - t0


def same_tensor_bytes(a: str, b: str) -> bool:
    """Whether two GGUF files hold the same tensors with the same types and bytes (in any order)."""
    fa, fb = GGUFFile(a), GGUFFile(b)
    try:
        if set(fa.tensors) != set(fb.tensors):
            return False
        return all(fa.tensors[n].type_name == fb.tensors[n].type_name
                   and np.array_equal(fa.tensor_bytes(n), fb.tensor_bytes(n)) for n in fa.tensors)
    finally:
        fa.close()
        fb.close()


def tensor_type_counts(path: str) -> dict:
    """{type name: number of tensors} of a GGUF."""
    f = GGUFFile(path)
    try:
        return dict(collections.Counter(i.type_name for i in f.tensors.values()).most_common())
    finally:
        f.close()


# -- logits -------------------------------------------------------------------------------------

def lmengine_logits(path: str, ids: Sequence[int], threads: int | None, activations: str = "mixed",
                    kv_cache_dtype: str = "auto") -> np.ndarray:
    """float32 [len(ids), vocab]: lmengine's logits at every position of ids (threads None: all
    cores)."""
    with LLM(path, n_ctx=max(256, len(ids) + 1), n_threads=threads, max_batch_size=1,
             activations=activations, kv_cache_dtype=kv_cache_dtype, warmup=False) as llm:
        return llm.logits(list(ids))


def reference_logits(f32_path: str, ids: Sequence[int], threads: int | None) -> np.ndarray:
    """The reference: our exact path (f32 activations, f32 KV cache) on the F32 file."""
    return lmengine_logits(f32_path, ids, threads, activations="f32", kv_cache_dtype="f32")


def llama_cpp_logits(path: str, ids: Sequence[int], threads: int | None) -> np.ndarray:
    """float32 [len(ids), vocab]: llama.cpp's logits at every position of ids (one batch;
    threads None: all cores)."""
    import llama_cpp
    threads = threads or os.cpu_count() or 1
    llm = llama_cpp.Llama(model_path=path, n_ctx=max(256, len(ids) + 1), n_batch=512,
                          n_threads=threads, n_threads_batch=threads, logits_all=True, verbose=False)
    try:
        llm.eval(list(ids))
        return np.array(llm.scores[:len(ids)], dtype=np.float32)
    finally:
        llm.close()


def zen_token_ids(f32_path: str, text_path: str) -> list:
    """The text's token ids from our tokenizer (as tests/integration/test_llama_smollm2.py)."""
    with open(text_path, encoding="utf-8") as fh:
        text = fh.read()
    with LLM(f32_path, n_ctx=256, max_batch_size=1, warmup=False) as llm:
        return llm.tokenizer.encode(text)


def have_llama_cpp() -> bool:
    """Whether llama-cpp-python can be imported."""
    import importlib.util
    return importlib.util.find_spec("llama_cpp") is not None


# -- the run ------------------------------------------------------------------------------------

def measure_type(type_name: str, f32_path: str, cache: str, ids: Sequence[int], ref: np.ndarray,
                 threads: int, with_llama_cpp: bool) -> dict:
    """Quantize the F32 file to type_name both ways and score every row of ROWS against ref."""
    ours = os.path.join(cache, f"ours-{type_name}.gguf")
    log(f"{type_name}: quantizing with lmengine")
    result: dict = {"quantize_seconds": {"lmengine": round(quantize_ours(f32_path, ours, type_name), 2)},
                    "tensor_types": tensor_type_counts(ours), "rows": {}}
    rows = result["rows"]
    logits: dict = {}

    def score(key: str, logits_fn: Callable[[], np.ndarray]) -> None:
        log(f"{type_name}: {ROWS[key]}")
        t0 = time.perf_counter()
        logits[key] = logits_fn()
        q: LogitQuality = logit_quality(ref, logits[key], ids)
        rows[key] = q.as_dict()
        log(f"{type_name}: {ROWS[key]}: {q} ({time.perf_counter() - t0:.1f} s)")

    score("lmengine_default_ours", lambda: lmengine_logits(ours, ids, threads))
    score("lmengine_exact_ours", lambda: lmengine_logits(ours, ids, threads, "f32", "f32"))
    if with_llama_cpp:
        theirs = os.path.join(cache, f"llama_cpp-{type_name}.gguf")
        log(f"{type_name}: quantizing with llama.cpp")
        result["quantize_seconds"]["llama_cpp"] = round(quantize_llama_cpp(
            f32_path, theirs, type_name, threads, os.path.join(cache, "llama_cpp_quantize.log")), 2)
        result["same_tensor_bytes"] = same_tensor_bytes(ours, theirs)
        log(f"{type_name}: our tensor bytes {'equal' if result['same_tensor_bytes'] else 'DIFFER FROM'} "
            f"llama.cpp's")
        score("lmengine_default_llama_cpp", lambda: lmengine_logits(theirs, ids, threads))
        score("llama_cpp_llama_cpp", lambda: llama_cpp_logits(theirs, ids, threads))
        score("llama_cpp_ours", lambda: llama_cpp_logits(ours, ids, threads))
    # Each engine's own arithmetic error: against the exact path on the same quantized file, so
    # the quantization's loss (shared by every row) drops out.
    exact = logits["lmengine_exact_ours"]
    result["vs_exact_same_file"] = {
        key: logit_quality(exact, logits[key], ids).as_dict()
        for key in ("lmengine_default_ours", "llama_cpp_ours") if key in logits}
    for key, row in result["vs_exact_same_file"].items():
        log(f"{type_name}: {ROWS[key]} against the exact path on the same file: "
            f"KL {row['mean_kl']:.4f} top-1 {100 * row['top1_agree']:.1f}%")
    return result


def git_commit() -> str | None:
    """HEAD of the repository this module sits in ("+dirty" with uncommitted changes), or None."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, text=True,
                              capture_output=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               text=True, capture_output=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


def markdown_table(results: dict) -> str:
    """The README table: one line per type, KL / top-1 / ppl for each row that was measured."""
    keys = [k for k in ROWS if any(k in r["rows"] for r in results["types"].values())]
    lines = ["| type | " + " | ".join(f"{ROWS[k]}: KL / top-1 / ppl" for k in keys) + " |",
             "| --- |" + " --- |" * len(keys)]

    def cell(row: dict | None) -> str:
        if row is None:
            return ""
        return f"{row['mean_kl']:.4f} / {100 * row['top1_agree']:.1f}% / {row['ppl']:.2f}"

    for type_name, r in results["types"].items():
        lines.append(f"| {type_name} | " + " | ".join(cell(r["rows"].get(k)) for k in keys) + " |")
    if "llama_cpp_f32" in results:
        lines.append("| F32 (llama.cpp's float floor) | " + " | ".join(
            cell(results["llama_cpp_f32"]) if k == "llama_cpp_llama_cpp" else "" for k in keys) + " |")
    arithmetic = [(t, r["vs_exact_same_file"]) for t, r in results["types"].items()]
    if any(a for _, a in arithmetic):
        lines += ["", "Each engine against the exact path on the same quantized file (its arithmetic alone):",
                  "", "| type | lmengine default: KL / top-1 | llama.cpp: KL / top-1 |", "| --- | --- | --- |"]
        for type_name, a in arithmetic:
            lines.append(f"| {type_name} | " + " | ".join(
                f"{a[k]['mean_kl']:.4f} / {100 * a[k]['top1_agree']:.1f}%" if k in a else ""
                for k in ("lmengine_default_ours", "llama_cpp_ours")) + " |")
    return "\n".join(lines)


def run(types: Sequence[str], cache: str, text_path: str, threads: int, with_llama_cpp: bool,
        command: str) -> dict:
    """Everything the script measures, as the JSON it writes."""
    if not os.path.isfile(text_path):
        raise FileNotFoundError(f"text file {text_path} not found (pass --text)")
    f32_path = build_float_source(cache)
    ids = zen_token_ids(f32_path, text_path)
    log(f"{len(ids)} tokens of {text_path}; reference: lmengine exact path on the F32 file "
        f"(the first run compiles kernels: minutes)")
    ref = reference_logits(f32_path, ids, threads)
    results: dict = {
        "command": command,
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "commit": git_commit(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "threads": threads,
        "source": "the bundled SmolLM2-135M-Instruct Q4_1 GGUF widened to F32 (exact); no HF weights offline",
        "text": os.path.basename(text_path),
        "n_tokens": len(ids),
        "reference": {"engine": "lmengine activations=f32, kv_cache_dtype=f32, F32 file",
                      "ppl": logit_quality(ref, ref, ids).ppl},
        "rows": dict(ROWS),
        "llama_cpp_version": None,
        "types": {},
    }
    if with_llama_cpp:
        import llama_cpp
        results["llama_cpp_version"] = llama_cpp.__version__
        log("llama.cpp on the F32 file (its float floor)")
        q = logit_quality(ref, llama_cpp_logits(f32_path, ids, threads), ids)
        results["llama_cpp_f32"] = q.as_dict()
        log(f"llama.cpp on F32: {q}")
    for type_name in types:
        results["types"][type_name] = measure_type(type_name, f32_path, cache, ids, ref, threads,
                                                   with_llama_cpp)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lmengine.bench.kquant_quality", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--types", nargs="+", default=list(DEFAULT_TYPES), metavar="TYPE",
                    help=f"file types to quantize to (default: {' '.join(DEFAULT_TYPES)})")
    ap.add_argument("--json", metavar="OUT", help="write the results here")
    ap.add_argument("--cache", default=DEFAULT_CACHE,
                    help="folder for the F32 and quantized files (default: %(default)s)")
    ap.add_argument("--text", default=DEFAULT_TEXT, help="the text to score (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=2, help="threads for both engines (default: 2)")
    ap.add_argument("--no-llama-cpp", action="store_true", help="measure lmengine only")
    args = ap.parse_args(argv)
    with_llama_cpp = not args.no_llama_cpp and have_llama_cpp()
    if not args.no_llama_cpp and not with_llama_cpp:
        log("llama-cpp-python is not installed: lmengine rows only")
    command = "python -m lmengine.bench.kquant_quality " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    results = run(args.types, args.cache, args.text, args.threads, with_llama_cpp, command.strip())
    print(markdown_table(results))
    if args.json:
        directory = os.path.dirname(os.path.abspath(args.json))
        fd, tmp = tempfile.mkstemp(dir=directory, suffix=".json.tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(results, fh, indent=1)
            fh.write("\n")
        os.replace(tmp, args.json)
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
