"""Numba's on-disk cache: kept consistent with the source, portable when baked into a wheel, and
visible while it is being filled.

Three jobs, one per section below:

1. **Stale callees.** Numba keys a cached function on its own source file only. A function that
   calls a kernel from another file (the model forward calls `lmengine.kernels.matmul.matmul`,
   which is compiled into it) would keep the old callee after that file changes, or after an
   upgrade: silently stale code. `purge_stale_cache` fingerprints the *contents* of every source
   file whose compiled code can end up inside another's, and deletes the cached objects
   (*.nbi, *.nbc) when the fingerprint changes. Contents, not timestamps: installing a wheel
   gives every file a new mtime, and a cache baked into the wheel must survive that.

2. **A portable target.** Numba compiles for the host CPU by default ("znver1", "skylake-avx512"),
   and a cache entry only matches a machine whose CPU name and feature string are the same. A cache
   compiled for the generic `x86-64-v3` level (AVX2, FMA, F16C, BMI2: every x86 CPU since 2015)
   matches every such machine, so it can be compiled once when a wheel is built
   (`lmengine warmup --portable`, engine/warmup.py) and shipped inside it. `choose_target`, run
   when lmengine is imported, switches this process to that target when the installed package
   holds such a cache (or LMENGINE_NUMBA_TARGET=portable asks for it), the CPU supports the level,
   and Numba's code generator does not exist yet. The hot loops are C with their own
   run-time ISA choice (kernels/native.py), so the Numba code lost little by it (see
   docs/FIRST_START.md for the measurement). `LMENGINE_NUMBA_TARGET=host` turns it off.

3. **Progress.** A first start compiles about 150 functions, for minutes on a slow machine.
   `CompileProgress` counts them from Numba's compile events and keeps one status line updated.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import sys
import time

FINGERPRINT_FILE = "lmengine-jit-fingerprint.txt"
TARGET_FILE = "lmengine-jit-target.json"        # written beside the fingerprint by a portable warmup
PORTABLE_CPU = "x86-64-v3"
# What the x86-64-v3 level requires of a CPU (LLVM feature names, as llvmlite reports the host's)
PORTABLE_FEATURES = ("avx", "avx2", "fma", "f16c", "bmi", "bmi2", "lzcnt", "movbe")


# -- 1. stale callees ------------------------------------------------------------------------------

def _source_files(source_dirs) -> list:
    files = []
    for d in source_dirs:
        files += sorted(glob.glob(os.path.join(d, "*.py")) + glob.glob(os.path.join(d, "csrc", "*.[ch]")))
    return files


def fingerprint(source_dirs) -> str:
    """A hash of the names and contents of the compiled sources (a few hundred KB: ~1 ms)."""
    h = hashlib.sha256()
    for path in _source_files(source_dirs):
        with open(path, "rb") as fh:
            digest = hashlib.sha256(fh.read()).hexdigest()
        h.update(f"{os.path.basename(os.path.dirname(path))}/{os.path.basename(path)}:{digest}\n".encode())
    return h.hexdigest()


def purge_stale_cache(source_dirs) -> bool:
    """Delete Numba cache files under each dir's __pycache__ if any source changed since the
    last call. Returns True when something was purged. Never raises (a read-only install keeps
    its cache; Numba then falls back to compiling in memory or to its own cache dir)."""
    try:
        stamp_dir = os.path.join(source_dirs[0], "__pycache__")
        stamp = os.path.join(stamp_dir, FINGERPRINT_FILE)
        current = fingerprint(source_dirs)
        try:
            with open(stamp, encoding="ascii") as fh:
                if fh.read().strip() == current:
                    return False
        except OSError:
            pass
        for d in source_dirs:
            for path in glob.glob(os.path.join(d, "__pycache__", "*.nb[ic]")):
                os.remove(path)
        try:
            os.remove(os.path.join(stamp_dir, TARGET_FILE))     # the baked cache is gone with it
        except OSError:
            pass
        os.makedirs(stamp_dir, exist_ok=True)
        with open(stamp, "w", encoding="ascii") as fh:
            fh.write(current)
        return True
    except OSError:
        return False


# -- 2. the portable target --------------------------------------------------------------------------

def _numba_compiled_yet() -> bool:
    """Whether Numba's CPU code generator exists in this process (it is made lazily, at the first
    compile or cache load; its CPU name and features are fixed then)."""
    from numba.core.registry import cpu_target
    return "_toplevel_target_context" in vars(cpu_target)


def host_supports_portable_target() -> bool:
    import llvmlite.binding as ll
    features = ll.get_host_cpu_features()
    return all(features.get(name, False) for name in PORTABLE_FEATURES)


def set_portable_target() -> bool:
    """Compile this process's Numba code for x86-64-v3 instead of the host CPU. False (nothing
    changed) when the CPU lacks the level, Numba already compiled something, or the user chose a
    target (NUMBA_CPU_NAME, or LMENGINE_NUMBA_TARGET=host)."""
    import numba
    if (os.environ.get("LMENGINE_NUMBA_TARGET", "") == "host" or numba.config.CPU_NAME is not None
            or _numba_compiled_yet() or not host_supports_portable_target()):
        return False
    numba.config.CPU_NAME = PORTABLE_CPU
    numba.config.CPU_FEATURES = ""        # the level's features, not the host's extras
    return True


def write_target_file(cache_dir: str) -> None:
    """Record, beside the fingerprint, that this cache was compiled for the portable target."""
    import numba
    info = {"cpu_name": PORTABLE_CPU, "numba": numba.__version__,
            "python": f"{sys.version_info[0]}.{sys.version_info[1]}"}
    with open(os.path.join(cache_dir, "__pycache__", TARGET_FILE), "w", encoding="ascii") as fh:
        json.dump(info, fh)


def portable_target_active() -> bool:
    import numba
    return numba.config.CPU_NAME == PORTABLE_CPU


def choose_target(cache_dir: str) -> bool:
    """At import, before any Numba code is compiled or loaded (importing the C extension's
    bindings already fixes Numba's code generator): LMENGINE_NUMBA_TARGET=portable asks for the
    x86-64-v3 level (how `lmengine warmup --portable` compiles a cache for a wheel); otherwise a
    baked cache in `cache_dir` chooses it (`use_baked_target`). True when the level is in use."""
    if os.environ.get("LMENGINE_NUMBA_TARGET", "") == "portable":
        return set_portable_target()
    return use_baked_target(cache_dir)


def use_baked_target(cache_dir: str) -> bool:
    """If the installed package holds a cache compiled for the portable target by this Numba and
    Python, compile and load for that target too (so the cache matches). Never raises."""
    try:
        with open(os.path.join(cache_dir, "__pycache__", TARGET_FILE), encoding="ascii") as fh:
            info = json.load(fh)
        import numba
        if (info.get("cpu_name") != PORTABLE_CPU or info.get("numba") != numba.__version__
                or info.get("python") != f"{sys.version_info[0]}.{sys.version_info[1]}"):
            return False
        return set_portable_target()
    except (OSError, ValueError, ImportError):
        return False


# -- 3. progress -----------------------------------------------------------------------------------

class CompileProgress:
    """While active, count the functions Numba compiles (cache misses) and keep one status line on
    `stream` up to date, at most every `interval` seconds:

        compiling kernels (first run only): 87 functions, 62 s  [lmengine.kernels.matmul.matmul_k]

    On a terminal the line is rewritten in place (every `interval` s, default 0.5); elsewhere (a
    log file) a new line is written (default: every 10 s). Nothing is printed when nothing compiles (a warm start). Use
    as a context manager."""

    def __init__(self, stream=None, interval: float | None = None,
                 label: str = "compiling kernels (first run only)"):
        self.stream = stream if stream is not None else sys.stderr
        isatty = getattr(self.stream, "isatty", None)
        self.in_place = bool(isatty and isatty())
        self.interval = interval if interval is not None else (0.5 if self.in_place else 10.0)
        self.label = label
        self.n_compiled = 0
        self._depth = 0
        self._t0 = self._last = 0.0
        self._shown = False
        self._listener = None

    def __enter__(self) -> "CompileProgress":
        from numba.core import event

        progress = self

        class _Listener(event.Listener):
            def on_start(self, ev):
                progress._depth += 1
                name = getattr(ev.data.get("dispatcher"), "py_func", None)
                progress._show(getattr(name, "__module__", "?") + "." + getattr(name, "__qualname__", "?"))

            def on_end(self, ev):
                progress._depth -= 1
                progress.n_compiled += 1

        self._t0 = self._last = time.perf_counter()
        self._listener = _Listener()
        event.register("numba:compile", self._listener)
        return self

    def __exit__(self, *exc) -> None:
        from numba.core import event
        event.unregister("numba:compile", self._listener)
        if self._shown:
            elapsed = time.perf_counter() - self._t0
            line = f"{self.label}: {self.n_compiled} functions compiled in {elapsed:.0f} s"
            self.stream.write(("\r" + line.ljust(100) if self.in_place else line) + "\n")
            self.stream.flush()

    def _show(self, current: str) -> None:
        now = time.perf_counter()
        if now - self._last < self.interval:      # (the first line comes one interval after the start)
            return
        self._last = now
        self._shown = True
        line = f"{self.label}: {self.n_compiled} functions, {now - self._t0:.0f} s  [{current}]"[:100]
        self.stream.write("\r" + line.ljust(100) if self.in_place else line + "\n")
        self.stream.flush()
