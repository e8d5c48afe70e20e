"""Backends of the `bert` encoder and of `gpt2` (engine/models/bert.py, gpt2.py).

`load_backend` is the LLM's hook for these architectures: it returns the tokenizer, the chat
template (None) and the backend. Both backends offer `hidden(tokens, lengths)`, the final hidden
states of a padded batch, which `engine/embed.py` pools into embeddings; GPT-2 also runs the
engine's generation contract (`Backend.forward` with a KV cache, see gpt2_backend.py). The BERT
backend has no next-token logits: `forward` raises, pointing at `LLM.embed`.

Threads: BERT runs every step of a batch on one pool of `n_threads` Python threads
(engine/models/row_threads.py), BLAS one-threaded inside it through threadpoolctl (without
threadpoolctl, which cannot be limited, the caller's thread alone runs the rows). GPT-2 gives
NumPy's BLAS `n_threads` threads. Numba's pool (GPT-2's LayerNorm and GELU, quantized
products) gets `n_threads` too.
"""
from __future__ import annotations

import numba
import numpy as np

from ..errors import InvalidParameterError
from ..models.linear import blas_limits_work, blas_threads
from ..models.row_threads import RowThreads
from .base import Backend


def load_backend(gguf_file, config, n_ctx: int, n_slots: int, n_threads: int | None):
    """(tokenizer, chat_template, backend) for a `bert` or `gpt2` GGUF."""
    from ..tokenizer import Tokenizer
    tokenizer = Tokenizer.from_gguf(gguf_file)
    if config.arch == "bert":
        return tokenizer, None, BertBackend(gguf_file, config, n_slots, n_threads)
    from ..chat import ChatTemplate
    from .gpt2_backend import GPT2Backend
    return tokenizer, ChatTemplate.from_gguf(gguf_file), GPT2Backend(gguf_file, config, n_ctx, n_slots, n_threads)


class BertBackend(Backend):
    """A `bert` encoder: hidden states of batches of token ids; no generation."""
    supports_rewind = True
    is_encoder = True

    def __init__(self, gguf_file, config, n_slots: int, n_threads: int | None):
        from ..models.bert import BertWeights
        self.config = config
        self.weights = BertWeights(gguf_file, config)
        self._gguf_file = gguf_file                 # keeps the memory map alive
        self.vocab_size = config.vocab_size
        self.n_ctx = config.max_seq_length
        self.n_slots = n_slots
        self.max_embed_tokens = config.max_seq_length   # texts are truncated to this (embed.py)
        self.default_pooling = config.pooling
        self.hidden_size = config.dim
        self._rows = None                           # RowThreads of n_threads, made at the first batch
        self.set_threads(n_threads)

    @property
    def max_threads(self) -> int:
        return numba.config.NUMBA_NUM_THREADS

    def hidden(self, tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """float32 [B, T, dim] hidden states of int64 tokens [B, T] (row b valid up to lengths[b])."""
        from ..models.bert import bert_hidden
        numba.set_num_threads(self.n_threads)
        n_rows_threads = self.n_threads if blas_limits_work() else 1
        if self._rows is None or self._rows.n_threads != n_rows_threads:
            if self._rows is not None:
                self._rows.close()
            self._rows = RowThreads(n_rows_threads)
        with blas_threads(1):
            return bert_hidden(self.weights, tokens, lengths, self._rows)

    def forward(self, slot, token_ids, start_pos, all_logits=False):
        raise InvalidParameterError(
            "this model is a bert encoder: it makes embeddings (LLM.embed, `lmengine embed`), not text")

    forward_batch = forward

    def copy_slot(self, src, dst, n_tokens):
        pass          # no per-sequence state

    def warmup(self) -> None:
        """Loads (or, on the very first run, compiles) the LayerNorm and GELU kernels."""
        self.hidden(np.zeros((1, 1), dtype=np.int64), np.ones(1, dtype=np.int64))

    def close(self) -> None:
        if self._rows is not None:
            self._rows.close()
            self._rows = None
        self.weights = None
        self._gguf_file = None
