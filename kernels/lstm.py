"""LSTM language-model forward pass: a batch of sequences through embedding, stacked LSTM layers
and the output layer, in one compiled call.

Layout and gate order are those of converters/lstm_gguf.py (gates i, f, g, o in blocks of H rows).
Weights are raw ggml blocks (F32, F16, Q8_0, or any type lmengine.kernels.quant decodes) inside one uint8
buffer, normally the GGUF file's memory map, described by a table of (byte offset, type, rows,
cols) per tensor; nothing is expanded to float32 as a whole.

Work per layer, for b sequences of up to n tokens:
    G = X @ W_ih^T + bias             one matrix-matrix product over all b*n positions  [b*n, 4H]
    for t in 0 .. n-1:                the recurrence
        R = H @ W_hh^T                one matrix-matrix product over the b sequences    [b, 4H]
        (h, c) = cell(G[:, t] + R, c) for the sequences that have a token at t
A decode step is the case n = 1: one product per matrix for the whole batch, so weights are read
once per step. Large products use lmengine.kernels.matmul.matmul (threads over output rows, int8
activations for quantized weights when asked); the small ones of a decode step, and every float
product when one thread is in use, run on the calling thread (`matmul_serial`), since starting
threads would cost more than the work. The cell's sigmoid and tanh are computed with a
branch-free float32 exp (`exp_f32`) so that the cell loops vectorize.
"""
import numpy as np
from numba import njit

from .matmul import matmul, row_bytes_of
from .quant import F32 as F32_TYPE
from .quant import Q4_0 as Q4_0_TYPE
from .quant import Q4_1 as Q4_1_TYPE
from .quant import Q8_0 as Q8_0_TYPE
from .quant import _bits_as_f32, dequantize_row_into

# Rows of the tensor table (see lstm_forward).
T_EMBD, T_OUTPUT, T_OUTPUT_BIAS = 0, 1, 2
T_FIRST_LAYER = 3          # layer l: T_FIRST_LAYER + 3*l + (0: lstm_ih, 1: lstm_hh, 2: lstm.bias)
TABLE_COLS = 4             # byte offset, ggml type id, n_rows, n_cols
# Multiply-adds below which a matrix product runs on the calling thread: starting the thread pool
# costs several microseconds, as much as a 128 x 512 product.
PARALLEL_MIN_MACS = 1 << 17
ROW_BLOCK = 4              # weight rows per step of the serial product


@njit(cache=True, nogil=True)
def _tensor_bytes(blob, tensors, k):
    """(uint8 view of tensor k's blocks, type id, n_rows, n_cols) from the table."""
    offset, w_type, n_rows, n_cols = tensors[k, 0], tensors[k, 1], tensors[k, 2], tensors[k, 3]
    size = n_rows * row_bytes_of(w_type, n_cols)
    if offset < 0 or size < 0 or offset + size > blob.size:
        raise ValueError("lstm_forward: a tensor in the table runs past the weight buffer")
    return blob[offset:offset + size], w_type, n_rows, n_cols


@njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def _dot_rows(w_rows, x, out, r0):
    """out[t, r0 + j] = dot(w_rows[j], x[t]) for every token t and the rows of w_rows [m, n_cols]
    (m <= ROW_BLOCK). A full block runs as a 4 x 4 register tile (4 tokens x 4 rows: 16 independent
    vector sums, each loaded value used 4 times), then token by token; float32, reassociated so
    that LLVM vectorizes along n_cols."""
    m, n = w_rows.shape
    n_tok = x.shape[0]
    t = 0
    if m == ROW_BLOCK:
        while t + 4 <= n_tok:
            a00 = a01 = a02 = a03 = a10 = a11 = a12 = a13 = np.float32(0.0)
            a20 = a21 = a22 = a23 = a30 = a31 = a32 = a33 = np.float32(0.0)
            for k in range(n):
                w0, w1, w2, w3 = w_rows[0, k], w_rows[1, k], w_rows[2, k], w_rows[3, k]
                x0, x1, x2, x3 = x[t, k], x[t + 1, k], x[t + 2, k], x[t + 3, k]
                a00 += w0 * x0
                a01 += w1 * x0
                a02 += w2 * x0
                a03 += w3 * x0
                a10 += w0 * x1
                a11 += w1 * x1
                a12 += w2 * x1
                a13 += w3 * x1
                a20 += w0 * x2
                a21 += w1 * x2
                a22 += w2 * x2
                a23 += w3 * x2
                a30 += w0 * x3
                a31 += w1 * x3
                a32 += w2 * x3
                a33 += w3 * x3
            out[t, r0], out[t, r0 + 1], out[t, r0 + 2], out[t, r0 + 3] = a00, a01, a02, a03
            out[t + 1, r0], out[t + 1, r0 + 1], out[t + 1, r0 + 2], out[t + 1, r0 + 3] = a10, a11, a12, a13
            out[t + 2, r0], out[t + 2, r0 + 1], out[t + 2, r0 + 2], out[t + 2, r0 + 3] = a20, a21, a22, a23
            out[t + 3, r0], out[t + 3, r0 + 1], out[t + 3, r0 + 2], out[t + 3, r0 + 3] = a30, a31, a32, a33
            t += 4
        while t < n_tok:
            a0 = a1 = a2 = a3 = np.float32(0.0)
            for k in range(n):
                xk = x[t, k]
                a0 += w_rows[0, k] * xk
                a1 += w_rows[1, k] * xk
                a2 += w_rows[2, k] * xk
                a3 += w_rows[3, k] * xk
            out[t, r0], out[t, r0 + 1], out[t, r0 + 2], out[t, r0 + 3] = a0, a1, a2, a3
            t += 1
    else:
        for t in range(n_tok):
            for j in range(m):
                acc = np.float32(0.0)
                for k in range(n):
                    acc += w_rows[j, k] * x[t, k]
                out[t, r0 + j] = acc


@njit(cache=True, nogil=True)
def matmul_serial(w_u8, w_type, n_rows, n_cols, x, out):
    """lmengine.kernels.matmul.matmul's float path on the calling thread: out [n_tok, n_rows] = x @ W^T.
    For the small products of an LSTM step, where starting threads costs more than the work.
    F32 rows are read in place; other types are decoded ROW_BLOCK rows at a time."""
    bytes_per_row = row_bytes_of(w_type, n_cols)
    if bytes_per_row < 0 or w_u8.size < n_rows * bytes_per_row:
        raise ValueError("matmul_serial: w_u8 does not hold n_rows rows of n_cols values of w_type")
    if x.shape[1] != n_cols or out.shape[0] != x.shape[0] or out.shape[1] != n_rows:
        raise ValueError("matmul_serial: x must be [n_tok, n_cols] and out [n_tok, n_rows]")
    if w_type == F32_TYPE:
        w = w_u8[:n_rows * bytes_per_row].view(np.float32).reshape(n_rows, n_cols)
        for r0 in range(0, n_rows, ROW_BLOCK):
            _dot_rows(w[r0:min(r0 + ROW_BLOCK, n_rows)], x, out, r0)
    else:
        rows = np.empty((ROW_BLOCK, n_cols), dtype=np.float32)          # decoded rows
        for r0 in range(0, n_rows, ROW_BLOCK):
            m = min(ROW_BLOCK, n_rows - r0)
            for j in range(m):
                start = (r0 + j) * bytes_per_row
                dequantize_row_into(w_type, w_u8[start:start + bytes_per_row], n_cols, rows[j])
            _dot_rows(rows[:m], x, out, r0)


@njit(cache=True, nogil=True)
def _project(blob, tensors, k, x, out, act_q8, one_thread):
    """out [n_tok, n_rows] = x [n_tok, n_cols] @ W_k^T: `matmul_serial` when the product is small
    or one_thread (float path), else lmengine.kernels.matmul.matmul (threads, and int8
    activations for Q8_0/Q4 weights when act_q8)."""
    w, w_type, n_rows, n_cols = _tensor_bytes(blob, tensors, k)
    if x.shape[1] != n_cols or out.shape[1] != n_rows:
        raise ValueError("lstm_forward: activation width does not match a weight matrix")
    int8_path = act_q8 and (w_type == Q8_0_TYPE or w_type == Q4_0_TYPE or w_type == Q4_1_TYPE)
    if n_rows * n_cols * x.shape[0] < PARALLEL_MIN_MACS or (one_thread and not int8_path):
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
def _output_layer(blob, tensors, top, logits, act_q8, one_thread):
    """logits [rows, V] = top [rows, H] @ W_out^T + b_out."""
    _project(blob, tensors, T_OUTPUT, top, logits, act_q8, one_thread)
    bias = _vector(blob, tensors, T_OUTPUT_BIAS)
    if bias.size != logits.shape[1]:
        raise ValueError("lstm_forward: output bias length is not the vocabulary size")
    for r in range(logits.shape[0]):
        for j in range(logits.shape[1]):
            logits[r, j] += bias[j]


# e^x for float32 without libm calls, so that the cell loop vectorizes (LLVM cannot vectorize calls
# to expf/tanhf without a vector math library). Cephes' expf: x = n ln2 + r, |r| <= ln2/2,
# e^r by a degree-5 polynomial, 2^n put into the exponent bits. Relative error < 2e-7 (2 ulp)
# on [-87.3, 88]; inputs are clamped to that range (e^-87.3 ~ 1.2e-38 stands in for smaller values,
# which sigmoid and tanh below turn into exact 0 / 1 / -1 as float32 would).
_EXP_MIN, _EXP_MAX = np.float32(-87.33654), np.float32(88.0)
_LOG2E = np.float32(1.4426950408889634)
_LN2_HI, _LN2_LO = np.float32(0.693359375), np.float32(-2.12194440e-4)
_EXP_POLY = (np.float32(1.9875691500e-4), np.float32(1.3981999507e-3), np.float32(8.3334519073e-3),
             np.float32(4.1665795894e-2), np.float32(1.6666665459e-1), np.float32(5.0000001201e-1))


@njit(cache=True, nogil=True, inline="always", error_model="numpy")
def exp_f32(x):
    """e^x of a float32, branch-free (see above)."""
    x = min(max(x, _EXP_MIN), _EXP_MAX)
    n = np.floor(x * _LOG2E + np.float32(0.5))
    r = x - n * _LN2_HI - n * _LN2_LO
    c0, c1, c2, c3, c4, c5 = _EXP_POLY
    p = ((((c0 * r + c1) * r + c2) * r + c3) * r + c4) * r + c5
    e = p * (r * r) + r + np.float32(1.0)
    return e * _bits_as_f32((np.int32(n) + np.int32(127)) << np.int32(23))       # e * 2^n


@njit(cache=True, nogil=True, inline="always", error_model="numpy")
def sigmoid(x):
    """1 / (1 + e^-x) in float32."""
    return np.float32(1.0) / (np.float32(1.0) + exp_f32(-x))


@njit(cache=True, nogil=True, inline="always", error_model="numpy")
def tanh_f32(x):
    """tanh(x) = sign(x) (1 - e^-2|x|) / (1 + e^-2|x|) in float32 (absolute error < 2e-7)."""
    e = exp_f32(np.float32(-2.0) * abs(x))
    t = (np.float32(1.0) - e) / (np.float32(1.0) + e)
    return t if x >= 0 else -t


@njit(cache=True, nogil=True, error_model="numpy")
def lstm_cell(gates, gates_h, hidden, h, c):
    """One LSTM step of one sequence, in place, in float32 (as PyTorch and Keras compute it).

    gates [4H]: W_ih x + b on entry (overwritten: it holds the activated gates after);
    gates_h [4H]: W_hh h_prev;  h, c [H]: previous state in, new state out. Gate blocks i, f, g, o.
    Each loop touches few arrays, so that LLVM vectorizes it.
    """
    for k in range(4 * hidden):
        gates[k] += gates_h[k]
    for j in range(2 * hidden):                      # i, f
        gates[j] = sigmoid(gates[j])
    for j in range(2 * hidden, 3 * hidden):          # g
        gates[j] = tanh_f32(gates[j])
    for j in range(3 * hidden, 4 * hidden):          # o
        gates[j] = sigmoid(gates[j])
    for j in range(hidden):
        c[j] = gates[hidden + j] * c[j] + gates[j] * gates[2 * hidden + j]
    for j in range(hidden):
        h[j] = gates[3 * hidden + j] * tanh_f32(c[j])


@njit(cache=True, nogil=True)
def lstm_layer(blob, tensors, layer, x, lengths, n_pos, h, c, act_q8, one_thread):
    """Run one LSTM layer over b sequences. x float32 [b * n_pos, n_in] (sequence i at rows
    i*n_pos .. i*n_pos + lengths[i] - 1), h, c float32 [b, H] state (updated in place).
    Returns y float32 [b * n_pos, H], the layer's output h at every position (0 past lengths[i])."""
    k = T_FIRST_LAYER + 3 * layer
    hidden = tensors[k + 1, 3]
    n_seq = h.shape[0]
    gates_x = np.empty((x.shape[0], 4 * hidden), dtype=np.float32)   # [b*n, 4H]
    _project(blob, tensors, k, x, gates_x, act_q8, one_thread)
    bias = _vector(blob, tensors, k + 2)                               # [4H]
    if bias.size != 4 * hidden:
        raise ValueError("lstm_forward: bias length is not 4 * hidden")
    for r in range(gates_x.shape[0]):
        for j in range(4 * hidden):
            gates_x[r, j] += bias[j]
    gates_h = np.empty((n_seq, 4 * hidden), dtype=np.float32)          # [b, 4H]
    y = np.zeros((x.shape[0], hidden), dtype=np.float32)
    for t in range(n_pos):
        _project(blob, tensors, k + 1, h, gates_h, act_q8, one_thread)
        for i in range(n_seq):
            if t < lengths[i]:
                row = i * n_pos + t
                lstm_cell(gates_x[row], gates_h[i], hidden, h[i], c[i])
                y[row, :] = h[i]
    return y


@njit(cache=True, nogil=True)
def lstm_forward(blob, tensors, state_h, state_c, state_offsets, slots, tokens, lengths, all_logits,
                 logits, act_q8, one_thread):
    """Forward b sequences from their current state; write logits and the new state.

    blob          uint8 [n_bytes]         every weight (the GGUF memory map)
    tensors       int64 [3 + 3L, 4]       (byte offset, type, n_rows, n_cols) of token_embd.weight,
                                          output.weight, output.bias, then for each layer l
                                          blk.l.lstm_ih.weight, blk.l.lstm_hh.weight, blk.l.lstm.bias
    state_h/c     float32 [n_slots, S]    h and c of every slot; layer l at columns
                                          state_offsets[l] .. state_offsets[l] + H_l (S = sum H_l)
    slots         int64 [b]               the slot of each sequence (distinct)
    tokens        int64 [b, n]            sequence i's new tokens are tokens[i, :lengths[i]]
    lengths       int64 [b]               1 <= lengths[i] <= n
    logits        float32 [b, n, V]       all_logits: logits at every position (rows past
                  or [b, 1, V]            lengths[i] are unspecified); else at position lengths[i]-1
    act_q8        bool                    int8 activations for Q8_0/Q4 weights (lmengine.kernels.matmul)
    one_thread    bool                    the caller runs one thread: float products stay serial
    """
    n_seq, n_pos = tokens.shape
    n_layers = (tensors.shape[0] - T_FIRST_LAYER) // 3
    embd, embd_type, vocab, emb_dim = _tensor_bytes(blob, tensors, T_EMBD)
    embd_row_bytes = row_bytes_of(embd_type, emb_dim)
    if slots.size != n_seq or lengths.size != n_seq or state_offsets.size != n_layers + 1:
        raise ValueError("lstm_forward: slots, lengths or state_offsets have the wrong length")
    if state_c.shape != state_h.shape or state_offsets[0] != 0 or state_offsets[n_layers] != state_h.shape[1]:
        raise ValueError("lstm_forward: state_h, state_c and state_offsets do not agree")
    for layer in range(n_layers):
        if state_offsets[layer + 1] - state_offsets[layer] != tensors[T_FIRST_LAYER + 3 * layer + 1, 3]:
            raise ValueError("lstm_forward: a layer's state width is not its hidden size")
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
        x = lstm_layer(blob, tensors, layer, x, lengths, n_pos, h, c, act_q8, one_thread)
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
    _output_layer(blob, tensors, top, logits.reshape(top.shape[0], logits.shape[2]), act_q8, one_thread)
