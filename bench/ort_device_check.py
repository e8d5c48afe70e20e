"""GPU check of the ONNX export and the onnxruntime backend, as one prepared script.

    python bench/ort_device_check.py --install                  # on a machine with an NVIDIA GPU
    python bench/ort_device_check.py --cpu-only --steps 4       # its CPU part, anywhere

Steps:
 1. --install: `pip install onnxruntime-gpu` (from --wheel-dir when the machine has no index),
    replacing the CPU-only onnxruntime (both install the `onnxruntime` module); then the script
    runs itself again in a fresh interpreter.
 2. Export MODEL (a .gguf path or "smollm2") to ONNX for each --weights kind, unless --export-dir
    already holds one (model.onnx + genai_config.json).
 3. Run a fixed prompt (prefill, every position's logits) and --steps greedy decode steps on
    CPUExecutionProvider and on the device provider (CUDAExecutionProvider), both through
    lmengine.backends.ort_backend.OrtBackend (KV cache kept on the device with IO binding), and
    compare the logits: relative error (max |a - b| / max |b|) against --tol.
 4. Decode throughput on the device for each --batch size (default 1 and 16): every sequence
    prefilled with the prompt, then --steps decode steps of the whole batch, tok/s = batch * steps
    / seconds.
Prints a table and writes --json. Exit status 1 when a logits check fails or the device provider
is missing, 0 otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

PROMPT = ("The lighthouse keeper woke before dawn, as he had every morning for thirty years. He climbed the "
          "spiral stairs and checked the lamp, the lens, and the small brass clock that never kept good time.")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2", help="a .gguf path or a bundled model name")
    p.add_argument("--weights", nargs="+", default=["f32", "int4"], choices=("f32", "int4"))
    p.add_argument("--contrib", type=int, nargs="+", default=[1, 0], choices=(0, 1),
                   help="graph flavours: 1 = onnxruntime contrib ops, 0 = standard ops")
    p.add_argument("--out", default="/tmp/ort_device_check", help="where the exports go")
    p.add_argument("--provider", default="CUDAExecutionProvider")
    p.add_argument("--cpu-only", action="store_true",
                   help="use CPUExecutionProvider as the 'device' (tests the script)")
    p.add_argument("--install", action="store_true", help="pip install onnxruntime-gpu first")
    p.add_argument("--wheel-dir", default=None, help="install from this folder of wheels (no index)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    p.add_argument("--steps", type=int, default=32, help="decode steps (logit check and throughput)")
    p.add_argument("--tol", type=float, default=None,
                   help="relative logits tolerance (default: 1e-4 on CPU; 2e-2 on a GPU, whose float32 "
                        "matmuls may use TF32 (10-bit mantissa), and int4 kernels their own order)")
    p.add_argument("--json", default=None, help="write the results here")
    return p.parse_args(argv)


def install(args) -> int:
    """Replace onnxruntime by onnxruntime-gpu, then run this script again without --install."""
    pip = [sys.executable, "-m", "pip"]
    subprocess.call(pip + ["uninstall", "-y", "onnxruntime"])
    cmd = pip + ["install", "onnxruntime-gpu"]
    if args.wheel_dir:
        cmd += ["--no-index", "--find-links", args.wheel_dir]
    print("+", " ".join(cmd), flush=True)
    if subprocess.call(cmd) != 0:
        print("error: could not install onnxruntime-gpu", file=sys.stderr)
        return 1
    argv = [a for a in sys.argv[1:] if a != "--install"]
    return subprocess.call([sys.executable, os.path.abspath(__file__)] + argv)


def export(args, weights: str, contrib: int) -> str:
    from lmengine.export import export_onnx_model
    out = os.path.join(args.out, f"{weights}_{'contrib' if contrib else 'standard'}")
    if not os.path.isfile(os.path.join(out, "genai_config.json")):
        t0 = time.perf_counter()
        export_onnx_model(args.model, out, weights=weights, use_contrib_ops=bool(contrib))
        print(f"exported {weights} ({'contrib' if contrib else 'standard'} ops) to {out} "
              f"in {time.perf_counter() - t0:.1f} s", flush=True)
    return out


def prompt_tokens(model_dir: str) -> list:
    """PROMPT through the export's tokenizer; 40 fixed ids when the export has none."""
    if os.path.isfile(os.path.join(model_dir, "tokenizer.json")):
        from lmengine.tokenizer import Tokenizer
        return Tokenizer.from_pretrained_dir(model_dir).encode(PROMPT)
    with open(os.path.join(model_dir, "genai_config.json"), encoding="utf-8") as f:
        vocab_size = json.load(f)["model"]["vocab_size"]
    return [int(t) for t in (np.arange(1, 41) * 7919 % vocab_size)]


def greedy_run(backend, prompt_ids, steps):
    """Logits of every prompt position, then of `steps` greedy decode steps: float32 [n + steps, vocab]."""
    rows = [backend.forward(0, np.array(prompt_ids), 0, all_logits=True)]
    token, pos = int(rows[0][-1].argmax()), len(prompt_ids)
    for _ in range(steps):
        rows.append(backend.forward(0, np.array([token]), pos))
        token, pos = int(rows[-1][-1].argmax()), pos + 1
    return np.concatenate(rows)


def decode_rate(backend, prompt_ids, batch, steps) -> float:
    """tok/s of `steps` decode steps for `batch` sequences at once."""
    for s in range(batch):
        if s == 0:
            backend.forward(0, np.array(prompt_ids), 0)
        else:
            backend.copy_slot(0, s, len(prompt_ids))
    slots = np.arange(batch)
    tokens = np.full(batch, prompt_ids[-1])
    positions = np.full(batch, len(prompt_ids) - 1)
    tokens = backend.forward_batch(slots, tokens, positions).argmax(axis=1)   # warm-up step
    positions = positions + 1
    t0 = time.perf_counter()
    for _ in range(steps):
        tokens = backend.forward_batch(slots, tokens, positions).argmax(axis=1)
        positions = positions + 1
    return batch * steps / (time.perf_counter() - t0)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.install:
        return install(args)
    import onnxruntime as ort

    from lmengine.backends.ort_backend import OrtBackend
    from lmengine.errors import LMEngineError
    device = "CPUExecutionProvider" if args.cpu_only else args.provider
    available = ort.get_available_providers()
    print(f"onnxruntime {ort.__version__}, providers: {', '.join(available)}", flush=True)
    if device not in available:
        print(f"error: {device} is not available (install onnxruntime-gpu: --install)", file=sys.stderr)
        return 1
    tol = args.tol if args.tol is not None else (1e-4 if device == "CPUExecutionProvider" else 2e-2)
    results, failed = [], False
    for weights in args.weights:
        for contrib in args.contrib:
            model_dir = export(args, weights, contrib)
            prompt_ids = prompt_tokens(model_dir)
            n_ctx = len(prompt_ids) + args.steps + 8
            row = {"weights": weights, "contrib_ops": bool(contrib), "provider": device,
                   "prompt_tokens": len(prompt_ids)}
            try:
                cpu = OrtBackend(model_dir, providers=["CPUExecutionProvider"], n_ctx=n_ctx)
                reference = greedy_run(cpu, prompt_ids, args.steps)
                cpu.close()
                providers = [device] + (["CPUExecutionProvider"] if device != "CPUExecutionProvider" else [])
                dev = OrtBackend(model_dir, providers=providers, n_ctx=n_ctx, n_slots=max(args.batch))
                t0 = time.perf_counter()
                got = greedy_run(dev, prompt_ids, args.steps)
                row["check_seconds"] = round(time.perf_counter() - t0, 3)
                err = float(np.abs(got - reference).max() / np.abs(reference).max())
                row["logits_rel_err"] = err
                row["greedy_equal"] = bool((got.argmax(axis=1) == reference.argmax(axis=1)).all())
                row["logits_ok"] = err <= tol
                failed |= not row["logits_ok"]
                for b in args.batch:
                    row[f"decode_tok_s_b{b}"] = round(decode_rate(dev, prompt_ids, b, args.steps), 1)
                dev.close()
            except LMEngineError as e:
                row["error"] = str(e)
                failed = True
            results.append(row)
            print(json.dumps(row), flush=True)

    print(f"\n| weights | graph | provider | logits rel err (tol {tol:g}) | greedy equal | "
          + " | ".join(f"decode tok/s b{b}" for b in args.batch) + " |")
    print("| --- " * (5 + len(args.batch)) + "|")
    for r in results:
        print(f"| {r['weights']} | {'contrib' if r['contrib_ops'] else 'standard'} | {r['provider']} | "
              f"{r.get('logits_rel_err', float('nan')):.2e} | {r.get('greedy_equal', r.get('error', '?'))} | "
              + " | ".join(str(r.get(f"decode_tok_s_b{b}", "-")) for b in args.batch) + " |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"onnxruntime": ort.__version__, "results": results}, f, indent=2)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
