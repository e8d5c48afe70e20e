"""Build hook: setuptools reads the project from pyproject.toml; this file adds the cffi extension
`lmengine.kernels._native` (the C kernels of kernels/csrc/, see kernels/build_native.py).

The extension is optional. Where it cannot be compiled (no C compiler, no Python headers, a
failing compiler) the install goes on without it, after one warning line, and lmengine runs on
its Numba kernels, slower (`lmengine.kernels.native.fast_path_note()` says so at run time).
LMENGINE_REQUIRE_NATIVE=1 makes a failed compile fail the build instead (.ci/wheel and .ci/asan
set it: a wheel or a sanitizer run without the extension would be worthless).

A wheel (`pip install .`, `python -m build`) also carries the Numba kernels compiled ahead, for
the x86-64-v3 level (every AVX2 CPU): after building, `BuildWithCompiledKernels` runs
`lmengine warmup --portable` on the built package (about 3 minutes on 2 cores), so the installed
package starts without compiling (docs/FIRST_START.md). Editable installs skip it (they compile on
first use, into the source tree's cache), and so do CPUs without AVX2 (the wheel then compiles on
first use, as before). LMENGINE_BAKE_KERNELS=0 skips it; =require fails the build when it cannot
be done (.ci/wheel sets that).

Wheels are tagged abi3 (cp310 and later): cffi builds the module on Python's stable ABI, so one
wheel serves every CPython >= 3.10 -- except on debug and free-threaded Pythons, where cffi
cannot, and the wheel keeps its interpreter's own tag.
"""
import os
import subprocess
import sys
import sysconfig
import tempfile

from setuptools import setup
from setuptools.command.build import build
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


BAKE_KERNELS = os.environ.get("LMENGINE_BAKE_KERNELS", "1")    # "0": skip, "require": failure fails the build
BAKE_SCRIPT = """
import sys
from lmengine.kernels import jit_cache
if not jit_cache.portable_target_active():
    sys.exit("the x86-64-v3 target is not available on this CPU (AVX2, FMA, F16C, BMI2 needed)")
from lmengine.warmup import warmup
report = warmup(portable=True, stream=sys.stderr)
print(f"lmengine: {report.n_compiled} kernels compiled into the wheel in {report.seconds:.0f} s", file=sys.stderr)
"""


class BuildWithCompiledKernels(build):
    """build, then compile the Numba kernels of the built package for x86-64-v3 (see above)."""

    def run(self):
        super().run()
        if BAKE_KERNELS == "0" or self.get_finalized_command("build_py").editable_mode:
            return
        build_lib = os.path.abspath(self.build_lib)
        print("lmengine: compiling the Numba kernels into the wheel (lmengine warmup --portable; about 3 "
              "minutes on 2 cores; LMENGINE_BAKE_KERNELS=0 skips it)", file=sys.stderr, flush=True)
        # build_lib first, then whatever PYTHONPATH holds: pip's isolated build puts the build
        # requirements (numba, numpy, ...) on the path through it, and in a fresh venv they are
        # nowhere else yet (replacing it made the warmup fail there: an unbaked wheel)
        path = os.pathsep.join(p for p in (build_lib, os.environ.get("PYTHONPATH", "")) if p)
        env = dict(os.environ, LMENGINE_NUMBA_TARGET="portable", PYTHONPATH=path)
        env.pop("NUMBA_CACHE_DIR", None)           # the cache goes beside the built sources
        with tempfile.TemporaryDirectory() as cwd:   # away from the source folders
            done = subprocess.run([sys.executable, "-c", BAKE_SCRIPT], env=env, cwd=cwd).returncode == 0
        if not done:
            if BAKE_KERNELS == "require":
                raise RuntimeError("lmengine: compiling the kernels into the wheel failed (LMENGINE_BAKE_KERNELS=require)")
            print("WARNING: lmengine's kernels were not compiled into the wheel; they compile on first use "
                  "instead (a few minutes once).", file=sys.stderr)


setup(
    cffi_modules=["kernels/build_native.py:ffibuilder"],   # cffi subclasses the build_ext below
    cmdclass={"build_ext": OptionalBuildExt, "build": BuildWithCompiledKernels},
    options={"bdist_wheel": {"py_limited_api": "cp310"}} if STABLE_ABI else {},
)
