"""Re-laying matrices out at load time: the 16-row packed form of Q8_0 / Q4_0 / Q4_1 / Q4_K / Q5_K / Q6_K / IQ4_XS matrices
(kernels/csrc/packed.c, for the AVX2 and AVX-512 VNNI products), and giving the file's pages of a matrix
back to the OS once a packed copy replaces it.

The model decides which matrices to pack (its policy); this module only does the packing:

    packed, offsets = pack_matrices(data, [(offset, n_bytes, w_type, n_rows, n_cols), ...])

packs each raw matrix `data[offset : offset + n_bytes]` into one new uint8 array, in the order
given, and returns where each one starts. Matrices packed back to back with whole 16-row groups
form the packing of their concatenated rows (`contiguous_parts` says when), so a fused q|k|v
product can run over them as one matrix.
"""
from __future__ import annotations

import itertools
import mmap
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from . import native

PACKABLE_TYPES = native.PACKED_TYPES  # types with a packed layout
PACK_ROWS = native.PACK_ROWS         # rows per group of the packed layout


def pack_matrices(data: np.ndarray, matrices, release=None, n_threads: int | None = None) -> tuple[np.ndarray, list[int]]:
    """Pack each (offset, n_bytes, w_type, n_rows, n_cols) matrix of `data` (uint8, the raw ggml
    blocks) into one array. Returns (packed uint8 array, start offset of each matrix in it).
    release(offset, n_bytes), when given, is called after each matrix is packed (to give the raw
    pages back). Matrices are packed n_threads at a time (the C call releases the GIL; default:
    the CPUs, at most 4): most of the time goes to first touches of the new pages, and the kernel
    serves those from several threads at once (a 1B Q4_0 file here: 0.56 s on one thread, 0.17-0.21 s
    on two; MAP_POPULATE, 0.31 s, also kept the file's pages and the whole copy resident at once)."""
    n_threads = min(4, os.cpu_count() or 1) if n_threads is None else n_threads
    sizes = [native.packed_bytes(w_type, n_rows, n_cols) for _, _, w_type, n_rows, n_cols in matrices]
    packed = np.empty(sum(sizes), dtype=np.uint8)
    starts = list(itertools.accumulate(sizes, initial=0))[:-1]

    def pack(i: int) -> None:
        offset, n_bytes, w_type, n_rows, n_cols = matrices[i]
        native.pack_q8(data[offset: offset + n_bytes], w_type, n_rows, n_cols,
                       out=packed[starts[i]: starts[i] + sizes[i]])
        if release is not None:
            release(offset, n_bytes)

    with ThreadPoolExecutor(max(1, n_threads)) as pool:
        list(pool.map(pack, range(len(matrices))))
    return packed, starts


def contiguous_parts(parts) -> bool:
    """Whether packed matrices, given as (packed offset, w_type, n_rows, n_cols) in order, follow
    one another with one type, one width and whole 16-row groups: then together they are the
    packing of their concatenated rows."""
    first_type, first_cols = parts[0][1], parts[0][3]
    for (offset, w_type, n_rows, n_cols), (next_offset, next_type, _, next_cols) in zip(parts, parts[1:]):
        if (offset < 0 or next_offset < 0 or w_type != first_type or next_type != first_type
                or n_cols != first_cols or next_cols != first_cols or n_rows % PACK_ROWS
                or next_offset != offset + native.packed_bytes(w_type, n_rows, n_cols)):
            return False
    return True


def release_pages(mapped, offset: int, n_bytes: int) -> None:
    """Tell the OS that this process no longer needs the whole pages of the memory map `mapped`
    (an mmap.mmap) inside [offset, offset + n_bytes): they leave the resident set, and reading them
    again would load them again. A no-op where madvise is unavailable."""
    if mapped is None or not hasattr(mapped, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
        return
    begin = -(-offset // mmap.PAGESIZE) * mmap.PAGESIZE
    end = (offset + n_bytes) // mmap.PAGESIZE * mmap.PAGESIZE
    if end > begin:
        mapped.madvise(mmap.MADV_DONTNEED, begin, end - begin)
