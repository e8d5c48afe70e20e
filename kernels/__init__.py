"""`lmengine.kernels`: compute. Numba-compiled kernels (kernels/*.py) and the cffi C extension
(kernels/csrc/, module `lmengine.kernels._native`).

This package imports nothing from the engine (`lmengine` itself) or from `lmengine.converters`:
it takes arrays and sizes, and returns arrays. The stale-cache purge that must run before any
compiled kernel is loaded from disk (jit_cache.py) is started by `lmengine/__init__.py`, which
knows which of its own folders compile these kernels into themselves.
"""
