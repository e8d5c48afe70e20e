"""cffi build script of the C kernels: module `lmengine.kernels._native` from kernels/csrc/ (SOURCES
below; csrc/lmengine.h declares the API).

setup.py names it (`cffi_modules=["kernels/build_native.py:ffibuilder"]`), so `pip install .`
and `pip install -e .` compile it. To build in place by hand (writes kernels/_native*.so):

    python kernels/build_native.py

Compiler flags: -O3, and no -march: the SIMD functions carry their own target attributes and are
picked by CPUID at run time, so the built module runs on any x86-64 (and on other CPUs with the
scalar path only). -ffp-contract=off (no implicit FMA) keeps the float decode bit-exact with ggml
and the portable paths bit-exact with the Numba references they mirror.
"""
import glob
import importlib.machinery
import os
import re
import shutil
import sys
import tempfile

import cffi

CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
HEADER = os.path.join(CSRC, "lmengine.h")
SOURCES = ("cpu.c", "qdot.c", "kquants.c", "packed.c", "attention.c", "ops.c")    # in kernels/csrc/
HEADERS = ("lmengine.h", "common.h")                                     # rebuild when they change


def declarations(header=HEADER):
    """The C API for cffi's cdef: lmengine.h without its comments and preprocessor lines (so the
    header stays the one place the functions are declared)."""
    with open(header, encoding="utf-8") as fh:
        text = re.sub(r"/\*.*?\*/", "", fh.read(), flags=re.S)
    return "\n".join(line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#"))


if sys.platform == "win32":
    COMPILE_ARGS, LIBRARIES = ["/O2"], []
else:
    COMPILE_ARGS, LIBRARIES = ["-O3", "-std=gnu11", "-ffp-contract=off", "-fvisibility=hidden"], ["m"]


def make_builder(root=""):
    """The cffi builder; paths below `root` (setuptools wants them relative to the project root)."""
    csrc = os.path.join(root, "kernels", "csrc")
    builder = cffi.FFI()
    builder.cdef(declarations())
    builder.set_source(
        "lmengine.kernels._native",
        '#include "lmengine.h"',
        sources=[os.path.join(csrc, name) for name in SOURCES],
        include_dirs=[csrc],
        depends=[os.path.join(csrc, name) for name in HEADERS],
        extra_compile_args=COMPILE_ARGS,
        libraries=LIBRARIES,                              # expf of the portable paths
    )
    return builder


ffibuilder = make_builder()

if __name__ == "__main__":
    project_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with tempfile.TemporaryDirectory() as build_dir:     # objects and generated C stay out of the tree
        built = make_builder(project_root).compile(tmpdir=build_dir, verbose=True)
        for stale in glob.glob(os.path.join(project_root, "kernels", "_native*.so")):
            os.remove(stale)                              # one module file only
        # the name pip's build gives it (cffi modules use the stable ABI), so that a later
        # `pip install -e .` replaces this file rather than being shadowed by it
        name = os.path.basename(built)
        if ".abi3.so" in importlib.machinery.EXTENSION_SUFFIXES:
            name = "_native.abi3.so"
        shutil.copy(built, os.path.join(project_root, "kernels", name))
