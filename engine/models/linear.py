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
from typing import Callable

import numpy as np

from lmengine.converters.errors import TensorShapeError, UnsupportedQuantTypeError
from lmengine.kernels import quant

from .row_threads import RowThreads

FLOAT_TYPES = (quant.F32, quant.F16, quant.BF16)
ROWS_PER_CALL = 512      # rows of x per quantized product (x stays in L2)
MIN_ROWS_PER_THREAD = 64   # a product split among RowThreads gives each thread at least this many rows


def blas_limits_work() -> bool:
    """Whether `blas_threads` can set BLAS's thread count (threadpoolctl is installed)."""
    try:
        import threadpoolctl  # noqa: F401
    except ImportError:
        return False
    return True


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
        self.parts = None
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

    @classmethod
    def fused(cls, parts: list["Linear"]) -> "Linear":
        """One Linear computing the parts' products side by side (y = [y_0 | y_1 | ...]): one
        GEMM with a wider output instead of several (BERT's q, k and v). Float parts are
        concatenated (a copy of their weights); quantized ones keep their blocks and run one
        after another into their columns of y."""
        if not all(p.n_cols == parts[0].n_cols for p in parts):
            raise ValueError("fused Linears must read the same width of x")
        self = cls.__new__(cls)
        self.name = "+".join(p.name for p in parts)
        self.n_rows, self.n_cols, self.type_id = sum(p.n_rows for p in parts), parts[0].n_cols, parts[0].type_id
        floats = all(p.w is not None for p in parts)
        self.w = np.concatenate([p.w for p in parts]) if floats else None
        self.parts = None if floats else parts
        biases = [p.bias if p.bias is not None else np.zeros(p.n_rows, dtype=np.float32) for p in parts]
        self.bias = None if all(p.bias is None for p in parts) else np.concatenate(biases)
        return self

    def __call__(self, x: np.ndarray, add_bias: bool = True, residual: np.ndarray | None = None,
                 rows: RowThreads | None = None, then: Callable[[int, int], None] | None = None,
                 out: np.ndarray | None = None) -> np.ndarray:
        """x float32 [n, n_cols] (C-contiguous) -> float32 [n, n_rows] (+ bias unless add_bias is
        False). residual: a float32 [n, n_rows] array that gets the result added in place (bias
        included, one pass) and is returned.
        rows: the rows of x are shared among these threads: each computes its rows' GEMM (float
        matrices), their bias or residual add, and then(begin, end), while they are in its cache;
        the caller has BLAS run one-threaded. None: BLAS's and Numba's own threads, one range.
        then: what to do next to rows begin..end of the result (a LayerNorm, an activation).
        out: where the product goes (float32 [n, n_rows], C-contiguous); None: a new array."""
        from lmengine.kernels.layernorm import add_rows, add_rows_bias
        if out is None:
            out = np.empty((x.shape[0], self.n_rows), dtype=np.float32)
        bias = self.bias if add_bias else None
        parallel = rows is None

        def finish(begin: int, end: int) -> None:          # bias and residual of rows begin..end
            if residual is not None and bias is not None:
                add_rows_bias(residual[begin:end], out[begin:end], bias, parallel)
            elif residual is not None:
                add_rows(residual[begin:end], out[begin:end], parallel)
            elif bias is not None:
                out[begin:end] += bias
            if then is not None:
                then(begin, end)

        def product(begin: int, end: int) -> None:
            np.matmul(x[begin:end], self.w.T, out=out[begin:end])
            finish(begin, end)

        if self.w is not None:
            step = product
        else:
            self._product_by_parts(x, out)
            step = finish
        if rows is None:
            step(0, x.shape[0])
        else:
            rows.split(step, x.shape[0], min_per_thread=MIN_ROWS_PER_THREAD)
        return residual if residual is not None else out

    def _product_by_parts(self, x: np.ndarray, out: np.ndarray) -> None:
        """out = x @ W.T without bias for fused parts or a quantized matrix (Numba's threads)."""
        if self.parts is not None:
            col = 0
            for part in self.parts:
                out[:, col:col + part.n_rows] = part(x, add_bias=False)
                col += part.n_rows
            return
        from lmengine.kernels.matmul import matmul_f32   # compiled on first use (quantized files only)
        for begin in range(0, x.shape[0], ROWS_PER_CALL):
            end = min(x.shape[0], begin + ROWS_PER_CALL)
            part = np.empty((end - begin, self.n_rows), dtype=np.float32)
            matmul_f32(self.raw, self.type_id, self.n_rows, self.n_cols, np.ascontiguousarray(x[begin:end]), part)
            out[begin:end] = part
