"""Read a GGUF file through a memory map: metadata, tensor infos, zero-copy views of tensor blocks.

Every length, offset and count is checked against the file size before it is used, and every
failure is a `lmengine.converters.errors` exception that names the file and the field or tensor. Type ids
and block sizes come from the `gguf` package (the format's own library).

Shapes are given in NumPy order (rows first): a ggml tensor with ne = [576, 49152] (576 values per
row, 49152 rows) has `shape == (49152, 576)`. The bytes of a tensor are a view into the one
`np.memmap` of the file (`GGUFFile.data`); nothing is copied or expanded.
"""
from __future__ import annotations

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


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type_name: str        # ggml type name: "F32", "Q4_1", ...
    type_id: int          # ggml type id (GGMLQuantizationType value)
    shape: tuple          # NumPy order: (rows, cols) for a matrix, (n,) for a vector
    offset: int           # absolute byte offset of the first block in the file
    n_bytes: int          # bytes of blocks


class GGUFFile:
    """An open GGUF file. `metadata` maps key -> Python value; `tensors` maps name -> TensorInfo.

    The header is parsed here rather than by `gguf.GGUFReader`: the reader makes a NumPy view per
    array element and takes ~2.5 s on a 49k-token vocabulary, longer than our whole warm-start
    budget; this parser reads the same header in well under 0.2 s. The `gguf` package stays the
    reference: tests check that both read the same metadata and tensor infos.
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
        # Every tensor info and key/value takes at least 8 bytes: counts beyond that are corrupt.
        if n_tensors * 8 > self.file_size or n_kv * 8 > self.file_size:
            raise TruncatedFileError(
                f"{self.path}: header claims {n_tensors} tensors and {n_kv} metadata entries, "
                f"more than a {self.file_size}-byte file can hold")
        self._n_tensors, self._n_kv = n_tensors, n_kv

    def _parse(self) -> None:
        import gguf
        pos = 24
        for i in range(self._n_kv):
            where = f"metadata entry {i}"
            key, pos = self._string(pos, where)
            where = f"metadata key {key!r}"
            (vtype,), pos = self._unpack("<I", pos, where)
            value, pos = self._value(vtype, pos, where)
            self.metadata[key] = value

        infos = []
        for i in range(self._n_tensors):
            name, pos = self._string(pos, f"tensor info {i}")
            where = f"tensor {name!r}"
            (n_dims,), pos = self._unpack("<I", pos, where)
            if n_dims > 4:
                raise ModelFileError(f"{self.path}: {where} has {n_dims} dimensions (at most 4)")
            dims, pos = self._unpack(f"<{n_dims}Q", pos, where)
            (type_id, offset), pos = self._unpack("<IQ", pos, where)
            infos.append((name, dims, type_id, offset))

        alignment = self.metadata.get("general.alignment", 32)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise MetadataError(f"{self.path}: general.alignment must be a power of two, got {alignment!r}")
        data_start = (pos + alignment - 1) // alignment * alignment
        for name, dims, type_id, offset in infos:
            try:
                type_name = gguf.GGMLQuantizationType(type_id).name
            except ValueError:
                raise UnsupportedQuantTypeError(
                    f"{self.path}: tensor {name!r} has unknown ggml type id {type_id}") from None
            block_size, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(type_id)]
            n_values = 1
            for d in dims:
                n_values *= d
            if dims and dims[0] % block_size:
                raise ModelFileError(
                    f"{self.path}: tensor {name!r} ({type_name}) has rows of {dims[0]} values, "
                    f"not a multiple of the block size {block_size}")
            n_bytes = n_values // block_size * type_size
            start = data_start + offset
            if start + n_bytes > self.file_size:
                raise TruncatedFileError(
                    f"{self.path}: tensor {name!r} ({type_name}, {n_bytes} bytes at offset {start}) "
                    f"runs past the end of the file ({self.file_size} bytes)")
            if name in self.tensors:
                raise ModelFileError(f"{self.path}: tensor {name!r} appears twice")
            shape = tuple(int(d) for d in reversed(dims))
            self.tensors[name] = TensorInfo(name, type_name, type_id, shape, start, n_bytes)

    def _unpack(self, fmt: str, pos: int, where: str):
        size = struct.calcsize(fmt)
        if pos + size > self.file_size:
            raise TruncatedFileError(
                f"{self.path}: {where} runs past the end of the file (needs bytes {pos}..{pos + size}, "
                f"file has {self.file_size})")
        return struct.unpack_from(fmt, self._buf, pos), pos + size

    def _string(self, pos: int, where: str):
        (length,), pos = self._unpack("<Q", pos, where)
        if pos + length > self.file_size:
            raise TruncatedFileError(
                f"{self.path}: {where}: a string of {length} bytes at offset {pos} runs past the end "
                f"of the file ({self.file_size} bytes)")
        try:
            return bytes(self._buf[pos: pos + length]).decode("utf-8"), pos + length
        except UnicodeDecodeError as e:
            raise ModelFileError(f"{self.path}: {where}: a string is not valid UTF-8 ({e})") from None

    def _value(self, vtype: int, pos: int, where: str):
        if vtype in _SCALAR_FORMATS:
            (value,), pos = self._unpack(_SCALAR_FORMATS[vtype], pos, where)
            return (bool(value) if vtype == _BOOL else value), pos
        if vtype == _STRING:
            return self._string(pos, where)
        if vtype == _ARRAY:
            (item_type, n), pos = self._unpack("<IQ", pos, where)
            if item_type in _SCALAR_FORMATS:
                fmt = _SCALAR_FORMATS[item_type]
                size = struct.calcsize(fmt)
                if pos + n * size > self.file_size:
                    raise TruncatedFileError(
                        f"{self.path}: {where}: an array of {n} items runs past the end of the file")
                values = np.frombuffer(self._buf, dtype=np.dtype(fmt), count=n, offset=pos)
                values = values.astype(bool) if item_type == _BOOL else values
                return values.tolist(), pos + n * size
            if item_type == _STRING:
                if n * 8 > self.file_size - pos:
                    raise TruncatedFileError(
                        f"{self.path}: {where}: an array of {n} strings cannot fit in the file")
                items = []
                for _ in range(n):
                    item, pos = self._string(pos, where)
                    items.append(item)
                return items, pos
            if item_type == _ARRAY:
                items = []
                for _ in range(n):
                    item, pos = self._value(_ARRAY, pos, where)
                    items.append(item)
                return items, pos
            raise MetadataError(f"{self.path}: {where}: unknown array item type {item_type}")
        raise MetadataError(f"{self.path}: {where}: unknown value type {vtype}")

    # -- access ------------------------------------------------------------------------------
    def get(self, key: str, default=None):
        return self.metadata.get(key, default)

    def require(self, key: str, types=None):
        """A metadata value that must be present (and of `types`, when given)."""
        if key not in self.metadata:
            raise MetadataError(f"{self.path}: required metadata key {key!r} is missing")
        value = self.metadata[key]
        if types is not None and not isinstance(value, types):
            raise MetadataError(
                f"{self.path}: metadata key {key!r} should be {types}, found {type(value).__name__}")
        return value

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
_BOOL, _STRING, _ARRAY = 7, 8, 9


