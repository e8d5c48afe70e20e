"""The default backend: llama-family models run by Numba (and the C kernels behind lmengine.kernels.matmul)."""
from __future__ import annotations

import mmap
import os

import numba
import numpy as np

from ..errors import InvalidParameterError
from lmengine.kernels import native
from lmengine.kernels.attention import KEY_TILE, KV_DTYPES, cache_shapes
from lmengine.kernels.matmul import ACT_F32, ACT_INT8, ACT_INT8X2

from ..models.llama import LlamaWeights, llama_forward
from .base import Backend, batch_call, forward_calls, mixed_call

# Prompt tokens per compiled call: bounds the scratch memory of a long prefill
# (8 arrays of [chunk, ~ffn_dim] floats) without costing speed (weights are read once per chunk).
PREFILL_CHUNK = 256
MIXED_TOKENS = 2 * PREFILL_CHUNK    # tokens of one forward_mixed call: the server's chunk and its decode rows

# activations= choices: the activation precision of each matrix kind, in the order of
# `llama_forward`'s `acts` (q, k, v, attn_output, ffn_gate, ffn_up, ffn_down, output).
# "mixed": two int8 terms for the k and v projections, one elsewhere. Measured on zen.txt against
# float32 (f16 KV cache, three float summation orders: packed AVX-512, row-major AVX-512 and
# AVX2), with the two-term choice made per matrix kind:
#     two terms for           mean KL               top-1 (of 203)     multiply-adds over int8
#     k, v ("mixed")          0.011-0.013           94.1-95.6%         +2%
#     q, k, v, ffn_down       0.0056-0.0060         96.6-97.5%         +11%
#     k, v, ffn_down          0.0079-0.0086         96.6-98.0%         +8%
#     v                       0.011-0.012           94.1-95.6%         +1%
#     none ("int8")           0.022-0.034           91.6-93.6%
#     llama.cpp               0.023                 93.1%
# Values carry most of the gain: their rounding goes straight into every later position's
# attention output; keys' through the softmax. q, k, v, ffn_down was the default before; it costs
# about 10% of batched-decode and prompt throughput (those are bound by the multiply-adds) for
# half the KL of "mixed". Top-1 moves by a few tokens with any change of rounding in every mode. Single-stream decode (bound by reading the weights) is as fast in every
# int8 mode. "int8x2" is float32-accurate (KL < 1e-4).
ACTIVATIONS = {
    "mixed": (ACT_INT8, ACT_INT8X2, ACT_INT8X2) + (ACT_INT8,) * 5,
    "int8x2": (ACT_INT8X2,) * 8,
    "int8": (ACT_INT8,) * 8,
    "f32": (ACT_F32,) * 8,
}


def _lazy_zeros(shape, dtype):
    """An array of zeros whose memory is only taken as it is written, 4 KB at a time: an
    anonymous memory map. (np.zeros would do the same, but NumPy asks Linux for 2 MB huge pages
    on large arrays, so the first token of each (layer, slot, head) would take a whole 2 MB.)"""
    count = int(np.prod(shape))
    n_bytes = max(count * np.dtype(dtype).itemsize, 1)
    return np.frombuffer(mmap.mmap(-1, n_bytes), dtype=dtype, count=count).reshape(shape)


def physical_memory_bytes() -> int | None:
    """This machine's RAM (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def _check_cache_fits(k_shape, v_shape, dtype, n_ctx: int, n_slots: int) -> None:
    n_bytes = (int(np.prod(k_shape, dtype=np.float64)) + int(np.prod(v_shape, dtype=np.float64))) * np.dtype(dtype).itemsize
    ram = physical_memory_bytes()
    if ram is not None and n_bytes > ram:
        raise InvalidParameterError(
            f"n_ctx={n_ctx} with {n_slots} cache slots (max_batch_size + 1) needs a KV cache of "
            f"{n_bytes / 2**30:.1f} GiB when full, more than this machine's {ram / 2**30:.1f} GiB of "
            f"memory: use a smaller n_ctx or max_batch_size")


class NumbaLlamaBackend(Backend):
    """KV-cached llama forward. `activations` picks the matrix products' arithmetic (see
    ACTIVATIONS): "mixed" (default) two int8 terms per activation block for k and v, one
    elsewhere; "int8x2" two terms everywhere (float32 accuracy); "int8" one term as llama.cpp does;
    "f32" float32 activations against blocks decoded on the fly (the exact path).

    `kv_cache_dtype`: the element type of the KV cache, "f16" (as llama.cpp's default: half the
    memory, and half the memory traffic of attention, which dominates a batch of long sequences)
    or "f32"; "auto" (default) is "f32" on the exact path (activations="f32") and "f16" elsewhere.

    `pack`: whether the int8 paths read the matrices in the 16-row packed layout (built at load,
    kernels/csrc/packed.c); None (default) packs where it pays, on CPUs with AVX-512 VNNI and the
    C extension loaded. The "f32" path never packs."""

    supports_rewind = True

    def __init__(self, gguf_file, config, n_ctx: int, n_slots: int = 1, n_threads: int | None = None,
                 activations: str = "mixed", pack: bool | None = None, kv_cache_dtype: str = "auto"):
        self.config = config
        self.vocab_size = config.vocab_size
        self.n_ctx = int(n_ctx)
        self.n_slots = int(n_slots)
        if activations not in ACTIVATIONS:
            raise InvalidParameterError(f"activations must be one of {list(ACTIVATIONS)}, got {activations!r}")
        self.activations = activations
        self.acts = np.array(ACTIVATIONS[activations], dtype=np.int64)
        if kv_cache_dtype == "auto":
            kv_cache_dtype = "f32" if activations == "f32" else "f16"
        if kv_cache_dtype not in KV_DTYPES:
            raise InvalidParameterError(f"kv_cache_dtype must be one of {['auto', *KV_DTYPES]}, got {kv_cache_dtype!r}")
        self.kv_cache_dtype = kv_cache_dtype
        if pack is None:
            pack = native.packs_well()
        self.packed = bool(pack) and ACT_F32 not in ACTIVATIONS[activations]
        if self.packed and not native.HAVE_NATIVE:
            raise InvalidParameterError(f"pack=True needs the C kernels: {native.LOAD_ERROR}")
        # keys [n_layers, n_slots, n_kv_heads, n_tiles, head_dim, KEY_TILE] (transposed tiles of
        # positions), values [n_layers, n_slots, n_kv_heads, n_ctx, head_dim] (kernels/attention.py);
        # memory grows with the positions actually used (see _lazy_zeros), but a cache that could
        # not fit the machine if every slot filled up is refused before anything is allocated.
        k_shape, v_shape = cache_shapes(config.n_layers, self.n_slots, config.n_kv_heads, self.n_ctx,
                                        config.head_dim)
        _check_cache_fits(k_shape, v_shape, KV_DTYPES[kv_cache_dtype], self.n_ctx, self.n_slots)
        self.weights = LlamaWeights(gguf_file, config, pack=self.packed, n_ctx=self.n_ctx)
        self._gguf_file = gguf_file  # keeps the memory map alive
        self.k_cache = _lazy_zeros(k_shape, KV_DTYPES[kv_cache_dtype])
        self.v_cache = _lazy_zeros(v_shape, KV_DTYPES[kv_cache_dtype])
        # LLM.embed (engine/embed.py): final hidden states, pooled; a decoder's last token has read the whole text
        self.max_embed_tokens = self.n_ctx
        self.default_pooling = "last"
        self.hidden_size = int(config.dim)
        self.hidden_uses_slot = True    # hidden() writes K/V: embed_texts lends it a free cache slot
        self.set_threads(n_threads)

    @property
    def max_threads(self) -> int:
        return numba.config.NUMBA_NUM_THREADS   # Numba's pool: its size is fixed at start

    # -- Backend -------------------------------------------------------------------------------
    def forward(self, slot, token_ids, start_pos, all_logits=False):
        calls = forward_calls(token_ids, slot, start_pos, all_logits, vocab_size=self.vocab_size,
                              n_slots=self.n_slots, n_ctx=self.n_ctx, chunk=PREFILL_CHUNK)
        outputs = [self._run(*call) for call in calls]   # ids bounds-checked before compiled code reads
        return np.concatenate(outputs, axis=0) if len(outputs) > 1 else outputs[0]

    def forward_batch(self, slots, token_ids, positions):
        return self._run(*batch_call(slots, token_ids, positions, vocab_size=self.vocab_size,
                                     n_slots=self.n_slots, n_ctx=self.n_ctx))

    mixed_tokens = MIXED_TOKENS

    def forward_mixed(self, parts):
        if sum(len(ids) for _, ids, _, _ in parts) > self.mixed_tokens:
            raise InvalidParameterError(f"forward_mixed takes at most {self.mixed_tokens} tokens")
        tokens, slots, positions, rows = mixed_call(parts, vocab_size=self.vocab_size,
                                                    n_slots=self.n_slots, n_ctx=self.n_ctx)
        logits = self._run(tokens, slots, positions, rows)
        out, row = [], 0
        for _, _, _, wants in parts:
            out.append(logits[row] if wants else None)
            row += bool(wants)
        return out

    def hidden(self, tokens: np.ndarray, lengths: np.ndarray, *, slot: int) -> np.ndarray:
        """float32 [B, T, dim] final hidden states (after output_norm, before the output matrix) of
        int64 tokens [B, T], row b valid up to lengths[b]; padded positions are zero. Each text
        runs alone through cache `slot` (positions 0 .. lengths[b] - 1, PREFILL_CHUNK tokens per
        compiled call), so its vector never depends on the other texts of the batch. The slot's
        K/V are scratch afterwards: the caller lends a free slot and forgets its contents."""
        tokens = np.asarray(tokens)
        lengths = np.asarray(lengths, dtype=np.int64)
        B, T = tokens.shape
        out = np.zeros((B, T, self.config.dim), dtype=np.float32)
        for b in range(B):
            calls = forward_calls(tokens[b, :lengths[b]], slot, 0, True, vocab_size=self.vocab_size,
                                  n_slots=self.n_slots, n_ctx=self.n_ctx, chunk=PREFILL_CHUNK)
            for call in calls:
                begin = int(call[2][0])                  # the call's first position
                out[b, begin: begin + call[0].shape[0]] = self._run(*call, hidden=True)
        return out

    def warmup(self) -> None:
        """Run one token through the model (slot 0, position 0) so that the compiled code is
        loaded from the disk cache, or compiled on the first run, before the user's first
        request. The slot's contents are scratch afterwards (the caller's slot table is empty)."""
        self.forward(0, np.zeros(1, dtype=np.int64), 0)

    def copy_slot(self, src, dst, n_tokens):
        if src == dst:
            return
        n_tiles = -(-n_tokens // KEY_TILE)      # whole key tiles (the rest of the last is unused)
        self.k_cache[:, dst, :, :n_tiles] = self.k_cache[:, src, :, :n_tiles]
        self.v_cache[:, dst, :, :n_tokens] = self.v_cache[:, src, :, :n_tokens]

    def close(self):
        self.weights = None
        self._gguf_file = None

    # -- internals -----------------------------------------------------------------------------
    def _run(self, tokens, slots, positions, rows, hidden=False):
        """One compiled call: logits [len(rows), vocab] of rows `rows`, or with hidden=True their
        final hidden states [len(rows), dim] (the output matrix is skipped)."""
        dim = self.config.dim
        if hidden:
            logits = np.empty((0, self.vocab_size), dtype=np.float32)
            out = np.empty((rows.shape[0], dim), dtype=np.float32)
        else:
            logits = np.empty((rows.shape[0], self.vocab_size), dtype=np.float32)
            out = np.empty((0, dim), dtype=np.float32)
        numba.set_num_threads(self.n_threads)
        llama_forward(self.weights.model, tokens, slots, positions, rows, self.k_cache, self.v_cache, logits,
                      self.acts, out)
        return out if hidden else logits
