"""Build hook: setuptools reads the project from pyproject.toml; this file adds the cffi extension
`lmengine.kernels._native` (the C kernels of kernels/csrc/, see kernels/build_native.py).

The extension is optional. Where it cannot be compiled (no C compiler, no Python headers, a
failing compiler) the install goes on without it, after one warning line, and lmengine runs on
its Numba kernels, slower (`lmengine.kernels.native.fast_path_note()` says so at run time).
LMENGINE_REQUIRE_NATIVE=1 makes a failed compile fail the build instead (.ci/wheel and .ci/asan
set it: a wheel or a sanitizer run without the extension would be worthless).

Wheels are tagged abi3 (cp310 and later): cffi builds the module on Python's stable ABI, so one
wheel serves every CPython >= 3.10 -- except on debug and free-threaded Pythons, where cffi
cannot, and the wheel keeps its interpreter's own tag.
"""
import os
import sys
import sysconfig

from setuptools import setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CCompilerError, ExecError, PlatformError

REQUIRE_NATIVE = os.environ.get("LMENGINE_REQUIRE_NATIVE", "") not in ("", "0")
STABLE_ABI = not hasattr(sys, "gettotalrefcount") and not sysconfig.get_config_var("Py_GIL_DISABLED")


class OptionalBuildExt(build_ext):
    """build_ext that leaves the C extension out, with a warning, when it cannot be compiled."""

    def run(self):
        try:
            super().run()
        except (CCompilerError, ExecError, PlatformError) as exc:   # compile/link failed, no compiler
            if REQUIRE_NATIVE:
                raise
            self.extensions = []     # nothing built: nothing to copy in place or to list as output
            reason = str(exc) if len(str(exc)) <= 160 else str(exc)[:157] + "..."
            print(f"WARNING: lmengine's C extension was not built ({reason}); lmengine will run on its "
                  "Numba kernels only (slower). Install a C compiler (gcc/clang) and reinstall for the "
                  "fast path.", file=sys.stderr)


setup(
    cffi_modules=["kernels/build_native.py:ffibuilder"],   # cffi subclasses the build_ext below
    cmdclass={"build_ext": OptionalBuildExt},
    options={"bdist_wheel": {"py_limited_api": "cp310"}} if STABLE_ABI else {},
)
