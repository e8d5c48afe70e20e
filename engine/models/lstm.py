"""LSTM language models: the weights as a table into the GGUF file's memory map for the compiled
forward pass (kernels/lstm.py); the config (`LSTMConfig`) is read in engine/config.py.

The layout (tensor names, gate order i, f, g, o, metadata keys) is defined once, in
converters/lstm_gguf.py. `logits` are the output layer's pre-activation values: for a Keras model
whose last Dense has a softmax, softmax(logits) equals the Keras output.
"""
from __future__ import annotations

import numba
import numpy as np

from lmengine.converters import lstm_gguf as layout
from lmengine.converters.gguf_file import GGUFFile
from lmengine.kernels.lstm import T_FIRST_LAYER, TABLE_COLS, T_EMBD, T_OUTPUT, T_OUTPUT_BIAS, lstm_forward

from ..config import LSTMConfig


class LSTMWeights:
    """Weights of an LSTM LM, in the GGUF file's pages: `blob` (the file as uint8) and `table`
    (int64 [3 + 3L, 4]: byte offset, ggml type, n_rows, n_cols per tensor, in lmengine.kernels.lstm order).
    `tensors[name]` gives each tensor's zero-copy bytes."""

    def __init__(self, f: GGUFFile, config: LSTMConfig):
        self.config = config
        self.blob = np.asarray(f.data)                 # uint8 [file size], read-only memory map
        names = [layout.TOKEN_EMBD, layout.OUTPUT, layout.OUTPUT_BIAS]
        for l in range(config.n_layers):
            names += [layout.lstm_ih(l), layout.lstm_hh(l), layout.lstm_bias(l)]
        assert names.index(layout.TOKEN_EMBD) == T_EMBD and names.index(layout.OUTPUT) == T_OUTPUT \
            and names.index(layout.OUTPUT_BIAS) == T_OUTPUT_BIAS and names.index(layout.lstm_ih(0)) == T_FIRST_LAYER
        self.table = np.zeros((len(names), TABLE_COLS), dtype=np.int64)
        self.tensors = {}
        for k, name in enumerate(names):
            info = f.tensors[name]
            shape = info.shape if len(info.shape) == 2 else (1,) + tuple(info.shape)
            self.table[k] = (info.offset, info.type_id, shape[0], shape[1])
            self.tensors[name] = f.tensor_bytes(name)
        self.state_offsets = config.state_offsets

    def forward(self, state_h, state_c, slots, tokens, lengths, all_logits: bool, fast: bool,
                one_thread: bool = False) -> np.ndarray:
        """Logits float32 [b, n, V] (all_logits) or [b, 1, V] for tokens int64 [b, n] continuing the
        state of `slots`; state_h/state_c float32 [n_slots, state_size] are updated in place."""
        n_seq, n_pos = tokens.shape
        numba.get_num_threads()   # starts Numba's thread pool: its parallel kernels crash without it
        logits = np.empty((n_seq, n_pos if all_logits else 1, self.config.vocab_size), dtype=np.float32)
        lstm_forward(self.blob, self.table, state_h, state_c, self.state_offsets, slots, tokens, lengths,
                     all_logits, logits, fast, one_thread)
        return logits
