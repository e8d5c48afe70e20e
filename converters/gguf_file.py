"""Read a GGUF file through a memory map: metadata, tensor infos, zero-copy views of tensor blocks.

Every length, offset and count is checked against the file size and against the limits below
before it is used, the tensors' layout against llama.cpp's rule (back to back in the order of
their infos, each aligned), and every failure is a `lmengine.converters.errors` exception that
names the file and the field or tensor. Type ids and block sizes come from the `gguf` package (the
format's own library). Typed access to metadata: `get(key, default, types)` and `require(key,
types)` raise MetadataError naming the key when a value has the wrong type.

Shapes are given in NumPy order (rows first): a ggml tensor with ne = [576, 49152] (576 values per
row, 49152 rows) has `shape == (49152, 576)`. The bytes of a tensor are a view into the one
`np.memmap` of the file (`GGUFFile.data`); nothing is copied or expanded.
"""
from __future__ import annotations

import array
import os
import struct
from dataclasses import dataclass

import numpy as np

from .errors import (
    BadMagicError,
    MetadataError,
    ModelFileError,
    TruncatedFileError,
    UnsupportedQuantTypeError,
    UnsupportedVersionError,
)

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32      # when general.alignment is absent (the GGUF spec's default)

# -- limits ----------------------------------------------------------------------------------------
# Every count and size read from a file is checked against these caps, and against the file size,
# before anything is allocated in proportion to it: a flipped bit must give an error naming the
# field, not a 3 GB list or a minute of work. Each cap is far above every released model (the
# numbers in the comments), so that no real file meets one. The file-format caps are checked by
# GGUFFile; the model caps by engine/config.py and any converter that reads these keys.

# the file format
MAX_TENSORS = 1 << 16           # tensors in a file; Llama 3.1 405B: 1,138, DeepSeek-V3: 1,025
MAX_METADATA_ENTRIES = 1 << 16  # key/value pairs; real files: 20-60
MAX_STRING_BYTES = 1 << 28      # one string (256 MiB); chat templates are < 100 KiB, a whole
                                #   tokenizer.json stored as tokenizer.huggingface.json < 40 MiB
MAX_ARRAY_ITEMS = 1 << 24       # one metadata array (16.7M items); the largest vocabularies
                                #   (Gemma 3: 262,144 tokens) and merge lists (< 1M) are far below
MAX_ARRAY_DEPTH = 4             # arrays of arrays: llama.cpp accepts no nesting at all; the gguf
                                #   package can write it; 4 levels is plenty, 5,000 would recurse
MAX_TENSOR_NAME_BYTES = 256     # llama.cpp rejects names of 64 bytes or more (GGML_MAX_NAME)
MAX_DIMS = 4                    # GGML_MAX_DIMS
MAX_ELEMENTS = (1 << 63) - 1    # ggml counts elements in int64 (each dim, and their product)
MAX_ALIGNMENT = 1 << 30         # general.alignment: 32 in every known file

# the model (engine/config.py)
MAX_LAYERS = 512                # LLAMA_MAX_LAYERS in llama.cpp; Llama 3.1 405B: 126 layers
MAX_EMBEDDING = 1 << 17         # model width; Llama 3.1 405B: 16,384, Nemotron-4 340B: 18,432
MAX_FFN = 1 << 20               # feed-forward width; Nemotron-4 340B: 73,728, Llama 405B: 53,248
MAX_HEADS = 1 << 12             # attention heads; Llama 3.1 405B: 128
MAX_HEAD_DIM = 1 << 12          # values per head; real models 64-256 (DeepSeek MLA keys: 576)
MAX_VOCAB = 1 << 23             # tokens; Gemma 3: 262,144
MAX_CONTEXT = 1 << 30           # training context; Llama 4 Scout claims 10M (10,485,760)
MAX_LSTM_WIDTH = 1 << 20        # LSTM hidden and embedding sizes; large LSTM LMs use 8,192

# The smallest encodings, to bound counts by the file size: a metadata entry is a key (8-byte
# length), a type (4) and at least a 1-byte value; a tensor info is a name (8-byte length), n_dims
# (4), a type (4) and an offset (8).
MIN_KV_BYTES = 8 + 4 + 1
MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8

# ggml type id -> (name, values per block, bytes per block) of the types files commonly hold, as
# the gguf package's GGML_QUANT_SIZES states them (tests/converters/test_gguf_file.py checks
# that they agree). The table saves importing the gguf package (~0.07 s) at every load; a type id
# not in it is looked up in the gguf package, so every type the format knows still reads.
GGML_TYPES = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 20: ("IQ4_NL", 32, 18),
    23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8),
    28: ("F64", 1, 8), 30: ("BF16", 1, 2),
}


def _ggml_type(path: str, name: str, type_id: int) -> tuple:
    """(type name, values per block, bytes per block) of ggml type `type_id`, for tensor `name`."""
    if type_id in GGML_TYPES:
        return GGML_TYPES[type_id]
    import gguf
    try:
        qtype = gguf.GGMLQuantizationType(type_id)
    except ValueError:
        raise UnsupportedQuantTypeError(f"{path}: tensor {name!r} has unknown ggml type id {type_id}") from None
    if qtype not in gguf.GGML_QUANT_SIZES:
        raise UnsupportedQuantTypeError(
            f"{path}: tensor {name!r} has ggml type {qtype.name} (id {type_id}), whose block size "
            f"the gguf package does not know")
    return (qtype.name, *gguf.GGML_QUANT_SIZES[qtype])


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type_name: str        # ggml type name: "F32", "Q4_1", ...
    type_id: int          # ggml type id (GGMLQuantizationType value)
    shape: tuple          # NumPy order: (rows, cols) for a matrix, (n,) for a vector
    offset: int           # absolute byte offset of the first block in the file
    n_bytes: int          # bytes of blocks


class GGUFFile:
    """An open GGUF file. `metadata` maps key -> Python value; `tensors` maps name -> TensorInfo
    (in the file's order).

    The header is parsed here rather than by `gguf.GGUFReader`: the reader makes a NumPy view per
    array element and takes ~2.5 s on a 49k-token vocabulary, longer than our whole warm-start
    budget; this parser reads the same header in well under 0.2 s. The `gguf` package stays the
    reference: tests check that both read the same metadata and tensor infos.

    Structure checks (as llama.cpp's gguf.cpp makes them): counts and lengths within the limits
    above and the file; each tensor's offset is the running offset, i.e. tensors lie back to back
    in the order of their infos, each starting at the previous one's end rounded up to
    general.alignment, the first at the start of the data section; the last one ends the file
    (up to its padding). A tensor relabelled with another type or shape changes its byte count, so
    its neighbour's offset (or the file's end) disagrees: the error names both.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise ModelFileError(f"{self.path}: no such file")
        self.file_size = os.path.getsize(self.path)
        self._check_header()
        self.data = np.memmap(self.path, dtype=np.uint8, mode="r")  # the whole file, read-only
        self._buf = memoryview(self.data)
        self.metadata: dict = {}
        self.tensors: dict = {}
        self._parse()

    # -- parsing -----------------------------------------------------------------------------
    def _check_header(self) -> None:
        with open(self.path, "rb") as f:
            head = f.read(24)
        if len(head) < 4 or head[:4] != GGUF_MAGIC:
            raise BadMagicError(f"{self.path}: not a GGUF file (magic {head[:4]!r}, expected b'GGUF')")
        if len(head) < 24:
            raise TruncatedFileError(f"{self.path}: header truncated ({self.file_size} bytes, need 24)")
        version = struct.unpack("<I", head[4:8])[0]
        if version not in SUPPORTED_VERSIONS:
            raise UnsupportedVersionError(
                f"{self.path}: GGUF version {version} is not supported (supported: {SUPPORTED_VERSIONS})")
        self.version = version
        n_tensors, n_kv = struct.unpack("<QQ", head[8:24])
        need = 24 + n_tensors * MIN_TENSOR_INFO_BYTES + n_kv * MIN_KV_BYTES
        if need > self.file_size:
            raise TruncatedFileError(
                f"{self.path}: header claims {n_tensors} tensors and {n_kv} metadata entries, "
                f"at least {need} bytes, more than the {self.file_size}-byte file holds")
        for what, n, limit in (("tensors", n_tensors, MAX_TENSORS), ("metadata entries", n_kv, MAX_METADATA_ENTRIES)):
            if n > limit:
                raise ModelFileError(f"{self.path}: header claims {n} {what}, over the limit of {limit}")
        self._n_tensors, self._n_kv = n_tensors, n_kv

    def _parse(self) -> None:
        pos = self._read_metadata(24)
        infos, pos = self._read_tensor_infos(pos)
        alignment = self._alignment()
        data_start = _round_up(pos, alignment)
        self._place_tensors(infos, data_start, alignment)

    def _read_metadata(self, pos: int) -> int:
        for i in range(self._n_kv):
            key, pos = self._string(pos, f"metadata entry {i}")
            where = f"metadata key {key!r}"
            if key in self.metadata:
                raise MetadataError(f"{self.path}: {where} appears twice")
            (vtype,), pos = self._unpack("<I", pos, where)
            value, pos = self._value(vtype, pos, where, depth=0)
            self.metadata[key] = value
        return pos

    def _read_tensor_infos(self, pos: int) -> tuple:
        """[(name, dims in ggml order, type id, offset)] of the tensor infos, and the end position."""
        infos, names = [], set()
        for i in range(self._n_tensors):
            name, pos = self._string(pos, f"tensor info {i}", limit=MAX_TENSOR_NAME_BYTES)
            where = f"tensor {name!r}"
            if name in names:
                raise ModelFileError(f"{self.path}: {where} appears twice")
            names.add(name)
            (n_dims,), pos = self._unpack("<I", pos, where)
            if n_dims > MAX_DIMS:
                raise ModelFileError(f"{self.path}: {where} has {n_dims} dimensions (at most {MAX_DIMS})")
            dims, pos = self._unpack(f"<{n_dims}Q", pos, where)
            (type_id, offset), pos = self._unpack("<IQ", pos, where)
            infos.append((name, dims, type_id, offset))
        return infos, pos

    def _alignment(self) -> int:
        alignment = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if isinstance(alignment, bool) or not isinstance(alignment, int) or not 0 < alignment <= MAX_ALIGNMENT \
                or alignment & (alignment - 1):
            raise MetadataError(f"{self.path}: metadata key 'general.alignment' must be a power of two "
                                f"up to {MAX_ALIGNMENT}, got {alignment!r}")
        return alignment

    def _place_tensors(self, infos: list, data_start: int, alignment: int) -> None:
        """TensorInfo of each info, checking llama.cpp's layout rule (see the class docstring)."""
        expected, previous = 0, None     # the running offset (relative to data_start), previous tensor
        for name, dims, type_id, offset in infos:
            type_name, n_bytes = self._tensor_size(name, dims, type_id)
            start = data_start + offset
            if start + n_bytes > self.file_size:
                raise TruncatedFileError(
                    f"{self.path}: tensor {name!r} ({type_name}, shape {_numpy_shape(dims)}, {n_bytes} bytes "
                    f"at offset {start}) runs past the end of the file ({self.file_size} bytes)")
            if offset != expected:
                raise ModelFileError(self._layout_message(name, type_name, offset, expected, previous, alignment))
            info = TensorInfo(name, type_name, type_id, _numpy_shape(dims), start, n_bytes)
            self.tensors[name] = info
            expected, previous = offset + _round_up(n_bytes, alignment), info
        if previous is not None:
            self._check_file_end(previous, data_start + expected)

    def _tensor_size(self, name: str, dims: tuple, type_id: int) -> tuple:
        """(type name, bytes) of a tensor: its type known to the format, its rows whole blocks."""
        type_name, block_size, type_size = _ggml_type(self.path, name, type_id)
        n_values = 1
        for d in dims:
            n_values *= d
            if d > MAX_ELEMENTS or n_values > MAX_ELEMENTS:
                raise ModelFileError(f"{self.path}: tensor {name!r} has dimensions {list(dims)}: more than "
                                     f"2^63 - 1 values")
        if dims and dims[0] % block_size:
            raise ModelFileError(
                f"{self.path}: tensor {name!r} ({type_name}) has rows of {dims[0]} values, "
                f"not a multiple of the block size {block_size}")
        return type_name, n_values // block_size * type_size

    def _layout_message(self, name, type_name, offset, expected, previous, alignment) -> str:
        where = f"{self.path}: tensor {name!r} ({type_name}) is at data offset {offset}"
        if previous is None:
            return f"{where}, expected 0: the first tensor starts the data section"
        if offset % alignment:
            return f"{where}, which is not a multiple of general.alignment {alignment} (expected {expected})"
        return (f"{where}, expected {expected}: the previous tensor {previous.name!r} ({previous.type_name}, "
                f"shape {previous.shape}, {previous.n_bytes} bytes) ends there (padded to {alignment}); "
                f"tensors overlap or one of the two has a wrong type, shape or offset")

    def _check_file_end(self, last: TensorInfo, padded_end: int) -> None:
        """The last tensor ends the file (its padding may be absent): bytes beyond it mean that the
        tensor infos do not describe the data, e.g. a tensor relabelled with a smaller type."""
        if self.file_size > padded_end:
            raise ModelFileError(
                f"{self.path}: {self.file_size - padded_end} bytes follow the last tensor {last.name!r} "
                f"({last.type_name}, shape {last.shape}, {last.n_bytes} bytes at offset {last.offset}): the "
                f"tensor infos do not describe the file's data (a wrong type or shape?)")

    def _unpack(self, fmt: str, pos: int, where: str):
        size = struct.calcsize(fmt)
        if pos + size > self.file_size:
            raise TruncatedFileError(
                f"{self.path}: {where} runs past the end of the file (needs bytes {pos}..{pos + size}, "
                f"file has {self.file_size})")
        return struct.unpack_from(fmt, self._buf, pos), pos + size

    def _string(self, pos: int, where: str, limit: int | None = None):
        """A string: u64 length, UTF-8 bytes; at most `limit` bytes (MAX_STRING_BYTES)."""
        limit = MAX_STRING_BYTES if limit is None else limit
        (length,), pos = self._unpack("<Q", pos, where)
        if pos + length > self.file_size:
            raise TruncatedFileError(
                f"{self.path}: {where}: a string of {length} bytes at offset {pos} runs past the end "
                f"of the file ({self.file_size} bytes)")
        if length > limit:
            raise ModelFileError(f"{self.path}: {where}: a string of {length} bytes at offset {pos} is over "
                                 f"the limit of {limit} bytes")
        try:
            return bytes(self._buf[pos: pos + length]).decode("utf-8"), pos + length
        except UnicodeDecodeError as e:
            raise ModelFileError(f"{self.path}: {where}: a string is not valid UTF-8 ({e})") from None

    def _string_array(self, pos: int, n: int, where: str):
        """n strings from pos, as _string reads them. A vocabulary and its merges (~100k strings)
        are the hot loop of a load, so the lengths are walked in one tight loop and the strings
        decoded in one go (`_decode_joined`: ~0.03 s for SmolLM2's 98k strings, against ~0.11 s
        decoding them one by one). An array that is truncated, holds a string over the limit, is
        not UTF-8 or holds a NUL character goes through `_string_array_each`, which raises the
        error that fits (or reads the NULs)."""
        buf, end_of_file, limit = self._buf, self.file_size, MAX_STRING_BYTES
        read_length = _U64.unpack_from
        first = pos
        starts = array.array("q", bytes(8 * n))     # file offset of each string's bytes
        for i in range(n):
            start = pos + 8
            if start > end_of_file:
                break
            (length,) = read_length(buf, pos)
            pos = start + length
            if length > limit or pos > end_of_file:
                break
            starts[i] = start
        else:
            items = self._decode_joined(first, starts, pos)
            if items is not None:
                return items, pos
        return self._string_array_each(first, n, where)

    def _decode_joined(self, first: int, starts: array.array, end: int) -> list | None:
        """The strings at file offsets `starts` (each after its 8-byte length, the array spanning
        bytes first..end): the array's bytes with each length replaced by one NUL are decoded as
        one UTF-8 text and split at the NULs. A NUL cannot end or continue a multi-byte
        character, so the text decodes exactly when every string does. None when some string is
        not UTF-8 or holds a NUL (the split then gives more pieces). Memory: a few times the
        array's bytes, as for the strings themselves."""
        region = self.data[first:end]
        offsets = np.frombuffer(starts, dtype=np.int64) - first
        keep = np.ones(region.size, dtype=bool)
        for j in range(1, 8):                                         # 7 of each length's 8 bytes
            keep[offsets - j] = False
        joined = np.array(region)
        joined[offsets - 8] = 0                                       # the 8th becomes the NUL
        try:
            text = joined[keep].tobytes().decode("utf-8")
        except UnicodeDecodeError:
            return None
        items = text.split("\0")
        return items[1:] if len(items) == len(starts) + 1 else None

    def _string_array_each(self, pos: int, n: int, where: str):
        """n strings from pos, as _string reads them, one at a time; any string that is
        truncated, over the limit or not UTF-8 goes through _string, which raises its error."""
        buf, end_of_file, limit = self._buf, self.file_size, MAX_STRING_BYTES
        read_length = _U64.unpack_from
        items = [""] * n
        for i in range(n):
            start = pos + 8
            if start <= end_of_file:
                (length,) = read_length(buf, pos)
                end = start + length
                if end <= end_of_file and length <= limit:
                    try:
                        items[i] = str(buf[start:end], "utf-8")
                        pos = end
                        continue
                    except UnicodeDecodeError:
                        pass
            items[i], pos = self._string(pos, where)     # the slow path: raises the error that fits
        return items, pos

    def _value(self, vtype: int, pos: int, where: str, depth: int):
        if vtype in _SCALAR_FORMATS:
            (value,), pos = self._unpack(_SCALAR_FORMATS[vtype], pos, where)
            return (bool(value) if vtype == _BOOL else value), pos
        if vtype == _STRING:
            return self._string(pos, where)
        if vtype == _ARRAY:
            return self._array(pos, where, depth + 1)
        raise MetadataError(f"{self.path}: {where}: unknown value type {vtype}")

    def _array(self, pos: int, where: str, depth: int):
        """An array value: item type (u32), count (u64), items. Scalars are read in one go."""
        if depth > MAX_ARRAY_DEPTH:
            raise MetadataError(f"{self.path}: {where}: arrays nested more than {MAX_ARRAY_DEPTH} deep")
        (item_type, n), pos = self._unpack("<IQ", pos, where)
        min_item = {_STRING: 8, _ARRAY: 12}.get(item_type) or _SCALAR_SIZES.get(item_type)
        if min_item is None:
            raise MetadataError(f"{self.path}: {where}: unknown array item type {item_type}")
        if n * min_item > self.file_size - pos:
            raise TruncatedFileError(
                f"{self.path}: {where}: an array of {n} items (at least {n * min_item} bytes) at offset {pos} "
                f"runs past the end of the file ({self.file_size} bytes)")
        if n > MAX_ARRAY_ITEMS:
            raise MetadataError(f"{self.path}: {where}: an array of {n} items is over the limit of "
                                f"{MAX_ARRAY_ITEMS} items")
        if item_type in _SCALAR_FORMATS:
            values = np.frombuffer(self._buf, dtype=np.dtype(_SCALAR_FORMATS[item_type]), count=n, offset=pos)
            values = values.astype(bool) if item_type == _BOOL else values
            return values.tolist(), pos + n * min_item
        items = []
        if item_type == _STRING:    # vocabularies and merges: ~100k strings, the hot loop of a load
            return self._string_array(pos, n, where)
        for _ in range(n):
            item, pos = self._array(pos, where, depth + 1)
            items.append(item)
        return items, pos

    # -- access ------------------------------------------------------------------------------
    def get(self, key: str, default=None, types=None):
        """The value of metadata `key`, or `default` when it is absent. With `types` (a type or a
        tuple, as for isinstance) a present value of another type is a MetadataError naming the
        key: `f.get("tokenizer.chat_template", types=str)`. A bool is not accepted as an int."""
        if key not in self.metadata:
            return default
        return self._typed(key, types)

    def require(self, key: str, types=None):
        """The value of metadata `key`, which must be present (and of `types`, when given)."""
        if key not in self.metadata:
            raise MetadataError(f"{self.path}: required metadata key {key!r} is missing")
        return self._typed(key, types)

    def _typed(self, key: str, types):
        value = self.metadata[key]
        if types is None:
            return value
        wanted = types if isinstance(types, tuple) else (types,)
        if isinstance(value, wanted) and not (isinstance(value, bool) and bool not in wanted):
            return value
        names = " or ".join(t.__name__ for t in wanted)
        raise MetadataError(f"{self.path}: metadata key {key!r} should be {names}, found "
                            f"{type(value).__name__} {_short_repr(value)}")

    def tensor_bytes(self, name: str) -> np.ndarray:
        """Zero-copy uint8 view of a tensor's blocks."""
        info = self.tensors[name]
        return self.data[info.offset: info.offset + info.n_bytes]

    def close(self) -> None:
        """Drop this object's references to the memory map (views handed out keep it alive)."""
        self._buf = None
        self.data = None

    def __repr__(self) -> str:
        return f"GGUFFile({self.path!r}, {len(self.tensors)} tensors, {len(self.metadata)} keys)"


# GGUF value types (gguf.GGUFValueType): struct formats of the scalar ones
_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                   10: "<Q", 11: "<q", 12: "<d"}
_U64 = struct.Struct("<Q")
_SCALAR_SIZES = {vtype: struct.calcsize(fmt) for vtype, fmt in _SCALAR_FORMATS.items()}
_BOOL, _STRING, _ARRAY = 7, 8, 9


def _short_repr(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _round_up(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


def _numpy_shape(dims) -> tuple:
    """ggml's ne (fastest-varying first) -> NumPy order (rows first)."""
    return tuple(int(d) for d in reversed(dims))


