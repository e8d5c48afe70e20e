"""Keep Numba's on-disk cache consistent with the source.

Numba keys a cached function on its own source file's timestamp only. A function that calls a
kernel from another file (the model forward calls `lmengine.kernels.matmul.matmul`, which is compiled
into it) keeps the old callee after that file changes, or after an upgrade: silently stale code.
`purge_stale_cache` fingerprints every source file whose compiled code can end up inside
another's, and deletes the cached objects (*.nbi, *.nbc) when the fingerprint changes.
"""
from __future__ import annotations

import glob
import hashlib
import os

FINGERPRINT_FILE = "lmengine-jit-fingerprint.txt"


def _fingerprint(source_dirs) -> str:
    h = hashlib.sha256()
    for d in source_dirs:
        for path in sorted(glob.glob(os.path.join(d, "*.py")) + glob.glob(os.path.join(d, "csrc", "*.[ch]"))):
            st = os.stat(path)
            h.update(f"{os.path.relpath(path, d)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def purge_stale_cache(source_dirs) -> bool:
    """Delete Numba cache files under each dir's __pycache__ if any source changed since the
    last call. Returns True when something was purged. Never raises (a read-only install keeps
    its cache; Numba then falls back to compiling in memory or to its own cache dir)."""
    try:
        stamp_dir = os.path.join(source_dirs[0], "__pycache__")
        stamp = os.path.join(stamp_dir, FINGERPRINT_FILE)
        current = _fingerprint(source_dirs)
        try:
            with open(stamp, encoding="ascii") as fh:
                if fh.read().strip() == current:
                    return False
        except OSError:
            pass
        for d in source_dirs:
            for path in glob.glob(os.path.join(d, "__pycache__", "*.nb[ic]")):
                os.remove(path)
        os.makedirs(stamp_dir, exist_ok=True)
        with open(stamp, "w", encoding="ascii") as fh:
            fh.write(current)
        return True
    except OSError:
        return False
