"""Backends for LSTM language models: Numba (default) and onnxruntime, on the same slot logic.

The cache of an LSTM is its recurrent state: h and c of every layer, per slot. A slot holds the
state after tokens [0, n) of its sequence and can only be extended (start_pos == n) or reset
(start_pos == 0); `supports_rewind` is False. One more case is allowed so that an engine that
recomputes the last cached token (to get its logits) works unchanged: start_pos == n - 1 with that
same token again returns the logits remembered from the last step, without touching the state.

Both backends keep the state as float32 [n_slots, sum(H)] arrays (layer l at the columns
config.state_offsets[l] .. [l+1]) and differ only in `_run`, the forward pass of a batch.
"""
from __future__ import annotations

import json
import os
from abc import abstractmethod

import numba
import numpy as np
from numba import njit

from lmengine.converters.gguf_file import GGUFFile
from lmengine.kernels.lstm import lstm_forward

from ..errors import BackendError, ContextLengthError, InvalidParameterError
from ..config import LSTMConfig
from ..models.lstm import LSTMWeights
from ..validation import check_token_ids
from .base import Backend


class RecurrentBackend(Backend):
    """Slot bookkeeping of a recurrent model: lengths, the extend/reset rule, the remembered
    last logits. Subclasses implement `_run`."""

    supports_rewind = False

    def __init__(self, vocab_size: int, state_size: int, n_ctx: int, n_slots: int):
        if not isinstance(n_slots, (int, np.integer)) or n_slots < 1:
            raise InvalidParameterError(f"n_slots must be a positive integer, got {n_slots!r}")
        if not isinstance(n_ctx, (int, np.integer)) or n_ctx < 1:
            raise InvalidParameterError(f"n_ctx must be a positive integer, got {n_ctx!r}")
        self.vocab_size = int(vocab_size)
        self.n_ctx = int(n_ctx)
        self.n_slots = int(n_slots)
        self.state_h = np.zeros((self.n_slots, state_size), dtype=np.float32)   # [n_slots, sum(H)]
        self.state_c = np.zeros((self.n_slots, state_size), dtype=np.float32)
        self.lengths = np.zeros(self.n_slots, dtype=np.int64)          # tokens in each slot's state
        self.last_token = np.full(self.n_slots, -1, dtype=np.int64)    # the token at lengths - 1
        self.last_logits = np.zeros((self.n_slots, self.vocab_size), dtype=np.float32)

    @abstractmethod
    def _run(self, slots: np.ndarray, tokens: np.ndarray, lengths: np.ndarray, all_logits: bool) -> np.ndarray:
        """Advance `slots` (int64 [b]) by tokens int64 [b, n] (sequence i: tokens[i, :lengths[i]]),
        updating state_h/state_c. Returns logits float32 [b, n, V] (all_logits) or [b, 1, V]."""

    # -- Backend -------------------------------------------------------------------------------
    def forward(self, slot, token_ids, start_pos, all_logits=False):
        return self.forward_sequences([slot], [token_ids], [start_pos], all_logits)[0]

    def forward_sequences(self, slots, token_lists, start_positions, all_logits=False) -> list:
        """`forward` for several slots at once (a batch of prompts): one compiled call, each matrix
        product over every position of every sequence. Returns one logits array per sequence:
        [n_i, V] when all_logits, else [1, V]."""
        slots = self._check_slots(slots)
        if len(token_lists) != slots.size or len(start_positions) != slots.size:
            raise InvalidParameterError("slots, token lists and start positions must have the same length")
        seqs = [check_token_ids(t, self.vocab_size) for t in token_lists]
        for seq, start in zip(seqs, start_positions):
            if seq.size == 0:
                raise InvalidParameterError("forward needs at least one token")
            if start < 0 or start + seq.size > self.n_ctx:
                raise ContextLengthError(f"positions {start}..{start + seq.size - 1} do not fit the context "
                                         f"of {self.n_ctx} tokens")
        plans = [self._plan(slot, seq, int(start)) for slot, seq, start in zip(slots, seqs, start_positions)]
        remembered = [None] * slots.size   # logits of a repeated last token (see the module docstring)
        to_run = []                        # (index, tokens still to run)
        for i, (slot, plan, seq) in enumerate(zip(slots, plans, seqs)):
            if plan == "reset":
                self.reset(slot)
            if plan == "repeat":
                remembered[i] = self.last_logits[slot][None, :].copy()
                seq = seq[1:]
            if seq.size:
                to_run.append((i, seq))
        new = self._advance(slots, to_run, all_logits)
        out = []
        for i in range(slots.size):
            parts = [p for p in (remembered[i], new.get(i)) if p is not None]
            out.append(np.concatenate(parts) if all_logits and len(parts) > 1 else parts[-1])
        return out

    def _advance(self, slots, to_run, all_logits) -> dict:
        """Run the (index, tokens) sequences of `to_run` as one padded batch; index -> logits."""
        if not to_run:
            return {}
        n_pos = max(seq.size for _, seq in to_run)
        tokens = np.zeros((len(to_run), n_pos), dtype=np.int64)               # [b, n], right-padded
        lengths = np.array([seq.size for _, seq in to_run], dtype=np.int64)
        for row, (_, seq) in enumerate(to_run):
            tokens[row, :seq.size] = seq
        batch_slots = slots[[i for i, _ in to_run]]
        logits = self._run(batch_slots, tokens, lengths, all_logits)          # [b, n or 1, V]
        new = {}
        for row, (i, seq) in enumerate(to_run):
            slot, n = batch_slots[row], seq.size
            new[i] = logits[row, :n] if all_logits else logits[row]
            self.lengths[slot] += n
            self.last_token[slot] = seq[-1]
            self.last_logits[slot] = logits[row, n - 1 if all_logits else 0]
        return new

    def forward_batch(self, slots, token_ids, positions):
        slots = self._check_slots(slots)
        token_ids = check_token_ids(token_ids, self.vocab_size)
        positions = np.ascontiguousarray(positions, dtype=np.int64).reshape(-1)
        if not (slots.shape == token_ids.shape == positions.shape):
            raise InvalidParameterError("slots, token_ids and positions must have the same length")
        restart = positions == 0
        if not ((positions == self.lengths[slots]) | restart).all():
            for slot, pos in zip(slots, positions):     # name the first slot that breaks the rule
                if pos != 0 and pos != self.lengths[slot]:
                    raise InvalidParameterError(
                        f"slot {slot} holds the state after {self.lengths[slot]} tokens; forward_batch extends "
                        f"it (position {self.lengths[slot]}) or restarts it (position 0), not position {pos}")
        if positions.max(initial=0) >= self.n_ctx:
            raise ContextLengthError(f"a position is outside the context of {self.n_ctx} tokens")
        for slot in slots[restart]:
            self.reset(slot)
        logits = self._run(slots, token_ids.reshape(-1, 1), np.ones(slots.size, dtype=np.int64), False)[:, 0]
        self.lengths[slots] += 1
        self.last_token[slots] = token_ids
        self.last_logits[slots] = logits
        return logits

    def copy_slot(self, src, dst, n_tokens):
        for slot in (src, dst):
            if not 0 <= slot < self.n_slots:
                raise InvalidParameterError(f"slot {slot} out of range [0, {self.n_slots})")
        if n_tokens != self.lengths[src]:
            raise InvalidParameterError(f"a recurrent state cannot be cut: slot {src} holds {self.lengths[src]} "
                                        f"tokens, copy_slot asked for {n_tokens}")
        for a in (self.state_h, self.state_c, self.lengths, self.last_token, self.last_logits):
            a[dst] = a[src]

    def reset(self, slot: int) -> None:
        """Forget the slot's sequence (zero state)."""
        self.state_h[slot] = 0.0
        self.state_c[slot] = 0.0
        self.lengths[slot] = 0
        self.last_token[slot] = -1

    # -- checks --------------------------------------------------------------------------------
    def _plan(self, slot: int, seq: np.ndarray, start: int) -> str:
        """How `slot` takes tokens `seq` at `start`: "reset" (start 0), "extend" (start == length),
        "repeat" (start == length - 1 and seq[0] is the last token: its logits are remembered).
        Raises for anything else; changes nothing."""
        length = int(self.lengths[slot])
        if start == 0:
            return "reset"
        if start == length:
            return "extend"
        if start == length - 1 and seq[0] == self.last_token[slot]:
            return "repeat"
        raise InvalidParameterError(
            f"slot {slot} holds the state after {length} tokens; a recurrent model can only extend it "
            f"(start_pos {length}) or restart (start_pos 0), not start at {start}")

    def _check_slots(self, slots) -> np.ndarray:
        slots = np.ascontiguousarray(slots, dtype=np.int64).reshape(-1)
        if slots.size and (slots.min() < 0 or slots.max() >= self.n_slots):
            raise InvalidParameterError(f"slot out of range [0, {self.n_slots}): {slots.tolist()}")
        if slots.size > 1 and np.unique(slots).size != slots.size:
            raise InvalidParameterError(f"a slot appears twice in one batch: {slots.tolist()}")
        return slots


class LSTMBackend(RecurrentBackend):
    """LSTM language model run by the Numba kernels (kernels/lstm.py) from the GGUF's pages.
    `fast=True` uses 8-bit activations for Q8_0 weights (lmengine.kernels.matmul's int8 path); F32/F16
    weights always compute in float32."""

    def __init__(self, gguf_file, config: LSTMConfig | None = None, n_ctx: int = 4096, n_slots: int = 1,
                 n_threads: int | None = None, fast: bool = True):
        if isinstance(gguf_file, (str, os.PathLike)):
            gguf_file = GGUFFile(gguf_file)
        self.config = config or LSTMConfig.from_gguf(gguf_file)
        super().__init__(self.config.vocab_size, self.config.state_size, n_ctx, n_slots)
        self.weights = LSTMWeights(gguf_file, self.config)
        self._gguf_file = gguf_file   # keeps the memory map alive
        self.fast = bool(fast)
        self.set_threads(n_threads)

    @property
    def max_threads(self) -> int:
        return numba.config.NUMBA_NUM_THREADS   # Numba's pool: its size is fixed at start

    def forward_batch(self, slots, token_ids, positions):
        """The decode step in one compiled call (`_decode_step`: checks, resets, forward, lengths):
        the Python work per step is the token check and a few conversions. A batch it refuses
        goes through the general path, which names the problem."""
        token_ids = check_token_ids(token_ids, self.vocab_size)   # int64 [b]: the kernel reads E[token]
        slots = np.asarray(slots, dtype=np.int64)
        positions = np.asarray(positions, dtype=np.int64)
        if slots.ndim == token_ids.ndim == positions.ndim == 1 and slots.size == token_ids.size == positions.size:
            logits = np.empty((slots.size, self.vocab_size), dtype=np.float32)
            numba.set_num_threads(self.n_threads)
            w = self.weights
            if _decode_step(w.blob, w.table, w.state_offsets, self.state_h, self.state_c, self.lengths,
                            self.last_token, self.last_logits, slots, token_ids, positions, self.n_ctx, self.fast,
                            self.n_threads == 1, logits):
                return logits
        return super().forward_batch(slots, token_ids, positions)

    def _run(self, slots, tokens, lengths, all_logits):
        numba.set_num_threads(self.n_threads)   # also starts Numba's thread pool, which the kernels need
        return self.weights.forward(self.state_h, self.state_c, slots, tokens, lengths, all_logits, self.fast,
                                    self.n_threads == 1)

    def close(self):
        self.weights = None
        self._gguf_file = None


@njit(cache=True, nogil=True)
def _decode_step(blob, table, state_offsets, state_h, state_c, lengths, last_token, last_logits, slots, tokens,
                 positions, n_ctx, fast, one_thread, logits):
    """RecurrentBackend.forward_batch for the Numba kernels, compiled: False (nothing changed) when
    a slot or position breaks the rules; else resets the slots at position 0, advances every
    slot by its token, records lengths / last token / last logits and fills logits [b, V].
    The tokens must be checked already (check_token_ids, in LSTMBackend.forward_batch)."""
    n_slots, vocab, n_seq = state_h.shape[0], last_logits.shape[1], slots.size
    seen = np.zeros(n_slots, dtype=np.bool_)
    for i in range(n_seq):
        slot, pos = slots[i], positions[i]
        if slot < 0 or slot >= n_slots or seen[slot] or pos >= n_ctx or (pos != 0 and pos != lengths[slot]):
            return False
        seen[slot] = True
    step_tokens = np.empty((n_seq, 1), dtype=np.int64)
    for i in range(n_seq):
        step_tokens[i, 0] = tokens[i]
        if positions[i] == 0:
            state_h[slots[i], :] = 0.0
            state_c[slots[i], :] = 0.0
            lengths[slots[i]] = 0
    lstm_forward(blob, table, state_h, state_c, state_offsets, slots, step_tokens, np.ones(n_seq, dtype=np.int64),
                 False, logits.reshape(n_seq, 1, vocab), fast, one_thread)
    for i in range(n_seq):
        lengths[slots[i]] += 1
        last_token[slots[i]] = tokens[i]
        last_logits[slots[i], :] = logits[i]
    return True


class OrtLSTMBackend(RecurrentBackend):
    """The same LSTM exported to ONNX (converters/onnx_lstm.py) and run by onnxruntime: the state
    travels as graph inputs past_h.{l}/past_c.{l} [1, b, H] and outputs present_h.{l}/present_c.{l}."""

    def __init__(self, onnx_path, n_ctx: int = 4096, n_slots: int = 1, n_threads: int | None = None,
                 providers=None):
        import onnxruntime as ort
        from lmengine.converters.onnx_lstm import META_CONFIG, MODEL_FILE
        onnx_path = os.fspath(onnx_path)
        if os.path.isdir(onnx_path):
            onnx_path = os.path.join(onnx_path, MODEL_FILE)
        if not os.path.isfile(onnx_path):
            raise BackendError(f"{onnx_path}: no such ONNX model")
        options = ort.SessionOptions()
        if n_threads is not None:
            options.intra_op_num_threads = int(n_threads)
        try:
            self.session = ort.InferenceSession(onnx_path, options, providers=providers or ["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types
            raise BackendError(f"{onnx_path}: onnxruntime cannot load the model: {e}") from e
        meta = self.session.get_modelmeta().custom_metadata_map
        if META_CONFIG not in meta:
            raise BackendError(f"{onnx_path}: not an lmengine LSTM export (no {META_CONFIG!r} metadata)")
        self.config = json.loads(meta[META_CONFIG])
        self.hidden_sizes = list(self.config["hidden_sizes"])
        offsets = np.concatenate([[0], np.cumsum(self.hidden_sizes)]).astype(np.int64)
        self.state_offsets = offsets
        super().__init__(self.config["vocab_size"], int(offsets[-1]), n_ctx, n_slots)

    def _run(self, slots, tokens, lengths, all_logits):
        feeds = {"input_ids": tokens.astype(np.int64), "sequence_lens": lengths.astype(np.int32)}
        for l in range(len(self.hidden_sizes)):
            cols = slice(self.state_offsets[l], self.state_offsets[l + 1])
            feeds[f"past_h.{l}"] = self.state_h[slots, cols][None]
            feeds[f"past_c.{l}"] = self.state_c[slots, cols][None]
        names = ["logits"] + [f"present_{s}.{l}" for l in range(len(self.hidden_sizes)) for s in "hc"]
        outputs = dict(zip(names, self.session.run(names, feeds)))
        for l in range(len(self.hidden_sizes)):
            cols = slice(self.state_offsets[l], self.state_offsets[l + 1])
            self.state_h[slots, cols] = outputs[f"present_h.{l}"][0]
            self.state_c[slots, cols] = outputs[f"present_c.{l}"][0]
        logits = outputs["logits"]                                   # [b, n, V]
        if all_logits:
            return logits
        return logits[np.arange(slots.size), lengths - 1][:, None, :]

    def close(self):
        self.session = None
