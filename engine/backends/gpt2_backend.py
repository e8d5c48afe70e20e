"""The `gpt2` backend: the engine's Backend contract (slots, KV cache, batched decode) over
engine/models/gpt2.py, plus `hidden` for LLM.embed.

KV cache: k_cache, v_cache float32 [n_slots, n_layers, n_ctx, dim], anonymous memory maps, so
memory is taken only for the positions written. n_ctx cannot pass the model's learned positions
(gpt2.context_length).
"""
from __future__ import annotations

import numba
import numpy as np

from ..errors import ContextLengthError
from ..models.gpt2 import GPT2Weights, gpt2_hidden, gpt2_step
from ..models.linear import blas_threads
from .base import Backend, batch_call, forward_calls
from .numba_backend import _lazy_zeros

PREFILL_CHUNK = 512       # prompt tokens per forward (bounds the [heads, m, n_keys] scores)


class GPT2Backend(Backend):
    """GPT-2 over a per-slot float32 KV cache."""
    supports_rewind = True

    def __init__(self, gguf_file, config, n_ctx: int, n_slots: int, n_threads: int | None):
        if n_ctx > config.n_ctx_train:
            raise ContextLengthError(f"n_ctx={n_ctx} is beyond gpt2's {config.n_ctx_train} learned positions")
        self.config = config
        self.weights = GPT2Weights(gguf_file, config)
        self._gguf_file = gguf_file
        self.vocab_size, self.n_ctx, self.n_slots = config.vocab_size, n_ctx, n_slots
        shape = (n_slots, config.n_layers, n_ctx, config.dim)
        self.k_cache = _lazy_zeros(shape, np.float32)
        self.v_cache = _lazy_zeros(shape, np.float32)
        self.max_embed_tokens = config.n_ctx_train
        self.default_pooling = "last"
        self.hidden_size = config.dim
        self.set_threads(n_threads)

    @property
    def max_threads(self) -> int:
        return numba.config.NUMBA_NUM_THREADS

    def _run(self, tokens, slots, positions, rows):
        numba.set_num_threads(self.n_threads)
        with blas_threads(self.n_threads):
            return gpt2_step(self.weights, tokens, slots, positions, rows, self.k_cache, self.v_cache)

    def forward(self, slot, token_ids, start_pos, all_logits=False):
        calls = forward_calls(token_ids, slot, start_pos, all_logits, vocab_size=self.vocab_size,
                              n_slots=self.n_slots, n_ctx=self.n_ctx, chunk=PREFILL_CHUNK)
        return np.concatenate([self._run(*call) for call in calls], axis=0)

    def forward_batch(self, slots, token_ids, positions):
        return self._run(*batch_call(slots, token_ids, positions, vocab_size=self.vocab_size,
                                     n_slots=self.n_slots, n_ctx=self.n_ctx))

    def hidden(self, tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """float32 [B, T, dim] final hidden states (after output_norm) of a padded batch."""
        numba.set_num_threads(self.n_threads)
        with blas_threads(self.n_threads):
            return gpt2_hidden(self.weights, tokens, lengths)

    def copy_slot(self, src, dst, n_tokens):
        if src != dst:
            self.k_cache[dst, :, :n_tokens] = self.k_cache[src, :, :n_tokens]
            self.v_cache[dst, :, :n_tokens] = self.v_cache[src, :, :n_tokens]

    def warmup(self) -> None:
        self.forward(0, np.zeros(1, dtype=np.int64), 0)

    def close(self) -> None:
        self.weights = None
        self._gguf_file = None
