"""`Linear`: one GGUF weight matrix (and its bias) as a product y = x @ W.T + b, for the encoder
and GPT-2 forward passes (engine/models/bert.py, gpt2.py).

Float matrices (F32, F16, BF16) run as a BLAS GEMM (NumPy's OpenBLAS): an F32 matrix straight
from the file's memory map (no copy), F16/BF16 decoded to float32 once at load. An encoder's
products have thousands of rows of x (32 sentences x 128 tokens), where a cache-blocked GEMM is
~5-7x the row-streaming kernels of lmengine.kernels.matmul (measured in docs/EMBEDDINGS.md).
Quantized matrices (Q8_0, Q4_K, ...) stay raw blocks in the map and run through
`lmengine.kernels.matmul.matmul_f32` (decoded block by block, float32 activations), 512 rows of x
per call so that x stays in the cache.
"""
from __future__ import annotations

import contextlib

import numpy as np

from lmengine.converters.errors import TensorShapeError, UnsupportedQuantTypeError
from lmengine.kernels import quant

FLOAT_TYPES = (quant.F32, quant.F16, quant.BF16)
ROWS_PER_CALL = 512      # rows of x per quantized product (x stays in L2)


def blas_threads(n_threads: int | None):
    """A context in which NumPy's BLAS uses n_threads threads (threadpoolctl; a no-op where it
    is not installed). Attention's many small products run fastest on one thread each; the
    weight products on all of them."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=n_threads, user_api="blas")


def tensor(f, name: str, shape: tuple) -> np.ndarray:
    """A (small) tensor decoded to float32 with the given NumPy shape; missing or misshapen
    tensors raise an error naming the tensor."""
    info = f.tensors.get(name)
    if info is None:
        raise TensorShapeError(f"{f.path}: tensor {name!r} is missing (expected shape {shape})")
    if tuple(info.shape) != tuple(shape):
        raise TensorShapeError(f"{f.path}: tensor {name!r} has shape {tuple(info.shape)}, expected {tuple(shape)}")
    if info.type_id not in quant.TYPE_NAMES:
        raise UnsupportedQuantTypeError(f"{f.path}: tensor {name!r} has a type lmengine cannot decode")
    raw = f.tensor_bytes(name)
    if info.type_id in (quant.F32, quant.F16):      # NumPy decodes these: no compiled code needed
        out = raw.view(np.float32 if info.type_id == quant.F32 else np.float16).reshape(shape)
    else:
        out = quant.dequantize(info.type_id, raw, info.shape)
    return np.ascontiguousarray(out, dtype=np.float32)


class Linear:
    """y [n, n_rows] = x [n, n_cols] @ W.T (+ bias), W the GGUF matrix `name` ([n_rows, n_cols])."""

    def __init__(self, f, name: str, n_rows: int, n_cols: int, bias: str | None = None):
        info = f.tensors.get(name)
        if info is None:
            raise TensorShapeError(f"{f.path}: tensor {name!r} is missing (expected shape ({n_rows}, {n_cols}))")
        if tuple(info.shape) != (n_rows, n_cols):
            raise TensorShapeError(f"{f.path}: tensor {name!r} has shape {tuple(info.shape)}, "
                                   f"expected ({n_rows}, {n_cols})")
        self.name, self.n_rows, self.n_cols, self.type_id = name, n_rows, n_cols, info.type_id
        if info.type_id == quant.F32:
            self.w = f.tensor_bytes(name).view(np.float32).reshape(n_rows, n_cols)   # the map itself
        elif info.type_id in FLOAT_TYPES:
            self.w = tensor(f, name, (n_rows, n_cols))
        else:
            if n_cols % quant.block_size(info.type_id):
                raise TensorShapeError(f"{f.path}: tensor {name!r} rows are not whole {info.type_name} blocks")
            self.w = None
            self.raw = f.tensor_bytes(name)          # uint8 blocks, read by matmul_f32
        self.bias = tensor(f, bias, (n_rows,)) if bias is not None else None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """x float32 [n, n_cols] (C-contiguous) -> float32 [n, n_rows]."""
        out = np.empty((x.shape[0], self.n_rows), dtype=np.float32)
        if self.w is not None:
            np.matmul(x, self.w.T, out=out)
        else:
            from lmengine.kernels.matmul import matmul_f32   # compiled on first use (quantized files only)
            for begin in range(0, x.shape[0], ROWS_PER_CALL):
                end = min(x.shape[0], begin + ROWS_PER_CALL)
                part = np.empty((end - begin, self.n_rows), dtype=np.float32)
                matmul_f32(self.raw, self.type_id, self.n_rows, self.n_cols, np.ascontiguousarray(x[begin:end]), part)
                out[begin:end] = part
        if self.bias is not None:
            out += self.bias
        return out
