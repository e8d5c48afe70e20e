"""cffi build script of the C kernels: module `kernels._native` from kernels/csrc/ (qdot.c,
packed.c, attention.c, ops.c).

setup.py names it (`cffi_modules=["kernels/build_native.py:ffibuilder"]`), so `pip install .`
and `pip install -e .` compile it. To build in place by hand (writes kernels/_native*.so):

    python kernels/build_native.py

Compiler flags: -O3, and no -march: the SIMD functions carry their own target attributes and are
picked by CPUID at run time, so the built module runs on any x86-64 (and on other CPUs with the
scalar path only). -ffp-contract=off keeps the float decode bit-exact with ggml (no implicit FMA).
"""
import glob
import importlib.machinery
import os
import shutil
import sys
import tempfile

import cffi

CDEF = """
int lme_native_available(void);
int lme_best_isa(void);
int lme_get_isa(void);
int lme_set_isa(int isa);
int lme_matmul_q8(int64_t w_type, const uint8_t *w, int64_t w_len,
                  int64_t n_rows, int64_t n_cols, int64_t row_begin, int64_t row_end,
                  const int8_t *xq, int64_t xq_len, const float *xd, int64_t xd_len,
                  const float *xs, int64_t xs_len, int64_t n_tok,
                  float *out, int64_t out_len);
int lme_matmul_f32(int64_t w_type, const uint8_t *w, int64_t w_len,
                   int64_t n_rows, int64_t n_cols, int64_t row_begin, int64_t row_end,
                   const float *x, int64_t x_len, int64_t n_tok,
                   float *out, int64_t out_len);
int64_t lme_packed_bytes(int64_t w_type, int64_t n_rows, int64_t n_cols);
int lme_pack_q8(int64_t w_type, const uint8_t *w, int64_t w_len, int64_t n_rows, int64_t n_cols,
                uint8_t *dst, int64_t dst_len);
int lme_matmul_packed(int64_t w_type, const uint8_t *p, int64_t p_len,
                      int64_t n_rows, int64_t n_cols, int64_t row_begin, int64_t row_end,
                      const int8_t *xq, int64_t xq_len, const float *xd, int64_t xd_len,
                      const float *xs, int64_t xs_len, int64_t n_tok, int64_t n_terms,
                      float *out, int64_t out_len);
int lme_attention(const float *q, int64_t q_len, int64_t group, int64_t head_dim,
                  const float *keys, int64_t keys_len, const float *values, int64_t values_len,
                  int64_t n_pos, float *scores, int64_t scores_len, float *out, int64_t out_len);
int lme_swiglu(const float *gate, int64_t gate_len, const float *up, int64_t up_len, float *out,
               int64_t out_len);
"""

if sys.platform == "win32":
    COMPILE_ARGS = ["/O2"]
else:
    COMPILE_ARGS = ["-O3", "-std=gnu11", "-ffp-contract=off", "-fvisibility=hidden"]



def make_builder(root=""):
    """The cffi builder; paths below `root` (setuptools wants them relative to the project root)."""
    csrc = os.path.join(root, "kernels", "csrc")
    builder = cffi.FFI()
    builder.cdef(CDEF)
    builder.set_source(
        "kernels._native",
        '#include "qdot.h"',
        sources=[os.path.join(csrc, "qdot.c"), os.path.join(csrc, "packed.c"),
                 os.path.join(csrc, "attention.c"),
                 os.path.join(csrc, "ops.c")],
        include_dirs=[csrc],
        depends=[os.path.join(csrc, "qdot.h"), os.path.join(csrc, "common.h")],
        extra_compile_args=COMPILE_ARGS,
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
