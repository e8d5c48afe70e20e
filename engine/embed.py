"""Sentence embeddings: `LLM.embed(texts)` -> float32 [n, dim].

    texts --tokenize--> ids (truncated) --sort by length, batch, pad--> backend.hidden [B, T, dim]
          --pool (mean over the real tokens | CLS = first | last real token)--> [n, dim]
          --L2-normalize (optional)--> [n, dim] in the order of `texts`

* Tokens: the tokenizer's own encoding; for a `bert` model "[CLS] text [SEP]".
* Truncation: a text longer than the backend's `max_embed_tokens` keeps its first tokens and, when
  the tokenizer adds an end token ([SEP]), that end token: bert -> [CLS] + the first (max - 2)
  pieces + [SEP], exactly as Hugging Face tokenizers truncate for sentence-transformers
  (all-MiniLM-L6-v2: 256 tokens, `bert.embedding.max_seq_length`). Truncation is silent, as it is
  in sentence-transformers; `embed(..., return_lengths=True)`-style reporting is not offered.
* Batching: texts are sorted by length and run `batch_size` at a time (and at most
  MAX_BATCH_TOKENS padded tokens), so padding stays small; attention never reads padded
  positions, so a text's vector does not depend on its batch.
* Pooling: the model's (GGUF `bert.pooling_type`), or `pooling=` "mean" | "cls" | "last".
  Decoder models (gpt2, and the llama family: llama, qwen2, qwen3, gemma2/3, phi3) default to
  "last" (the final token has read the whole text). The llama family keeps K/V while it runs: each
  text runs alone through a cache slot borrowed as LLM.logits() borrows one (see `_hidden`).
* normalize: divide by the L2 norm (a zero vector stays zero), as sentence-transformers'
  Normalize module does.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .errors import InvalidParameterError

POOLINGS = ("mean", "cls", "last")
DEFAULT_BATCH_SIZE = 32
MAX_BATCH_TOKENS = 8192      # padded tokens per forward (bounds the [B, heads, T, T] scores)


def embed_texts(llm, texts: str | Sequence[str], normalize: bool = True, pooling: str | None = None,
                batch_size: int = DEFAULT_BATCH_SIZE,
                return_counts: bool = False) -> np.ndarray | tuple[np.ndarray, list[int]]:
    """Embeddings float32 [len(texts), dim] of `texts` (a str counts as a list of one) with the
    model of `llm`. See the module docstring for truncation, batching and pooling.
    return_counts: return (embeddings, tokens computed per text, after truncation) instead, so a
    caller that reports token usage (the server's /v1/embeddings) does not encode twice."""
    backend = llm.backend
    if not hasattr(backend, "hidden"):
        raise InvalidParameterError(f"{type(backend).__name__} cannot embed: LLM.embed runs on bert, gpt2 and "
                                    f"llama-family GGUF models")
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, Sequence) or not all(isinstance(t, str) for t in texts):
        raise InvalidParameterError("embed() takes a str or a list of str")
    if pooling is None:
        pooling = backend.default_pooling
    if pooling not in POOLINGS:
        raise InvalidParameterError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidParameterError(f"batch_size must be a positive integer, got {batch_size!r}")
    llm.check_open()
    out = np.zeros((len(texts), backend.hidden_size), dtype=np.float32)
    if not texts:
        return (out, []) if return_counts else out
    ids = [truncate(llm.tokenizer, llm.tokenizer.encode(t), backend.max_embed_tokens)
           for t in texts]
    for i, seq in enumerate(ids):
        if not seq:
            raise InvalidParameterError(f"embed(): text {i} has no tokens (an empty text, and this "
                                        f"tokenizer adds no begin/end token)")
        llm.check_token_ids(seq, "embed token id")
    for batch in _batches(ids, batch_size):
        lengths = np.array([len(ids[i]) for i in batch], dtype=np.int64)
        tokens = np.full((len(batch), int(lengths.max())), _pad_id(llm.tokenizer), dtype=np.int64)
        for row, i in enumerate(batch):
            tokens[row, :lengths[row]] = ids[i]
        hidden = _hidden(llm, tokens, lengths)            # [B, T, dim]
        out[batch] = pool(hidden, lengths, pooling)
    if normalize:
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        out /= np.maximum(norms, np.float32(1e-12))
    return (out, [len(seq) for seq in ids]) if return_counts else out


def _hidden(llm, tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """backend.hidden [B, T, dim]. A backend that writes K/V while it embeds (hidden_uses_slot:
    the llama family) gets a free cache slot, taken and given back under the scheduler's lock as
    LLM.logits() does, so no request's cached tokens are touched; the slot's contents are forgotten."""
    backend = llm.backend
    if not getattr(backend, "hidden_uses_slot", False):
        return backend.hidden(tokens, lengths)
    with llm.scheduler.lock:
        slot = llm.acquire_slot(or_raise=True)
        try:
            return backend.hidden(tokens, lengths, slot=slot)
        finally:
            llm.slots.invalidate(slot)
            llm.release_slot(slot)


def truncate(tokenizer, ids: list[int], max_tokens: int) -> list[int]:
    """ids cut to max_tokens, keeping the end token the tokenizer appended (bert's [SEP])."""
    if len(ids) <= max_tokens:
        return ids
    if getattr(tokenizer, "add_eos", False) and ids[-1] == tokenizer.eos_id:
        return ids[:max_tokens - 1] + [ids[-1]]
    return ids[:max_tokens]


def pool(hidden: np.ndarray, lengths: np.ndarray, pooling: str) -> np.ndarray:
    """[B, T, dim] hidden states -> [B, dim]: mean over each row's first lengths[b] tokens, its
    first token ("cls"), or its last real token ("last")."""
    B, T, _ = hidden.shape
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "last":
        return hidden[np.arange(B), lengths - 1]
    mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.float32)      # [B, T]
    return np.einsum("bt,btd->bd", mask, hidden) / lengths[:, None].astype(np.float32)


def _batches(ids: list[list[int]], batch_size: int) -> list[list[int]]:
    """Indices of ids grouped by length (shortest first), batch_size and MAX_BATCH_TOKENS per group."""
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        width = len(ids[i])        # the longest so far (sorted)
        if current and (len(current) == batch_size or (len(current) + 1) * width > MAX_BATCH_TOKENS):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def _pad_id(tokenizer) -> int:
    pad = getattr(tokenizer, "pad_id", None)
    return int(pad) if pad is not None else 0
