"""cffi build script of the C kernels: module `lmengine.kernels._native` from kernels/csrc/ (SOURCES
below; csrc/lmengine.h declares the API).

setup.py names it (`cffi_modules=["kernels/build_native.py:ffibuilder"]`), so `pip install .`
and `pip install -e .` compile it. To build in place by hand (writes kernels/_native*.so), or into
another folder (prints the module's path; kernels/ untouched):

    python kernels/build_native.py
    python kernels/build_native.py --out DIR

Compiler flags: -O3, and no -march: the SIMD functions carry their own target attributes and are
picked by CPUID at run time, so the built module runs on any x86-64 (and on other CPUs with the
scalar path only). -ffp-contract=off (no implicit FMA) keeps the float decode bit-exact with ggml
and the portable paths bit-exact with the Numba references they mirror.

AddressSanitizer build (checks every load and store of the C kernels; .ci/asan runs the kernel
tests on it): set LMENGINE_ASAN=1 while building, e.g. `LMENGINE_ASAN=1 python
kernels/build_native.py --out DIR`. The module then needs the ASan runtime loaded first, as Python
itself is not instrumented: `LD_PRELOAD=$(gcc -print-file-name=libasan.so)
ASAN_OPTIONS=detect_leaks=0 python ...` (see docs/INSTALL.md). Never install such a build for
normal use.
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


ASAN = os.environ.get("LMENGINE_ASAN", "") not in ("", "0")

if sys.platform == "win32":
    COMPILE_ARGS, LINK_ARGS, LIBRARIES = ["/O2"], [], []
else:
    COMPILE_ARGS, LINK_ARGS, LIBRARIES = ["-O3", "-std=gnu11", "-ffp-contract=off", "-fvisibility=hidden"], [], ["m"]
if ASAN and sys.platform != "win32":
    # -O1 -g: exact file:line in reports (the later -O1 overrides -O3); frame pointers: full stacks
    COMPILE_ARGS += ["-fsanitize=address", "-fno-omit-frame-pointer", "-O1", "-g"]
    LINK_ARGS += ["-fsanitize=address"]


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
        extra_link_args=LINK_ARGS,
        libraries=LIBRARIES,                              # expf of the portable paths
    )
    return builder


ffibuilder = make_builder()


def build_in_place(project_root):
    """Compile into kernels/ (replacing any older module file) for an editable checkout."""
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


def build_elsewhere(project_root, out_dir):
    """Compile into out_dir (objects and module; kernels/ untouched); returns the module's path."""
    return make_builder(project_root).compile(tmpdir=out_dir)


if __name__ == "__main__":
    # python kernels/build_native.py               build into kernels/
    # python kernels/build_native.py --out DIR     build into DIR, print the module's path (.ci/asan)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if len(sys.argv) == 3 and sys.argv[1] == "--out":
        print(build_elsewhere(root, os.path.abspath(sys.argv[2])))
    elif len(sys.argv) == 1:
        build_in_place(root)
    else:
        sys.exit("usage: python kernels/build_native.py [--out DIR]")
