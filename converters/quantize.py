"""`lmengine quantize SRC DST TYPE`: requantize a GGUF file to a llama.cpp file type.

    quantize_gguf("model-f16.gguf", "model-q4_k_m.gguf", "Q4_K_M")

Output file types (`FILE_TYPES`): F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K_S, Q4_K_M,
Q5_K_S, Q5_K_M, Q6_K, IQ4_NL, IQ4_XS. A file type names the type of most matrices; the _S/_M
mixes (and every quantized type's output matrix) give some tensors more bits. The choice per
tensor (`plan_tensor_types`) follows llama.cpp's quantizer (src/llama-quant.cpp,
`llama_tensor_get_type`, no importance matrix):

  - only tensors whose name ends in "weight", with 2 or more dimensions, are quantized; norms,
    biases and the few small tables llama.cpp excludes (`_KEEP_SUBSTRINGS`) keep their type;
  - output.weight (and token_embd.weight when the model has no output.weight: tied embeddings)
    becomes Q6_K, or Q8_0 when its rows are not whole blocks of the default type;
  - attn_v (attn_qkv, attn_kv_b): Q6_K for Q4_K_M / Q5_K_M on the layers `use_more_bits` picks
    (the first and last eighth, and every third in between); Q5_K for Q4_K_S on the first 4;
    Q5_K for IQ4_NL / IQ4_XS when 4 or more query heads share a KV head;
  - ffn_down: the same `use_more_bits` layers get Q6_K for Q4_K_M / Q5_K_M; the first eighth of
    the layers get Q5_K for Q4_K_S, IQ4_NL, IQ4_XS;
  - (llama 70B, 8-expert models and falcon have a few more rules, kept here too);
  - a row length that is not a multiple of the chosen type's block falls back to a type with
    32-value blocks (Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, IQ4_XS -> IQ4_NL), or F16.

`pure=True` skips the mix: every quantized matrix (output and token embedding included) gets the
named type, with the same fallback. The block encodings are `lmengine.kernels.quant.quantize`:
bit-exact with llama.cpp's quantizers, so the tensor data equals llama-quantize's on the same
input (tests/converters/test_quantize.py compares them when llama-cpp-python is installed).
A source tensor is read as float32 (F16/BF16 exactly; a quantized one dequantized, which needs
`allow_requantize`), then quantized.

The output keeps every metadata key and value of the source, byte for byte, in the same order,
except general.file_type (the new file type) and general.quantization_version (2), as llama.cpp
writes them; tensors keep their order, shapes and the source's alignment. The GGUF is written
here rather than by gguf.GGUFWriter: that writer re-encodes each value and cannot write an empty
array (such as the tokenizer.ggml.merges = [] of a byte-level vocabulary), and it holds every
tensor in memory; this writer copies the metadata entries and streams the tensors in slabs of
rows, so memory stays at one slab plus one output tensor.

DST is written to a temporary file in its own folder, flushed to disk, then renamed: a failed or
interrupted run leaves no DST (and no temporary file) behind, and an existing DST is only
replaced (with force=True) once the new file is complete.
"""
from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
import struct
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..kernels import quant as q
from ..kernels.blockcheck import first_nonfinite_block
from .errors import (ConversionError, DestinationExistsError, DiskFullError, MetadataError, QuantizeError,
                     RequantizeError, UnknownFileTypeError, UnsupportedQuantTypeError)
from .gguf_file import GGUFFile

GGML_QUANTIZATION_VERSION = 2   # general.quantization_version that llama.cpp writes
DEFAULT_ALIGNMENT = 32          # GGUF's default when general.alignment is absent
SLAB_BYTES = 32 << 20           # float32 bytes of source rows converted at a time


# -- file types ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class FileType:
    name: str          # "Q4_K_M"
    default_type: int  # ggml type of most matrices
    ftype: int         # general.file_type (llama.cpp's llama_ftype, gguf.LlamaFileType)


FILE_TYPES = {ft.name: ft for ft in (
    FileType("F32", q.F32, 0), FileType("F16", q.F16, 1), FileType("BF16", q.BF16, 32),
    FileType("Q4_0", q.Q4_0, 2), FileType("Q4_1", q.Q4_1, 3), FileType("Q8_0", q.Q8_0, 7),
    FileType("Q5_0", q.Q5_0, 8), FileType("Q5_1", q.Q5_1, 9),
    FileType("Q4_K_S", q.Q4_K, 14), FileType("Q4_K_M", q.Q4_K, 15),
    FileType("Q5_K_S", q.Q5_K, 16), FileType("Q5_K_M", q.Q5_K, 17), FileType("Q6_K", q.Q6_K, 18),
    FileType("IQ4_NL", q.IQ4_NL, 25), FileType("IQ4_XS", q.IQ4_XS, 30),
)}
FILE_TYPE_ALIASES = {"Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}  # as llama-quantize accepts them


def file_type(name: str) -> FileType:
    """The FileType for a name such as "q4_k_m" (any case), or UnknownFileTypeError."""
    key = str(name).strip().upper()
    key = FILE_TYPE_ALIASES.get(key, key)
    if key not in FILE_TYPES:
        raise UnknownFileTypeError(
            f"unknown quantization type {name!r}; choose one of: {', '.join(FILE_TYPES)}")
    return FILE_TYPES[key]


# -- per-tensor type choice (llama.cpp's llama_tensor_get_type) ------------------------------------

# Substrings of weight names llama.cpp never quantizes (small tables, positional embeddings,
# gates, convolutions); names ending in "_norm.weight" are not quantized either.
_KEEP_SUBSTRINGS = ("_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup",
                    "laurel", "per_layer_model_proj", "ssm_conv1d", "shortconv.conv.weight",
                    "indexer.k_proj.weight", "indexer.q_proj.weight", "time_mix_first.weight",
                    "time_mix_w0.weight", "time_mix_w1.weight", "time_mix_w2.weight",
                    "time_mix_v0.weight", "time_mix_v1.weight", "time_mix_v2.weight",
                    "time_mix_a0.weight", "time_mix_a1.weight", "time_mix_a2.weight",
                    "time_mix_g1.weight", "time_mix_g2.weight", "time_mix_decay_w1.weight",
                    "time_mix_decay_w2.weight", "time_mix_lerp_fused.weight", "attn_rel_b.weight",
                    ".position_embd", "sam.pos_embd", "sam.neck.", "sam.net_", ".rel_pos",
                    ".patch_embd", ".patch_merger", "a.rvq.codebook", "mm.a.code_embd")
_KEEP_NAMES = ("position_embd.weight", "token_types.weight")

# Categories, tested in this order on the name (llama.cpp's tensor_get_category).
_CATEGORY_RULES = (("attn_qkv.weight", "attn_v"), ("attn_kv_b.weight", "attn_v"),
                   ("attn_v.weight", "attn_v"), ("attn_k.weight", "attn_k"),
                   ("attn_q.weight", "attn_q"), ("attn_output.weight", "attn_output"),
                   ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"), ("ffn_down", "ffn_down"))

# Where a row length does not fit the chosen type's blocks: the 32-value type to use instead.
_FALLBACK = {q.Q4_K: q.Q5_0, q.Q5_K: q.Q5_1, q.Q6_K: q.Q8_0, q.IQ4_XS: q.IQ4_NL,
             q.Q2_K: q.Q4_0, q.Q3_K: q.Q4_0}


def _category(name: str) -> str:
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for pattern, category in _CATEGORY_RULES:
        if pattern in name:
            return category
    return "other"


def _ggml_n_dims(shape: tuple) -> int:
    """ggml_n_dims: 1 + the index (ggml order, row length first) of the last dimension > 1."""
    ne = tuple(reversed(shape))
    return max([i + 1 for i, d in enumerate(ne) if d > 1], default=1)


def _allows_quantization(name: str, shape: tuple) -> bool:
    """llama.cpp's tensor_allows_quantization for the architectures the engine runs."""
    return (name.endswith("weight") and _ggml_n_dims(shape) >= 2 and name not in _KEEP_NAMES
            and not any(s in name for s in _KEEP_SUBSTRINGS))


def _layer_of(name: str) -> int:
    """N of a "blk.N." name (llama.cpp sorts tensors by it), -1 for global tensors."""
    m = re.match(r"blk\.([+-]?\d+)", name)
    return int(m.group(1)) if m else -1


def _use_more_bits(i_layer: int, n_layers: int) -> bool:
    """The layers llama.cpp's _M mixes give more bits: first and last eighth, every third between."""
    return (i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8
            or (i_layer - n_layers // 8) % 3 == 2)


@dataclass
class _MixState:
    """Model facts and running counters of llama.cpp's quantize_state_impl."""
    arch: str
    n_layer: int
    n_gqa: int
    n_expert: int
    is_70b: bool
    tied_embeddings: bool
    n_attention_wv: int
    i_attention_wv: int = 0
    i_ffn_down: int = 0


def _first_int(value, default=0) -> int:
    """A per-model int hyperparameter that may be stored per layer (an array): its first value."""
    if isinstance(value, (list, tuple)):
        value = value[0] if value else default
    return int(value) if isinstance(value, (int, np.integer)) and not isinstance(value, bool) else default


def _mix_state(f: GGUFFile, names: list) -> _MixState:
    arch = f.get("general.architecture")
    if not isinstance(arch, str):
        raise MetadataError(f"{f.path}: general.architecture is missing or not a string")
    n_layer = _first_int(f.get(f"{arch}.block_count"))
    n_head = _first_int(f.get(f"{arch}.attention.head_count"))
    n_head_kv = _first_int(f.get(f"{arch}.attention.head_count_kv"), n_head)
    return _MixState(
        arch=arch, n_layer=n_layer, n_gqa=n_head // n_head_kv if n_head_kv else 0,
        n_expert=_first_int(f.get(f"{arch}.expert_count")),
        is_70b=arch == "llama" and n_layer == 80 and n_head != n_head_kv,
        tied_embeddings="output.weight" not in names,
        n_attention_wv=sum(_category(n) == "attn_v" for n in names))


def _mixed_type(st: _MixState, ft: FileType, name: str, shape: tuple) -> int:
    """llama_tensor_get_type_impl for the file types in FILE_TYPES (no importance matrix)."""
    new_type, ftn, category = ft.default_type, ft.name, _category(name)
    n_cols = shape[-1]
    falcon = st.arch == "falcon"
    if category == "output" or (st.tied_embeddings and category == "token_embd"):
        if falcon or n_cols % q.BLOCK_SIZE[new_type] != 0:
            new_type = q.Q8_0
        elif new_type != q.Q8_0:
            new_type = q.Q6_K
    elif category == "token_embd":
        pass
    elif category == "attn_v":
        if ftn in ("IQ4_NL", "IQ4_XS") and st.n_gqa >= 4:
            new_type = q.Q5_K
        elif ftn in ("Q4_K_M", "Q5_K_M") and _use_more_bits(st.i_attention_wv, st.n_attention_wv):
            new_type = q.Q6_K
        elif ftn == "Q4_K_S" and st.i_attention_wv < 4:
            new_type = q.Q5_K
        if st.is_70b and new_type in (q.Q3_K, q.Q4_K):
            new_type = q.Q5_K
        if st.n_expert == 8:
            new_type = q.Q8_0
        st.i_attention_wv += 1
    elif category == "attn_k":
        if st.n_expert == 8:
            new_type = q.Q8_0
    elif category == "ffn_down":
        i_layer, n_layer = st.i_ffn_down, st.n_layer
        if st.n_expert > 1:             # experts may not be in layer order: read the layer
            i_layer = _layer_of(name)
            if not 0 <= i_layer < n_layer:
                raise QuantizeError(f"tensor {name!r}: cannot tell its layer (of {n_layer})")
        if ftn == "Q4_K_M":
            if falcon:
                new_type = (q.Q6_K if i_layer < n_layer // 16 else
                            q.Q5_K if _use_more_bits(i_layer, n_layer) else q.Q4_K)
            elif _use_more_bits(i_layer, n_layer):
                new_type = q.Q6_K
        elif i_layer < n_layer // 8 and ftn in ("IQ4_NL", "IQ4_XS"):
            new_type = q.Q5_K
        elif ftn == "Q5_K_M" and _use_more_bits(i_layer, n_layer):
            new_type = q.Q6_K
        elif ftn == "Q4_K_S" and not falcon and i_layer < n_layer // 8:
            new_type = q.Q5_K
        st.i_ffn_down += 1
    elif category == "attn_output":
        if not falcon and st.n_expert == 8 and ftn in ("IQ4_NL", "Q4_K_S", "Q4_K_M", "IQ4_XS"):
            new_type = q.Q5_K
    return new_type


def _fallback(name: str, shape: tuple, new_type: int, warn: Callable | None) -> int:
    """llama.cpp's tensor_type_fallback: a type whose blocks fit the row length."""
    n_cols = shape[-1]
    if n_cols % q.BLOCK_SIZE[new_type] == 0:
        return new_type
    chosen = _FALLBACK.get(new_type, new_type)
    if n_cols % q.BLOCK_SIZE[chosen] != 0:
        chosen = q.F16
    if warn is not None:
        warn(f"{name}: rows of {n_cols} values are not whole {q.TYPE_NAMES[new_type]} blocks "
             f"of {q.BLOCK_SIZE[new_type]}: using {q.TYPE_NAMES[chosen]}")
    return chosen


def plan_tensor_types(f: GGUFFile, type_name: str, pure: bool = False,
                      warn: Callable[[str], None] | None = None) -> dict:
    """{tensor name: ggml type id of the output}, in the source's tensor order.

    Tensors are visited in llama.cpp's order (global tensors, then by layer, by name within
    one), because its mix counts attn_v / ffn_down tensors as it meets them.
    """
    ft = file_type(type_name)
    names = list(f.tensors)
    st = _mix_state(f, names)
    order = sorted(names, key=lambda n: (_layer_of(n), n.encode("utf-8")))
    plan = {}
    for name in order:
        info = f.tensors[name]
        if not _allows_quantization(name, info.shape):
            plan[name] = info.type_id
            continue
        new_type = ft.default_type
        if new_type not in q.FLOAT_TYPES:
            if not pure:
                new_type = _mixed_type(st, ft, name, info.shape)
            new_type = _fallback(name, info.shape, new_type, warn)
        plan[name] = new_type
    return {name: plan[name] for name in names}


# -- progress -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class QuantizeProgress:
    """One progress report: sent after each slab of rows and when a tensor is done."""
    index: int          # 1-based tensor number
    n_tensors: int
    name: str
    src_type: str
    dst_type: str
    shape: tuple
    bytes_done: int     # output bytes written so far (all tensors)
    bytes_total: int    # output bytes of all tensors
    tensor_done: bool   # the tensor is complete (False: a slab inside it)
    elapsed_s: float

    def bar(self, width: int = 24) -> str:
        frac = self.bytes_done / self.bytes_total if self.bytes_total else 1.0
        filled = int(round(frac * width))
        return f"[{'#' * filled}{'.' * (width - filled)}] {frac:4.0%}"

    def __str__(self) -> str:
        shape = " x ".join(str(d) for d in self.shape)
        return (f"{self.bar()} {self.index:>{len(str(self.n_tensors))}}/{self.n_tensors} "
                f"{self.name} ({shape}) {self.src_type} -> {self.dst_type}  "
                f"{self.bytes_done / 1e6:,.1f}/{self.bytes_total / 1e6:,.1f} MB  {self.elapsed_s:.0f} s")


# -- GGUF writing -------------------------------------------------------------------------------

_GGUF_UINT32 = 4
_GGUF_STRING = 8
_GGUF_ARRAY = 9
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def _gguf_string(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def _kv_uint32(key: str, value: int) -> bytes:
    return _gguf_string(key) + struct.pack("<II", _GGUF_UINT32, value)


def _skip_value(buf, pos: int, vtype: int) -> int:
    """Offset after a metadata value of vtype at pos (the file was validated by GGUFFile)."""
    if vtype in _SCALAR_SIZES:
        return pos + _SCALAR_SIZES[vtype]
    if vtype == _GGUF_STRING:
        return pos + 8 + struct.unpack_from("<Q", buf, pos)[0]
    if vtype == _GGUF_ARRAY:
        item_type, n = struct.unpack_from("<IQ", buf, pos)
        pos += 12
        if item_type in _SCALAR_SIZES:
            return pos + n * _SCALAR_SIZES[item_type]
        for _ in range(n):
            pos = _skip_value(buf, pos, item_type)
        return pos
    raise MetadataError(f"unknown GGUF value type {vtype}")


def _metadata_entries(f: GGUFFile) -> list:
    """[(key, raw bytes of the whole key/value entry)] in file order."""
    buf = f.data
    pos = 24
    entries = []
    for _ in range(len(f.metadata)):
        start = pos
        key_len = struct.unpack_from("<Q", buf, pos)[0]
        key = bytes(buf[pos + 8: pos + 8 + key_len]).decode("utf-8")
        pos += 8 + key_len
        vtype = struct.unpack_from("<I", buf, pos)[0]
        pos = _skip_value(buf, pos + 4, vtype)
        entries.append((key, bytes(buf[start:pos])))
    return entries


def _header_bytes(f: GGUFFile, ft: FileType, plan: dict, alignment: int) -> tuple:
    """(GGUF header + metadata + tensor infos, padded to the alignment; {name: data offset})."""
    entries = _metadata_entries(f)
    new_values = {"general.quantization_version": GGML_QUANTIZATION_VERSION,
                  "general.file_type": ft.ftype}
    kv = []
    for key, raw in entries:
        kv.append(_kv_uint32(key, new_values.pop(key)) if key in new_values else raw)
    for key, value in new_values.items():                 # keys the source did not have
        kv.append(_kv_uint32(key, value))
    infos = []
    offsets = {}
    offset = 0
    for name, info in f.tensors.items():
        ne = tuple(reversed(info.shape))
        infos.append(_gguf_string(name) + struct.pack(f"<I{len(ne)}QIQ", len(ne), *ne, plan[name], offset))
        offsets[name] = offset
        offset += _padded(_tensor_bytes(info.shape, plan[name]), alignment)
    head = b"".join([b"GGUF", struct.pack("<IQQ", 3, len(f.tensors), len(kv)), *kv, *infos])
    return head + bytes(_padded(len(head), alignment) - len(head)), offsets


def _padded(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


def _tensor_bytes(shape: tuple, type_id: int) -> int:
    n_rows = int(np.prod(shape[:-1], dtype=np.int64))
    return n_rows * q.row_bytes(type_id, shape[-1])


# -- the quantizer ------------------------------------------------------------------------------

def quantize_gguf(src, dst, type_name: str, pure: bool = False, allow_requantize: bool = False,
                  force: bool = False, progress: Callable[[QuantizeProgress], None] | None = None,
                  warn: Callable[[str], None] | None = None) -> dict:
    """Write DST, a GGUF with SRC's metadata and tensors quantized to `type_name` (see the module
    docstring). Returns {tensor name: output type name}.

    progress(QuantizeProgress) is called after each slab of rows and each tensor; warn(str) for
    each tensor that falls back to another type. Raises UnknownFileTypeError, RequantizeError,
    DestinationExistsError, DiskFullError (all QuantizeError, a ConversionError), the
    ModelFileError family for a bad SRC, UnsupportedQuantTypeError for a source tensor type that
    cannot be decoded, and ConversionError for values that cannot be quantized (inf/NaN).
    """
    ft = file_type(type_name)
    src, dst = os.fspath(src), os.fspath(dst)
    if os.path.exists(dst) and not force:
        raise DestinationExistsError(f"{dst} already exists (pass --force / force=True to replace it)")
    f = GGUFFile(src)
    try:
        plan = plan_tensor_types(f, ft.name, pure=pure, warn=warn)
        _check_sources(f, plan, allow_requantize)
        alignment = f.get("general.alignment", DEFAULT_ALIGNMENT)
        head, offsets = _header_bytes(f, ft, plan, alignment)
        total = len(head) + sum(_padded(_tensor_bytes(i.shape, plan[n]), alignment)
                                for n, i in f.tensors.items())
        _check_free_space(dst, total, force)
        tmp, out = _open_temp(dst)
        try:
            out.write(head)
            _write_tensors(f, plan, out, alignment, progress)
            out.flush()
            os.fsync(out.fileno())
            out.close()
            if os.path.exists(dst) and not force:
                raise DestinationExistsError(f"{dst} appeared while quantizing (pass --force to replace it)")
            os.replace(tmp, dst)
        except OSError as e:
            _discard(out, tmp)
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFullError(f"{dst}: no space left on the device (the file needs {total:,d} bytes); "
                                    f"nothing was written") from None
            raise
        except BaseException:
            _discard(out, tmp)
            raise
    finally:
        f.close()
    return {name: q.TYPE_NAMES[t] for name, t in plan.items()}


def _check_sources(f: GGUFFile, plan: dict, allow_requantize: bool) -> None:
    """Before writing anything: every tensor that changes type can be decoded and, unless
    allow_requantize, is not already in a lossy block type."""
    for name, info in f.tensors.items():
        if plan[name] == info.type_id:
            continue                                       # copied as it is
        if info.type_id not in q.TYPE_NAMES:
            raise UnsupportedQuantTypeError(
                f"{f.path}: tensor {name!r} is {info.type_name}, a type lmengine cannot decode, "
                f"so it cannot be requantized to {q.TYPE_NAMES[plan[name]]}")
        if info.type_id not in q.FLOAT_TYPES and not allow_requantize:
            raise RequantizeError(
                f"{f.path}: tensor {name!r} is already quantized ({info.type_name}); requantizing it "
                f"to {q.TYPE_NAMES[plan[name]]} compounds the rounding errors of both types. Start "
                f"from an F32/F16/BF16 file, or pass --allow-requantize / allow_requantize=True")


def _check_free_space(dst: str, total: int, force: bool) -> None:
    folder = os.path.dirname(os.path.abspath(dst))
    free = shutil.disk_usage(folder).free
    if force and os.path.isfile(dst):
        free += os.path.getsize(dst)   # not freed until the rename, but usually on the same disk
    if free < total:
        raise DiskFullError(f"{dst}: the output needs {total:,d} bytes but {folder} has only "
                            f"{free:,d} free; nothing was written")


def _open_temp(dst: str):
    """(path, binary file) of a new temporary file beside dst (same file system, so the final
    rename is atomic), created with the default permissions."""
    folder, base = os.path.split(os.path.abspath(dst))
    tmp = os.path.join(folder, f".{base}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    return tmp, os.fdopen(fd, "wb")


def _discard(out, tmp: str) -> None:
    """Close and delete the temporary file, whatever state it is in."""
    try:
        out.close()
    except OSError:
        pass                       # a close that flushes onto a full disk fails again
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass


def _write_tensors(f: GGUFFile, plan: dict, out, alignment: int, progress) -> None:
    """Stream every tensor's output bytes (each padded to the alignment) to out."""
    total = sum(_tensor_bytes(i.shape, plan[n]) for n, i in f.tensors.items())
    done = 0
    t0 = time.perf_counter()
    n_tensors = len(f.tensors)
    for index, (name, info) in enumerate(f.tensors.items(), start=1):
        dst_type = plan[name]
        for n_bytes, last in _tensor_slabs(f, name, info, dst_type, out):
            done += n_bytes
            if progress is not None:
                progress(QuantizeProgress(index, n_tensors, name, info.type_name, q.TYPE_NAMES[dst_type],
                                          info.shape, done, total, last, time.perf_counter() - t0))
        n = _tensor_bytes(info.shape, dst_type)
        out.write(bytes(_padded(n, alignment) - n))


def _tensor_slabs(f: GGUFFile, name: str, info, dst_type: int, out):
    """Write one tensor to out in slabs of rows; yields (bytes written, is the last slab)."""
    raw = f.tensor_bytes(name)
    n_cols = info.shape[-1]
    n_rows = int(np.prod(info.shape[:-1], dtype=np.int64))
    src_row = q.row_bytes(info.type_id, n_cols) if info.type_id in q.TYPE_NAMES else None
    if dst_type == info.type_id:                          # kept: copy the bytes
        step = max(1, SLAB_BYTES // 4)
        for start in range(0, info.n_bytes, step) if info.n_bytes else [0]:
            chunk = raw[start: start + step]
            out.write(memoryview(np.ascontiguousarray(chunk)))
            yield chunk.size, start + step >= info.n_bytes
        return
    rows = raw.reshape(n_rows, src_row)
    rows_per_slab = max(1, SLAB_BYTES // (4 * max(1, n_cols)))
    for r0 in range(0, n_rows, rows_per_slab):
        r1 = min(n_rows, r0 + rows_per_slab)
        values = _as_float32(info.type_id, rows[r0:r1], n_cols)
        try:
            blocks = q.quantize(dst_type, values)
        except ValueError as e:
            raise ConversionError(f"{f.path}: tensor {name!r} (rows {r0}..{r1 - 1}) cannot be "
                                  f"quantized to {q.TYPE_NAMES[dst_type]}: {e}") from None
        bad = -1 if dst_type in q.FLOAT_TYPES else \
            first_nonfinite_block(dst_type, blocks.reshape(-1), blocks.size // q.BLOCK_BYTES[dst_type])
        if bad >= 0:
            row = r0 + bad // (n_cols // q.BLOCK_SIZE[dst_type])
            raise ConversionError(f"{f.path}: tensor {name!r} row {row}: values too large for "
                                  f"{q.TYPE_NAMES[dst_type]} (its f16 scale overflows to inf)")
        out.write(memoryview(blocks.reshape(-1)))
        yield blocks.size, r1 == n_rows
    if n_rows == 0:
        yield 0, True


def _as_float32(type_id: int, rows: np.ndarray, n_cols: int) -> np.ndarray:
    """float32 [n, n_cols] values of n rows of raw blocks (uint8 [n, row_bytes])."""
    if type_id == q.F32:
        return np.ascontiguousarray(rows).view(np.float32).reshape(-1, n_cols)
    return q.dequantize(type_id, np.ascontiguousarray(rows), (rows.shape[0], n_cols))
