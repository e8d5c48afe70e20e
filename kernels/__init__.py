"""Compute kernels: Numba-compiled (kernels/*.py) plus the cffi C extension (kernels/csrc/).

On import, stale Numba cache files are removed (see jit_cache.py): compiled code is cached on
disk, and a cached caller must never keep an old copy of a kernel it inlined. The model forward
passes in engine/models and engine/backends compile our kernels into themselves, so their
sources are part of the fingerprint (they are read as files, not imported).
"""
import os as _os

from .jit_cache import purge_stale_cache as _purge

_here = _os.path.dirname(_os.path.abspath(__file__))
_root = _os.path.dirname(_here)
_purge([_here] + [d for d in (_os.path.join(_root, "engine", "models"), _os.path.join(_root, "engine", "backends"))
                  if _os.path.isdir(d)])
