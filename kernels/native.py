"""The C kernels (kernels/csrc/, API in lmengine.h: cpu.c the SIMD path, qdot.c row-major quantized
products, packed.c the 16-row packed layout and its product, attention.c, ops.c swiglu, softmax rows,
activation quantization, f16 conversion and rope; built by cffi as `lmengine.kernels._native`) for Python and
Numba. Every C function has a portable path beside its SIMD ones, so it runs on any CPU.

Loading: `HAVE_NATIVE` says whether the extension was found and loaded (`LOAD_ERROR` says why
not; `fast_path_note()` makes of it one sentence for the user). Setting the environment variable
LMENGINE_NO_NATIVE=1 before the first import makes this process behave as if it were missing
(tests use it to run the Numba fallback end to end).

Calling from Numba, and why not `lib.fn(...)`: Numba can call functions of a cffi module in
nopython mode (after `numba.core.typing.cffi_utils.register_module`, which this module does not
do: it imports cffi's C parser, ~0.04 s of every start), but it embeds the function's address in
the compiled code, which makes that code uncacheable (and every Numba function that calls it). Our kernels instead call the C
functions through named JIT symbols (`c_matmul_q8`, `c_matmul_f32`, `c_matmul_packed`,
`c_attention`, `c_swiglu`, `c_softmax_rows`, `c_quantize_row`, `c_to_f16`, `c_rope`,
`c_native_available` below):
compiled code refers to the name, and this module binds each name to an address when it is
imported -- to the C function when the extension is loaded, otherwise to a Numba `cfunc`
stand-in that returns LME_ERR_NO_NATIVE (the stand-in for `c_native_available` returns 0). So
code cached on disk can always be loaded and run: it asks `c_native_available()` at run time, or
sees the stand-in's nonzero status, and takes the Numba path in a process without the extension.

Python wrappers (`matmul_q8_rows`, `matmul_f32_rows`, `pack_q8`, `packed_bytes`) call one C
function with full argument checks (ValueError naming the problem); `set_isa` / `get_isa` / `best_isa` /
`available_isas` select or report the SIMD path (tests force each one).
"""
import os

import llvmlite.binding as llvm_binding
import numpy as np
from llvmlite import ir
from numba import cfunc, types
from numba.core import cgutils
from numba.extending import intrinsic

from .quant import BF16, F16, F32, IQ4_XS, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K, Q8_0, QK, TYPE_NAMES, row_bytes

ISA_SCALAR, ISA_AVX2, ISA_AVX512 = 0, 1, 2
ISA_NAMES = {ISA_SCALAR: "scalar", ISA_AVX2: "avx2", ISA_AVX512: "avx512-vnni"}

ERR_NO_NATIVE = -100
ERROR_MESSAGES = {
    -1: "a NULL pointer", -2: "unsupported ggml type", -3: "bad shape (n_rows/n_cols/n_tok)",
    -4: "row range outside [0, n_rows]", -5: "a buffer shorter than its shape needs",
    -6: "SIMD path not supported by this CPU", ERR_NO_NATIVE: "the C extension is not loaded",
}

# -- load the extension ---------------------------------------------------------------------------

ffi = lib = None
LOAD_ERROR = None
if os.environ.get("LMENGINE_NO_NATIVE", "") not in ("", "0"):
    LOAD_ERROR = "disabled by LMENGINE_NO_NATIVE"
else:
    try:
        from . import _native
        ffi, lib = _native.ffi, _native.lib
        lib.lme_matmul_q8, lib.lme_matmul_f32, lib.lme_native_available   # an older build lacks these
        lib.lme_matmul_packed, lib.lme_pack_q8, lib.lme_packed_bytes, lib.lme_attention, lib.lme_swiglu, lib.lme_quantize_row
        lib.lme_to_f16, lib.lme_rope, lib.lme_matmul_k, lib.lme_quantize_q8k, lib.lme_softmax_rows
    except (ImportError, AttributeError) as exc:
        ffi = lib = None
        LOAD_ERROR = f"lmengine.kernels._native could not be loaded ({exc}); build it with `pip install -e .`"
HAVE_NATIVE = lib is not None


def fast_path_note() -> str | None:
    """None when the C extension is loaded; otherwise one sentence for logs (`lmengine info`, the
    verbose LLM log) saying that this process runs on the Numba kernels only, why, and the remedy."""
    return None if HAVE_NATIVE else (
        f"lmengine is running on its Numba kernels only (the C extension is not loaded: {LOAD_ERROR}); "
        "for the fast path reinstall with a C compiler (gcc/clang) available or install the prebuilt wheel")


def kernels_in_use() -> str:
    """One line for `lmengine info` and load logs: the C extension's SIMD path, or
    `fast_path_note()` when only the Numba kernels run."""
    return fast_path_note() or f"C kernels loaded ({ISA_NAMES[get_isa()]} path)"


# -- JIT symbols: name -> C function or Numba stand-in ---------------------------------------------

_p, _i64 = types.voidptr, types.int64
_SIG_AVAILABLE = types.int32()
_SIG_Q8 = types.int32(_i64, _p, _i64, _i64, _i64, _i64, _i64, _p, _i64, _p, _i64, _p, _i64, _i64, _p, _i64)
_SIG_F32 = types.int32(_i64, _p, _i64, _i64, _i64, _i64, _i64, _p, _i64, _i64, _p, _i64)
_SIG_PACKED = types.int32(_i64, _p, _i64, _i64, _i64, _i64, _i64, _p, _i64, _i64, _p, _i64, _p, _i64, _i64,
                          _i64, _p, _i64)


def _stand_in(signature):
    """Mark a stand-in with its C signature. It is compiled (a cached Numba cfunc) only in a process
    without the extension, in the binding loop below: with the extension, importing this module
    loads none of them (11 cached cfuncs took about 0.5 s of every start)."""
    def mark(fn):
        fn.signature = signature
        return fn
    return mark


@_stand_in(_SIG_AVAILABLE)
def _stub_available():
    return 0


@_stand_in(_SIG_Q8)
def _stub_matmul_q8(w_type, w, w_len, n_rows, n_cols, row_begin, row_end, xq, xq_len, xd, xd_len,
                    xs, xs_len, n_tok, out, out_len):
    return ERR_NO_NATIVE


@_stand_in(_SIG_F32)
def _stub_matmul_f32(w_type, w, w_len, n_rows, n_cols, row_begin, row_end, x, x_len, n_tok, out, out_len):
    return ERR_NO_NATIVE


@_stand_in(_SIG_PACKED)
def _stub_matmul_packed(w_type, p, p_len, n_rows, n_cols, row_begin, row_end, xq, xq_len, xq_stride, xd,
                        xd_len, xs, xs_len, n_tok, n_terms, out, out_len):
    return ERR_NO_NATIVE


_SIG_ATTENTION = types.int32(_i64, _p, _i64, _i64, _i64, _p, _i64, _p, _i64, _i64, _i64, types.float32, _p, _i64,
                             _p, _i64)


@_stand_in(_SIG_ATTENTION)
def _stub_attention(kv_type, q, q_len, group, head_dim, keys, keys_len, values, values_len, n_pos, first_pos, cap,
                    scores, scores_len, out, out_len):
    return ERR_NO_NATIVE


_SIG_SWIGLU = types.int32(_p, _i64, _p, _i64, _p, _i64)


@_stand_in(_SIG_SWIGLU)
def _stub_swiglu(gate, gate_len, up, up_len, out, out_len):
    return ERR_NO_NATIVE


_SIG_SOFTMAX_ROWS = types.int32(_p, _i64, _i64, _p, _i64)


@_stand_in(_SIG_SOFTMAX_ROWS)
def _stub_softmax_rows(s, s_len, n_cols, sums, sums_len):
    return ERR_NO_NATIVE


_SIG_QUANTIZE = types.int32(*([_p, _i64] * 7))


@_stand_in(_SIG_QUANTIZE)
def _stub_quantize_row(x, x_len, xq, xq_len, xd, xd_len, xs, xs_len, rq, rq_len, rd, rd_len, rs, rs_len):
    return ERR_NO_NATIVE


_SIG_TO_F16 = types.int32(_p, _i64, _p, _i64)


@_stand_in(_SIG_TO_F16)
def _stub_to_f16(x, x_len, out, out_len):
    return ERR_NO_NATIVE


_SIG_ROPE = types.int32(_p, _i64, _i64, _i64, _i64, _i64, _p, _i64, _p, _i64)


@_stand_in(_SIG_ROPE)
def _stub_rope(x, x_len, n_heads, head_dim, rope_dim, neox, cos, cos_len, sin, sin_len):
    return ERR_NO_NATIVE


_SIG_MATMUL_K = types.int32(_i64, _p, _i64, _i64, _i64, _i64, _i64, _p, _i64, _p, _i64, _p, _i64, _i64, _p, _i64)


@_stand_in(_SIG_MATMUL_K)
def _stub_matmul_k(w_type, w, w_len, n_rows, n_cols, row_begin, row_end, xq, xq_len, xd, xd_len,
                   xsum, xsum_len, n_tok, out, out_len):
    return ERR_NO_NATIVE


_SIG_QUANTIZE_Q8K = types.int32(_p, _i64, _i64, _i64, _p, _i64, _p, _i64, _p, _i64)


@_stand_in(_SIG_QUANTIZE_Q8K)
def _stub_quantize_q8k(x, x_len, n_tok, n_cols, xq, xq_len, xd, xd_len, xsum, xsum_len):
    return ERR_NO_NATIVE


_SYMBOLS = {   # JIT symbol: (C function name, stand-in)
    "lmengine_native_available": ("lme_native_available", _stub_available),
    "lmengine_matmul_q8": ("lme_matmul_q8", _stub_matmul_q8),
    "lmengine_matmul_f32": ("lme_matmul_f32", _stub_matmul_f32),
    "lmengine_matmul_packed": ("lme_matmul_packed", _stub_matmul_packed),
    "lmengine_attention": ("lme_attention", _stub_attention),
    "lmengine_swiglu": ("lme_swiglu", _stub_swiglu),
    "lmengine_softmax_rows": ("lme_softmax_rows", _stub_softmax_rows),
    "lmengine_quantize_row": ("lme_quantize_row", _stub_quantize_row),
    "lmengine_to_f16": ("lme_to_f16", _stub_to_f16),
    "lmengine_rope": ("lme_rope", _stub_rope),
    "lmengine_matmul_k": ("lme_matmul_k", _stub_matmul_k),
    "lmengine_quantize_q8k": ("lme_quantize_q8k", _stub_quantize_q8k),
}
for _symbol, (_c_name, _stub) in _SYMBOLS.items():
    if HAVE_NATIVE:
        _address = int(ffi.cast("uintptr_t", ffi.addressof(lib, _c_name)))
    else:
        _address = cfunc(_stub.signature, cache=True)(_stub).address
    llvm_binding.add_symbol(_symbol, _address)


def _lower_extern_call(builder, context, symbol, arg_types, args):
    """Call `int symbol(...)`: integers pass as int64, floats as float, arrays as (data pointer,
    element count)."""
    i64, ptr = ir.IntType(64), ir.IntType(8).as_pointer()
    ll_types, ll_args = [], []
    for ty, value in zip(arg_types, args):
        if isinstance(ty, types.Array):
            array = context.make_array(ty)(context, builder, value)
            ll_types += [ptr, i64]
            ll_args += [builder.bitcast(array.data, ptr), array.nitems]
        elif isinstance(ty, types.Float):
            ll_types.append(ir.FloatType())
            ll_args.append(context.cast(builder, value, ty, types.float32))
        else:
            ll_types.append(i64)
            ll_args.append(context.cast(builder, value, ty, types.int64))
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.IntType(32), ll_types), symbol)
    return builder.call(fn, ll_args)


INT = "int"                                      # an integer argument (passed as int64)
FLOAT = "float"                                  # a float argument (passed as a C float)
U8_1D, I8_1D, I8_2D, U16_1D = (types.uint8, 1), (types.int8, 1), (types.int8, 2), (types.uint16, 1)
I16_2D = (types.int16, 2)
F32_1D, F32_2D, F32_ANY = (types.float32, 1), (types.float32, 2), (types.float32, None)
KV_ANY = ((types.float32, types.uint16), None)   # a KV cache array: float32, or f16 bits as uint16


def _extern(symbol, arg_types, kinds):
    """(signature, codegen) of an intrinsic that calls the JIT symbol `symbol` with these
    arguments, when their types match `kinds` (INT, or (dtype, ndim) for an array, dtype a tuple
    for several, ndim None for any); None (no match: Numba reports a typing error) otherwise."""
    for ty, kind in zip(arg_types, kinds, strict=True):
        if kind == INT:
            if not isinstance(ty, types.Integer):
                return None
            continue
        if kind == FLOAT:
            if not isinstance(ty, types.Float):
                return None
            continue
        dtypes = kind[0] if isinstance(kind[0], tuple) else (kind[0],)
        if not (isinstance(ty, types.Array) and ty.dtype in dtypes and kind[1] in (None, ty.ndim)):
            return None

    def codegen(context, builder, signature, args):
        return _lower_extern_call(builder, context, symbol, signature.args, args)
    return types.int32(*arg_types), codegen


@intrinsic
def c_native_available(typingctx):
    """1 when the C extension is bound in this process, else 0 (Numba-callable)."""
    return _extern("lmengine_native_available", (), ())


@intrinsic
def c_matmul_q8(typingctx, w_type, w_u8, n_rows, n_cols, row_begin, row_end, xq, xd, xs, n_tok, out):
    """lme_matmul_q8 on rows [row_begin, row_end); returns its status (0 = ok). Arrays must be
    contiguous (the caller checks): w_u8 uint8 1-D, xq int8 2-D, xd/xs/out float32 2-D."""
    return _extern("lmengine_matmul_q8", (w_type, w_u8, n_rows, n_cols, row_begin, row_end, xq, xd, xs, n_tok, out),
                   (INT, U8_1D, INT, INT, INT, INT, I8_2D, F32_2D, F32_2D, INT, F32_2D))


@intrinsic
def c_matmul_k(typingctx, w_type, w_u8, n_rows, n_cols, row_begin, row_end, xq, xd, xsum, n_tok, out):
    """lme_matmul_k (K-quant weights, Q8_K activations) on rows [row_begin, row_end); returns its
    status. Contiguous arrays: w_u8 uint8 1-D, xq int8 2-D, xd float32 2-D, xsum int16 2-D, out
    float32 2-D."""
    return _extern("lmengine_matmul_k", (w_type, w_u8, n_rows, n_cols, row_begin, row_end, xq, xd, xsum, n_tok, out),
                   (INT, U8_1D, INT, INT, INT, INT, I8_2D, F32_2D, I16_2D, INT, F32_2D))


@intrinsic
def c_quantize_q8k(typingctx, x, xq, xd, xsum):
    """lme_quantize_q8k: x float32 [n_tok, n_cols] -> Q8_K activations xq int8, xd float32, xsum
    int16 (2-D, contiguous); returns its status. n_tok and n_cols are read from xq's shape."""
    def codegen(context, builder, signature, args):
        x_a, xq_a, xd_a, xsum_a = args
        shape = cgutils.unpack_tuple(builder, context.make_array(signature.args[1])(context, builder, xq_a).shape)
        full = [x_a, shape[0], shape[1], xq_a, xd_a, xsum_a]
        return _lower_extern_call(builder, context, "lmengine_quantize_q8k",
                                  (signature.args[0], types.int64, types.int64) + signature.args[1:], full)
    kinds = ((types.float32, 2), (types.int8, 2), (types.float32, 2), (types.int16, 2))
    for ty, (dtype, ndim) in zip((x, xq, xd, xsum), kinds):
        if not (isinstance(ty, types.Array) and ty.dtype == dtype and ty.ndim == ndim):
            return None
    return types.int32(x, xq, xd, xsum), codegen


@intrinsic
def c_matmul_f32(typingctx, w_type, w_u8, n_rows, n_cols, row_begin, row_end, x, n_tok, out):
    """lme_matmul_f32 on rows [row_begin, row_end); returns its status (0 = ok). Arrays must be
    contiguous (the caller checks): w_u8 uint8 1-D, x and out float32 2-D."""
    return _extern("lmengine_matmul_f32", (w_type, w_u8, n_rows, n_cols, row_begin, row_end, x, n_tok, out),
                   (INT, U8_1D, INT, INT, INT, INT, F32_2D, INT, F32_2D))


@intrinsic
def c_matmul_packed(typingctx, w_type, p_u8, n_rows, n_cols, row_begin, row_end, xq, xd, xs, n_tok,
                    n_terms, out):
    """lme_matmul_packed on rows [row_begin, row_end) (row_begin a multiple of PACK_ROWS) of a
    matrix packed by `pack_q8`; returns its status (0 = ok). Arrays must be contiguous (the
    caller checks): p_u8 uint8 1-D, xq int8 2-D (its rows xq.shape[1] >= n_cols bytes apart: a
    padded row stride), xd/xs/out float32 2-D."""
    kinds = (INT, U8_1D, INT, INT, INT, INT, I8_2D, F32_2D, F32_2D, INT, INT, F32_2D)
    arg_types = (w_type, p_u8, n_rows, n_cols, row_begin, row_end, xq, xd, xs, n_tok, n_terms, out)
    if _extern("lmengine_matmul_packed", arg_types, kinds) is None:
        return None

    def codegen(context, builder, signature, args):
        stride = cgutils.unpack_tuple(builder, context.make_array(signature.args[6])(context, builder, args[6]).shape)[1]
        full = list(args[:7]) + [stride] + list(args[7:])
        full_types = signature.args[:7] + (types.int64,) + signature.args[7:]
        return _lower_extern_call(builder, context, "lmengine_matmul_packed", full_types, full)
    return types.int32(*arg_types), codegen


@intrinsic
def c_attention(typingctx, kv_type, q, group, head_dim, keys, values, n_pos, first_pos, cap, scores, out):
    """lme_attention for one token and one kv head's group of query heads, over positions
    first_pos .. n_pos - 1, scores soft-capped when cap > 0; returns its status (0 = ok; else,
    e.g. without the extension, the caller computes it). Arrays contiguous: q [group * head_dim]
    pre-scaled, scores scratch, out [group * head_dim] float32; keys (tiles) and values of the
    slot's kv head, float32 (kv_type F32) or f16 bits as uint16 (kv_type F16)."""
    return _extern("lmengine_attention", (kv_type, q, group, head_dim, keys, values, n_pos, first_pos, cap, scores,
                                          out),
                   (INT, F32_ANY, INT, INT, KV_ANY, KV_ANY, INT, INT, FLOAT, F32_ANY, F32_ANY))


@intrinsic
def c_to_f16(typingctx, x, out):
    """lme_to_f16: float32 x -> f16 bits in uint16 out, both contiguous 1-D (the caller checks);
    0 = done, else the caller converts."""
    return _extern("lmengine_to_f16", (x, out), (F32_1D, U16_1D))


@intrinsic
def c_rope(typingctx, x, n_heads, head_dim, rope_dim, neox, cos, sin):
    """lme_rope on one token's row x (float32 1-D, contiguous: the caller checks) with its cos,
    sin (float32 1-D, contiguous); 0 = done, else the caller rotates."""
    return _extern("lmengine_rope", (x, n_heads, head_dim, rope_dim, neox, cos, sin),
                   (F32_1D, INT, INT, INT, INT, F32_1D, F32_1D))


@intrinsic
def c_swiglu(typingctx, gate, up, out):
    """lme_swiglu on three float32 1-D arrays (contiguous: the caller checks); 0 = done, else the
    caller computes it."""
    return _extern("lmengine_swiglu", (gate, up, out), (F32_1D, F32_1D, F32_1D))


@intrinsic
def c_softmax_rows(typingctx, s, n_cols, sums):
    """lme_softmax_rows on float32 s (C-contiguous rows of n_cols: the caller checks) and sums
    (float32 1-D, one per row); 0 = done, else the caller computes it."""
    return _extern("lmengine_softmax_rows", (s, n_cols, sums), (F32_ANY, INT, F32_1D))


@intrinsic
def c_quantize_row(typingctx, x, xq, xd, xs, rq, rd, rs):
    """lme_quantize_row on contiguous 1-D arrays (the caller checks): x float32, xq/rq int8,
    xd/xs/rd/rs float32; rq empty for one term. 0 = done, else the caller computes it."""
    return _extern("lmengine_quantize_row", (x, xq, xd, xs, rq, rd, rs),
                   (F32_1D, I8_1D, F32_1D, F32_1D, I8_1D, F32_1D, F32_1D))


# -- SIMD path selection ----------------------------------------------------------------------------

def _require_native():
    if not HAVE_NATIVE:
        raise RuntimeError(f"the C kernels are not available: {LOAD_ERROR}")


def best_isa() -> int:
    """The best SIMD path this CPU supports (ISA_SCALAR / ISA_AVX2 / ISA_AVX512)."""
    _require_native()
    return lib.lme_best_isa()


def get_isa() -> int:
    """The SIMD path the C kernels use now."""
    _require_native()
    return lib.lme_get_isa()


def available_isas() -> list:
    """Every path this CPU can run, scalar first."""
    _require_native()
    return [isa for isa in ISA_NAMES if isa <= lib.lme_best_isa()]


def set_isa(isa) -> None:
    """Force a SIMD path for all threads (None or -1: the best one). ValueError if unsupported.
    Not meant to be switched while kernels run in other threads."""
    _require_native()
    isa = -1 if isa is None else int(isa)
    if lib.lme_set_isa(isa) != 0:
        raise ValueError(f"SIMD path {isa} ({ISA_NAMES.get(isa, 'unknown')}) is not supported on this "
                         f"CPU; available: {[ISA_NAMES[i] for i in available_isas()]}")


# -- checked Python calls (one C call, no threads) -------------------------------------------------

Q8_TYPES = (Q8_0, Q4_0, Q4_1)                    # weight types of lme_matmul_q8
F32_TYPES = (F32, F16, BF16, Q8_0, Q4_0, Q4_1)   # weight types of lme_matmul_f32


def _check_type(w_type, supported):
    if int(w_type) not in supported:
        names = ", ".join(f"{TYPE_NAMES[t]}={t}" for t in supported)
        raise ValueError(f"w_type must be one of {names}, got {w_type}")


def _contiguous(name, array, dtype, ndim):
    if not isinstance(array, np.ndarray) or array.dtype != dtype or array.ndim != ndim:
        got = f"{array.dtype} {array.ndim}-D array" if isinstance(array, np.ndarray) else type(array).__name__
        raise ValueError(f"{name} must be a {np.dtype(dtype)} {ndim}-D array, got {got}")
    if not array.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous")
    return array


def _check_rows(w_u8, n_rows, n_cols, row_begin, row_end, n_tok, out, row_bytes):
    if n_rows < 0 or n_cols <= 0:
        raise ValueError(f"n_rows must be >= 0 and n_cols > 0, got n_rows={n_rows}, n_cols={n_cols}")
    if w_u8.size < n_rows * row_bytes:
        raise ValueError(f"w_u8 holds {w_u8.size} bytes, an ({n_rows}, {n_cols}) matrix needs "
                         f"{n_rows} x {row_bytes} = {n_rows * row_bytes}")
    if not 0 <= row_begin <= row_end <= n_rows:
        raise ValueError(f"row range [{row_begin}, {row_end}) is outside [0, {n_rows}]")
    if out.shape != (n_tok, n_rows):
        raise ValueError(f"out has shape {out.shape}, expected (n_tok, n_rows) = {(n_tok, n_rows)}")


def _raise_on_status(status, what):
    if status != 0:
        raise ValueError(f"{what}: the C kernel rejected its arguments: "
                         f"{ERROR_MESSAGES.get(status, f'status {status}')}")


def matmul_q8_rows(w_u8, w_type, n_rows, n_cols, row_begin, row_end, xq, xd, xs, out) -> None:
    """out[:, row_begin:row_end] = W[row_begin:row_end] . x (int8 activations) with one C call
    in this thread. Shapes as in `lmengine.kernels.matmul.matmul_q8`."""
    _require_native()
    w_u8 = _contiguous("w_u8", w_u8, np.uint8, 1)
    xq = _contiguous("xq", xq, np.int8, 2)
    xd, xs = _contiguous("xd", xd, np.float32, 2), _contiguous("xs", xs, np.float32, 2)
    out = _contiguous("out", out, np.float32, 2)
    _check_type(w_type, Q8_TYPES)
    bytes_per_row = row_bytes(w_type, n_cols)
    n_tok = xq.shape[0]
    if xq.shape != (n_tok, n_cols) or xd.shape != (n_tok, n_cols // QK) or xs.shape != xd.shape:
        raise ValueError(f"xq {xq.shape}, xd {xd.shape}, xs {xs.shape} do not match "
                         f"(n_tok, n_cols) = ({n_tok}, {n_cols}) and (n_tok, n_cols // 32)")
    _check_rows(w_u8, n_rows, n_cols, row_begin, row_end, n_tok, out, bytes_per_row)
    status = lib.lme_matmul_q8(
        int(w_type), ffi.from_buffer("uint8_t[]", w_u8), w_u8.size, n_rows, n_cols, row_begin, row_end,
        ffi.from_buffer("int8_t[]", xq), xq.size, ffi.from_buffer("float[]", xd), xd.size,
        ffi.from_buffer("float[]", xs), xs.size, n_tok, ffi.from_buffer("float[]", out, require_writable=True),
        out.size)
    _raise_on_status(status, "matmul_q8_rows")


PACK_ROWS = 16   # rows per group of the packed layout (kernels/csrc/packed.c)
PACKED_TYPES = (Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K, IQ4_XS)   # weight types with a packed layout


def packs_well() -> bool:
    """Whether packing pays here: the extension is loaded and its selected path (`get_isa`) is
    AVX2 or AVX-512 VNNI, the ones with a SIMD kernel for the packed layout (the scalar path's is
    a portable loop). On AVX2 the packed product is 1.1-2x the row-major one (kernels/csrc/packed.c)."""
    return HAVE_NATIVE and lib.lme_get_isa() >= ISA_AVX2


def packed_bytes(w_type, n_rows, n_cols) -> int:
    """Size of the packed form of an (n_rows, n_cols) matrix of a type in PACKED_TYPES."""
    _require_native()
    _check_type(w_type, PACKED_TYPES)
    size = lib.lme_packed_bytes(int(w_type), int(n_rows), int(n_cols))
    _raise_on_status(size if size < 0 else 0, "packed_bytes")
    return size


def pack_q8(w_u8, w_type, n_rows, n_cols, out=None) -> np.ndarray:
    """The 16-row packed form (kernels/csrc/packed.c) of the (n_rows, n_cols) matrix of raw
    blocks w_u8 (a type in PACKED_TYPES), written into `out` (uint8 [packed_bytes(...)]) or a new array."""
    w_u8 = _contiguous("w_u8", np.asarray(w_u8), np.uint8, 1)
    size = packed_bytes(w_type, n_rows, n_cols)
    out = np.empty(size, dtype=np.uint8) if out is None else _contiguous("out", out, np.uint8, 1)
    if out.size != size:
        raise ValueError(f"out holds {out.size} bytes, the packed matrix needs {size}")
    status = lib.lme_pack_q8(int(w_type), ffi.from_buffer("uint8_t[]", w_u8), w_u8.size, int(n_rows),
                             int(n_cols), ffi.from_buffer("uint8_t[]", out, require_writable=True), out.size)
    _raise_on_status(status, "pack_q8")
    return out


def matmul_f32_rows(w_u8, w_type, n_rows, n_cols, row_begin, row_end, x, out) -> None:
    """out[:, row_begin:row_end] = W[row_begin:row_end] . x (float activations) with one C call
    in this thread. w_type F32, F16, BF16, Q8_0, Q4_0 or Q4_1."""
    _require_native()
    w_u8 = _contiguous("w_u8", w_u8, np.uint8, 1)
    x, out = _contiguous("x", x, np.float32, 2), _contiguous("out", out, np.float32, 2)
    _check_type(w_type, F32_TYPES)
    bytes_per_row = row_bytes(w_type, n_cols)
    n_tok = x.shape[0]
    if x.shape != (n_tok, n_cols):
        raise ValueError(f"x has shape {x.shape}, expected (n_tok, n_cols) with n_cols={n_cols}")
    _check_rows(w_u8, n_rows, n_cols, row_begin, row_end, n_tok, out, bytes_per_row)
    status = lib.lme_matmul_f32(
        int(w_type), ffi.from_buffer("uint8_t[]", w_u8), w_u8.size, n_rows, n_cols, row_begin, row_end,
        ffi.from_buffer("float[]", x), x.size, n_tok, ffi.from_buffer("float[]", out, require_writable=True),
        out.size)
    _raise_on_status(status, "matmul_f32_rows")
