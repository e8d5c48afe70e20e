"""Train a small character LSTM language model with PyTorch, convert it to GGUF, generate with lmengine.

    python examples/train_char_lstm.py                 # ~1 minute of training on a CPU
    python examples/train_char_lstm.py --seconds 20 --out out/char_lstm

1. Text: a corpus of simple English sentences generated here from a small grammar (deterministic,
   ~100 KB), so the example needs no download.
2. Model: Embedding(vocab, 32) -> nn.LSTM(32, 128, batch_first=True) -> Linear(128, vocab),
   trained with cross-entropy (Adam) on random 64-character windows, 32 per step.
3. Files: model.pt (the state_dict), vocab.json (the characters, index = id) and description.json
   ({"vocab": "vocab.json", "batch_first": true}), then model.gguf via the same converter as
       lmengine convert out/char_lstm/model.pt out/char_lstm/model.gguf --description out/char_lstm/description.json
4. Generation: greedy text from lmengine equals PyTorch's own greedy continuation; then sampling.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SUBJECTS = ["the cat", "a dog", "the old man", "my sister", "the little bird", "a farmer", "the teacher",
            "our neighbour", "the young girl", "a tired sailor"]
VERBS = ["sees", "likes", "finds", "paints", "follows", "remembers", "carries", "visits", "watches"]
OBJECTS = ["the red house", "a green apple", "the river", "an old boat", "the tall tree", "a small garden",
           "the quiet village", "the morning sun", "a wooden bridge", "the dark forest"]
ENDINGS = ["", " every day", " in the rain", " at night", " with a smile", " near the sea", " after dinner"]


def make_corpus(n_sentences: int = 3000, seed: int = 0) -> str:
    """Sentences from the grammar above, four to a line."""
    rng = random.Random(seed)
    lines, line = [], []
    for _ in range(n_sentences):
        sentence = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}{rng.choice(ENDINGS)}."
        line.append(sentence[0].upper() + sentence[1:])
        if len(line) == 4:
            lines.append(" ".join(line))
            line = []
    return "\n".join(lines) + "\n"


class CharLSTM(torch.nn.Module):
    def __init__(self, vocab: int, emb: int = 32, hidden: int = 128):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, emb)
        self.lstm = torch.nn.LSTM(emb, hidden, batch_first=True)
        self.fc = torch.nn.Linear(hidden, vocab)

    def forward(self, ids, state=None):                   # ids [b, s] -> logits [b, s, vocab]
        y, state = self.lstm(self.embed(ids), state)
        return self.fc(y), state


def train(model: CharLSTM, data: np.ndarray, seconds: float, seq_len=64, batch=32, lr=1e-2, seed=0) -> int:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = torch.nn.CrossEntropyLoss()
    start, step = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        starts = rng.integers(0, len(data) - seq_len - 1, size=batch)
        window = torch.from_numpy(np.stack([data[s:s + seq_len + 1] for s in starts]))
        logits, _ = model(window[:, :-1])
        loss = loss_fn(logits.reshape(-1, logits.shape[-1]), window[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step += 1
        if step % 100 == 0:
            print(f"step {step:5d}  loss {loss.item():.3f}  ({time.perf_counter() - start:.0f} s)", flush=True)
    return step


@torch.inference_mode()
def torch_greedy(model: CharLSTM, prompt_ids: list, n: int) -> list:
    """PyTorch's own greedy continuation, stepping nn.LSTM one token at a time."""
    logits, state = model(torch.tensor([prompt_ids]))
    out = []
    for _ in range(n):
        token = int(logits[0, -1].argmax())
        out.append(token)
        logits, state = model(torch.tensor([[token]]), state)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=60.0, help="training time budget")
    p.add_argument("--out", default=os.path.join("out", "char_lstm"), help="output directory")
    p.add_argument("--prompt", default="The old man ")
    p.add_argument("--threads", type=int, default=1,
                   help="PyTorch training threads (a model this small gains little from more)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)

    text = make_corpus()
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    data = np.array([index[c] for c in text], dtype=np.int64)
    print(f"corpus: {len(text)} characters, {len(chars)} distinct")

    model = CharLSTM(len(chars))
    steps = train(model, data, args.seconds)
    model.eval()
    print(f"trained {steps} steps")

    # The files a user has: a state_dict, its vocabulary, and a description of what the converter
    # cannot infer (here only where the vocabulary is).
    state_path, gguf_path = os.path.join(args.out, "model.pt"), os.path.join(args.out, "model.gguf")
    torch.save(model.state_dict(), state_path)
    with open(os.path.join(args.out, "vocab.json"), "w", encoding="utf-8") as fh:
        json.dump({"type": "char", "tokens": chars}, fh, ensure_ascii=False)
    with open(os.path.join(args.out, "description.json"), "w", encoding="utf-8") as fh:
        json.dump({"vocab": "vocab.json", "batch_first": True}, fh)

    from lmengine.converters.lstm_import import convert_lstm_model    # what `lmengine convert` runs
    convert_lstm_model(state_path, gguf_path, description=os.path.join(args.out, "description.json"))

    from lmengine import LLM, SamplingParams
    llm = LLM(gguf_path, n_threads=args.threads)
    greedy = llm.generate(args.prompt, SamplingParams(temperature=0, max_tokens=120))
    expected = "".join(chars[i] for i in torch_greedy(model, [index[c] for c in args.prompt], 120))
    print(f"\nlmengine greedy: {args.prompt}{greedy.text}")
    print(f"PyTorch  greedy: {args.prompt}{expected}")
    print("greedy text matches PyTorch" if greedy.text == expected else "greedy text DIFFERS from PyTorch")
    print("\nthree samples (temperature 0.8) of 'The ':")
    for out in llm.generate("The ", SamplingParams(temperature=0.8, max_tokens=100, n=3, seed=1)).outputs:
        print("  The " + out.text.replace("\n", " / "))
    print(f"\nperplexity of a held-out line: {llm.perplexity(make_corpus(8, seed=99).splitlines()[0]):.2f}")
    return 0 if greedy.text == expected else 1


if __name__ == "__main__":
    sys.exit(main())
