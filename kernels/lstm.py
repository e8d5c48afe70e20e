"""LSTM language-model forward pass: a batch of sequences through embedding, stacked LSTM layers
and the output layer, in one compiled call.

Layout and gate order are those of converters/lstm_gguf.py (gates i, f, g, o in blocks of H rows).
Weights are raw ggml blocks (F32, F16, Q8_0, or any type kernels.quant decodes) inside one uint8
buffer, normally the GGUF file's memory map, described by a table of (byte offset, type, rows,
cols) per tensor; nothing is expanded to float32 as a whole.

Work per layer, for b sequences of up to n tokens:
    G = X @ W_ih^T + bias             one matrix-matrix product over all b*n positions  [b*n, 4H]
    for t in 0 .. n-1:                the recurrence
        R = H @ W_hh^T                one matrix-matrix product over the b sequences    [b, 4H]
        (h, c) = cell(G[:, t] + R, c) for the sequences that have a token at t
A decode step is the case n = 1: one product per matrix for the whole batch, so weights are read
once per step. Matrix products are kernels.matmul.matmul (threads over output rows).
"""
import numpy as np
from numba import njit

from kernels.matmul import matmul, row_bytes_of
from kernels.quant import F32 as F32_TYPE
from kernels.quant import dequantize_row_into

# Rows of the tensor table (see lstm_forward).
T_EMBD, T_OUTPUT, T_OUTPUT_BIAS = 0, 1, 2
T_FIRST_LAYER = 3          # layer l: T_FIRST_LAYER + 3*l + (0: lstm_ih, 1: lstm_hh, 2: lstm.bias)
TABLE_COLS = 4             # byte offset, ggml type id, n_rows, n_cols
# Multiply-adds below which a matrix product runs on the calling thread: starting the thread pool
# costs several microseconds, as much as a 128 x 512 product.
PARALLEL_MIN_MACS = 1 << 17


@njit(cache=True, nogil=True)
def _tensor_bytes(blob, tensors, k):
    """(uint8 view of tensor k's blocks, type id, n_rows, n_cols) from the table."""
    offset, w_type, n_rows, n_cols = tensors[k, 0], tensors[k, 1], tensors[k, 2], tensors[k, 3]
    size = n_rows * row_bytes_of(w_type, n_cols)
    if offset < 0 or size < 0 or offset + size > blob.size:
        raise ValueError("lstm_forward: a tensor in the table runs past the weight buffer")
    return blob[offset:offset + size], w_type, n_rows, n_cols


@njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def _dot_row(w_row, x, out, r):
    """out[t, r] = dot(w_row, x[t]) for every t (float32, reassociated so that LLVM vectorizes)."""
    for t in range(x.shape[0]):
        acc = np.float32(0.0)
        for k in range(x.shape[1]):
            acc += w_row[k] * x[t, k]
        out[t, r] = acc


@njit(cache=True, nogil=True)
def matmul_serial(w_u8, w_type, n_rows, n_cols, x, out):
    """kernels.matmul.matmul's float path on the calling thread: out [n_tok, n_rows] = x @ W^T.
    For the small products of an LSTM step, where starting threads costs more than the work.
    F32 rows are read in place; other types are decoded one row at a time."""
    bytes_per_row = row_bytes_of(w_type, n_cols)
    if bytes_per_row < 0 or w_u8.size < n_rows * bytes_per_row:
        raise ValueError("matmul_serial: w_u8 does not hold n_rows rows of n_cols values of w_type")
    if x.shape[1] != n_cols or out.shape[0] != x.shape[0] or out.shape[1] != n_rows:
        raise ValueError("matmul_serial: x must be [n_tok, n_cols] and out [n_tok, n_rows]")
    if w_type == F32_TYPE:
        for r in range(n_rows):
            _dot_row(w_u8[r * bytes_per_row:(r + 1) * bytes_per_row].view(np.float32), x, out, r)
    else:
        row = np.empty(n_cols, dtype=np.float32)
        for r in range(n_rows):
            dequantize_row_into(w_type, w_u8[r * bytes_per_row:(r + 1) * bytes_per_row], n_cols, row)
            _dot_row(row, x, out, r)


@njit(cache=True, nogil=True)
def _project(blob, tensors, k, x, out, act_q8):
    """out [n_tok, n_rows] = x [n_tok, n_cols] @ W_k^T: on this thread when the product is small,
    else kernels.matmul.matmul (threads, and int8 activations when act_q8)."""
    w, w_type, n_rows, n_cols = _tensor_bytes(blob, tensors, k)
    if x.shape[1] != n_cols or out.shape[1] != n_rows:
        raise ValueError("lstm_forward: activation width does not match a weight matrix")
    if n_rows * n_cols * x.shape[0] < PARALLEL_MIN_MACS:
        matmul_serial(w, w_type, n_rows, n_cols, x, out)
    else:
        matmul(w, w_type, n_rows, n_cols, x, out, act_q8)


@njit(cache=True, nogil=True)
def _vector(blob, tensors, k):
    """A 1-D tensor (bias) as float32 [n]."""
    w, w_type, n_rows, n_cols = _tensor_bytes(blob, tensors, k)
    out = np.empty(n_rows * n_cols, dtype=np.float32)
    dequantize_row_into(w_type, w, n_rows * n_cols, out)
    return out


@njit(cache=True, nogil=True)
def _output_layer(blob, tensors, top, logits, act_q8):
    """logits [rows, V] = top [rows, H] @ W_out^T + b_out."""
    _project(blob, tensors, T_OUTPUT, top, logits, act_q8)
    bias = _vector(blob, tensors, T_OUTPUT_BIAS)
    if bias.size != logits.shape[1]:
        raise ValueError("lstm_forward: output bias length is not the vocabulary size")
    for r in range(logits.shape[0]):
        for j in range(logits.shape[1]):
            logits[r, j] += bias[j]


@njit(cache=True, nogil=True)
def sigmoid(x):
    """1 / (1 + e^-x), in float64 (no overflow warning: exp(-x) = inf gives 0)."""
    return 1.0 / (1.0 + np.exp(-np.float64(x)))


@njit(cache=True, nogil=True)
def lstm_cell(gates_x, gates_h, hidden, h, c):
    """One LSTM step of one sequence, in place.

    gates_x [4H]: W_ih x + b;  gates_h [4H]: W_hh h_prev;  h, c [H]: previous state in, new out.
    Gate blocks i, f, g, o. The gate math is float64, stored as float32.
    """
    for j in range(hidden):
        i = sigmoid(gates_x[j] + gates_h[j])
        f = sigmoid(gates_x[hidden + j] + gates_h[hidden + j])
        g = np.tanh(np.float64(gates_x[2 * hidden + j] + gates_h[2 * hidden + j]))
        o = sigmoid(gates_x[3 * hidden + j] + gates_h[3 * hidden + j])
        c_new = np.float32(f * c[j] + i * g)
        c[j] = c_new
        h[j] = np.float32(o * np.tanh(np.float64(c_new)))


@njit(cache=True, nogil=True)
def lstm_layer(blob, tensors, layer, x, lengths, n_pos, h, c, act_q8):
    """Run one LSTM layer over b sequences. x float32 [b * n_pos, n_in] (sequence i at rows
    i*n_pos .. i*n_pos + lengths[i] - 1), h, c float32 [b, H] state (updated in place).
    Returns y float32 [b * n_pos, H], the layer's output h at every position (0 past lengths[i])."""
    k = T_FIRST_LAYER + 3 * layer
    hidden = tensors[k + 1, 3]
    n_seq = h.shape[0]
    gates_x = np.empty((x.shape[0], 4 * hidden), dtype=np.float32)   # [b*n, 4H]
    _project(blob, tensors, k, x, gates_x, act_q8)
    bias = _vector(blob, tensors, k + 2)                               # [4H]
    if bias.size != 4 * hidden:
        raise ValueError("lstm_forward: bias length is not 4 * hidden")
    for r in range(gates_x.shape[0]):
        for j in range(4 * hidden):
            gates_x[r, j] += bias[j]
    gates_h = np.empty((n_seq, 4 * hidden), dtype=np.float32)          # [b, 4H]
    y = np.zeros((x.shape[0], hidden), dtype=np.float32)
    for t in range(n_pos):
        _project(blob, tensors, k + 1, h, gates_h, act_q8)
        for i in range(n_seq):
            if t < lengths[i]:
                row = i * n_pos + t
                lstm_cell(gates_x[row], gates_h[i], hidden, h[i], c[i])
                y[row, :] = h[i]
    return y


@njit(cache=True, nogil=True)
def lstm_forward(blob, tensors, state_h, state_c, state_offsets, slots, tokens, lengths, all_logits,
                 logits, act_q8):
    """Forward b sequences from their current state; write logits and the new state.

    blob          uint8 [n_bytes]         every weight (the GGUF memory map)
    tensors       int64 [3 + 3L, 4]       (byte offset, type, n_rows, n_cols) of token_embd.weight,
                                          output.weight, output.bias, then for each layer l
                                          blk.l.lstm_ih.weight, blk.l.lstm_hh.weight, blk.l.lstm.bias
    state_h/c     float32 [n_slots, S]    h and c of every slot; layer l at columns
                                          state_offsets[l] .. state_offsets[l] + H_l (S = sum H_l)
    slots         int32 [b]               the slot of each sequence (distinct)
    tokens        int32 [b, n]            sequence i's new tokens are tokens[i, :lengths[i]]
    lengths       int32 [b]               1 <= lengths[i] <= n
    logits        float32 [b, n, V]       all_logits: logits at every position (rows past
                  or [b, 1, V]            lengths[i] are unspecified); else at position lengths[i]-1
    act_q8        bool                    int8 activations for Q8_0/Q4 weights (kernels.matmul)
    """
    n_seq, n_pos = tokens.shape
    n_layers = (tensors.shape[0] - T_FIRST_LAYER) // 3
    embd, embd_type, vocab, emb_dim = _tensor_bytes(blob, tensors, T_EMBD)
    embd_row_bytes = row_bytes_of(embd_type, emb_dim)
    if slots.size != n_seq or lengths.size != n_seq or state_offsets.size != n_layers + 1:
        raise ValueError("lstm_forward: slots, lengths or state_offsets have the wrong length")
    if logits.shape[0] != n_seq or logits.shape[2] != tensors[T_OUTPUT, 2]:
        raise ValueError("lstm_forward: logits has the wrong shape")
    if logits.shape[1] != (n_pos if all_logits else 1):
        raise ValueError("lstm_forward: logits has the wrong number of positions")
    seen = np.zeros(state_h.shape[0], dtype=np.bool_)
    for i in range(n_seq):
        if lengths[i] < 1 or lengths[i] > n_pos:
            raise ValueError("lstm_forward: lengths must be in 1..n")
        if slots[i] < 0 or slots[i] >= state_h.shape[0]:
            raise ValueError("lstm_forward: slot out of range")
        if seen[slots[i]]:
            raise ValueError("lstm_forward: a slot appears twice")
        seen[slots[i]] = True
        for t in range(lengths[i]):
            if tokens[i, t] < 0 or tokens[i, t] >= vocab:
                raise ValueError("lstm_forward: token id out of range")

    # Embedding rows of every position.                                   x [b*n, emb_dim]
    x = np.zeros((n_seq * n_pos, emb_dim), dtype=np.float32)
    for i in range(n_seq):
        for t in range(lengths[i]):
            start = tokens[i, t] * embd_row_bytes
            dequantize_row_into(embd_type, embd[start:start + embd_row_bytes], emb_dim, x[i * n_pos + t])

    for layer in range(n_layers):
        col0, col1 = state_offsets[layer], state_offsets[layer + 1]
        h = np.empty((n_seq, col1 - col0), dtype=np.float32)              # [b, H]
        c = np.empty((n_seq, col1 - col0), dtype=np.float32)
        for i in range(n_seq):
            h[i, :] = state_h[slots[i], col0:col1]
            c[i, :] = state_c[slots[i], col0:col1]
        x = lstm_layer(blob, tensors, layer, x, lengths, n_pos, h, c, act_q8)
        for i in range(n_seq):
            state_h[slots[i], col0:col1] = h[i]
            state_c[slots[i], col0:col1] = c[i]

    # Output layer: every position, or the last one of each sequence.
    if all_logits:
        top = x                                                           # [b*n, H]
    else:
        top = np.empty((n_seq, x.shape[1]), dtype=np.float32)             # [b, H]
        for i in range(n_seq):
            top[i, :] = x[i * n_pos + lengths[i] - 1]
    _output_layer(blob, tensors, top, logits.reshape(top.shape[0], logits.shape[2]), act_q8)
