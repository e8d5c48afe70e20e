"""LSTM language models: the config read from GGUF metadata, and the weights as a table into the
file's memory map for the compiled forward pass (kernels/lstm.py).

The layout (tensor names, gate order i, f, g, o, metadata keys) is defined once, in
converters/lstm_gguf.py. `logits` are the output layer's pre-activation values: for a Keras model
whose last Dense has a softmax, softmax(logits) equals the Keras output.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numba
import numpy as np

from converters import lstm_gguf as layout
from converters.gguf_file import GGUFFile
from kernels import quant
from kernels.lstm import T_FIRST_LAYER, TABLE_COLS, T_EMBD, T_OUTPUT, T_OUTPUT_BIAS, lstm_forward

from ..config import _count_types, _int, check_shapes
from ..errors import MetadataError, TensorShapeError, UnsupportedQuantTypeError


@dataclass(frozen=True)
class LSTMConfig:
    """An LSTM language model: Embedding -> n_layers stacked LSTM layers -> Linear head."""

    vocab_size: int             # lstm.vocab_size (rows of token_embd and output)
    emb_dim: int                # lstm.embedding_length
    hidden_sizes: tuple         # lstm.hidden_sizes: H of each layer
    output_activation: str      # lstm.output_activation of the source model ("softmax", ...)
    source: str = ""            # lstm.source: "keras" | "pytorch"
    name: str = ""              # general.name
    tokenizer_kind: str = ""    # tokenizer.ggml.model: "char" | "word"
    tensor_types: dict = field(default_factory=dict, compare=False)  # type name -> count
    arch: str = "lstm"

    @property
    def n_layers(self) -> int:
        return len(self.hidden_sizes)

    @property
    def state_size(self) -> int:
        """Floats of h (and of c) per sequence: all layers side by side."""
        return int(sum(self.hidden_sizes))

    @property
    def state_offsets(self) -> np.ndarray:
        """int64 [n_layers + 1]: layer l's state is at columns offsets[l] .. offsets[l+1]."""
        return np.concatenate([[0], np.cumsum(self.hidden_sizes)]).astype(np.int64)

    def layer_inputs(self) -> list:
        """Input width of each layer."""
        return [self.emb_dim] + list(self.hidden_sizes[:-1])

    def expected_shapes(self) -> dict:
        """Tensor name -> NumPy-order shape that the forward pass needs."""
        shapes = {layout.TOKEN_EMBD: (self.vocab_size, self.emb_dim)}
        for l, (n_in, hidden) in enumerate(zip(self.layer_inputs(), self.hidden_sizes)):
            shapes[layout.lstm_ih(l)] = (4 * hidden, n_in)
            shapes[layout.lstm_hh(l)] = (4 * hidden, hidden)
            shapes[layout.lstm_bias(l)] = (4 * hidden,)
        shapes[layout.OUTPUT] = (self.vocab_size, self.hidden_sizes[-1])
        shapes[layout.OUTPUT_BIAS] = (self.vocab_size,)
        return shapes

    @classmethod
    def from_gguf(cls, f: GGUFFile) -> "LSTMConfig":
        arch = f.require("general.architecture", str)
        if arch != layout.ARCH:
            raise MetadataError(f"{f.path}: architecture is {arch!r}, not {layout.ARCH!r}")
        n_layers = _int(f, layout.KEY_BLOCK_COUNT)
        hidden = f.get(layout.KEY_HIDDEN_SIZES)
        if not isinstance(hidden, list) or len(hidden) != n_layers or n_layers == 0 or \
                not all(isinstance(h, int) and not isinstance(h, bool) and h > 0 for h in hidden):
            raise MetadataError(f"{f.path}: {layout.KEY_HIDDEN_SIZES!r} should list {n_layers} positive hidden "
                                f"sizes (one per layer of {layout.KEY_BLOCK_COUNT}), found {hidden!r}")
        gate_order = f.get(layout.KEY_GATE_ORDER, layout.CANONICAL_GATE_ORDER)
        if gate_order != layout.CANONICAL_GATE_ORDER:
            raise MetadataError(f"{f.path}: {layout.KEY_GATE_ORDER!r} is {gate_order!r}; this engine reads "
                                f"{layout.CANONICAL_GATE_ORDER!r} (see converters/lstm_gguf.py)")
        activation = f.get(layout.KEY_OUTPUT_ACTIVATION, "linear")
        if activation not in layout.OUTPUT_ACTIVATIONS:
            raise MetadataError(f"{f.path}: {layout.KEY_OUTPUT_ACTIVATION!r} is {activation!r}, "
                                f"expected one of {layout.OUTPUT_ACTIVATIONS}")
        cfg = cls(
            vocab_size=_int(f, layout.KEY_VOCAB_SIZE),
            emb_dim=_int(f, layout.KEY_EMBEDDING_LENGTH),
            hidden_sizes=tuple(int(h) for h in hidden),
            output_activation=activation,
            source=str(f.get(layout.KEY_SOURCE, "")),
            name=str(f.get("general.name", "")),
            tokenizer_kind=str(f.get("tokenizer.ggml.model", "")),
            tensor_types=_count_types(f),
        )
        check_shapes(f, cfg.expected_shapes())
        for name in cfg.expected_shapes():
            _check_blocks(f, name)
        return cfg


def _check_blocks(f: GGUFFile, name: str) -> None:
    """The tensor's type is one the kernels decode and its byte count matches its shape."""
    info = f.tensors[name]
    if info.type_id not in quant.TYPE_NAMES:
        raise UnsupportedQuantTypeError(f"{f.path}: tensor {name!r} has type {info.type_name}, which the LSTM "
                                        f"kernels do not decode (supported: {sorted(quant.TYPE_IDS)})")
    n_cols = info.shape[-1]
    if n_cols % quant.BLOCK_SIZE[info.type_id]:
        raise TensorShapeError(f"{f.path}: tensor {name!r} rows of {n_cols} values are not whole "
                               f"{info.type_name} blocks")
    n_rows = int(np.prod(info.shape[:-1], dtype=np.int64))
    want = n_rows * quant.row_bytes(info.type_id, n_cols)
    if info.n_bytes != want:
        raise TensorShapeError(f"{f.path}: tensor {name!r} ({info.type_name}, shape {info.shape}) holds "
                               f"{info.n_bytes} bytes, expected {want}")


class LSTMWeights:
    """Weights of an LSTM LM, in the GGUF file's pages: `blob` (the file as uint8) and `table`
    (int64 [3 + 3L, 4]: byte offset, ggml type, n_rows, n_cols per tensor, in kernels.lstm order).
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


def benchmark_lstm(threads: int | None = None, batch_sizes=(1, 64), gguf_path=None) -> dict:
    """`lmengine bench --lstm`: decode tok/s of this engine and of PyTorch's nn.LSTM stepping on the
    same weights (engine/lstm_bench.py; needs torch, ImportError otherwise)."""
    from ..lstm_bench import bench_lstm_decode
    return bench_lstm_decode(gguf_path, batch_sizes, threads)
