"""lmengine: a performance-focused LLM inference engine for CPU-only machines.

    from lmengine import LLM, SamplingParams
    llm = LLM("smollm2")
    print(llm.generate("Once upon a time", SamplingParams(temperature=0, max_tokens=32)).text)
"""
import os as _os

from .kernels import jit_cache as _jit_cache

# Compiled code is cached on disk; a cached caller must never keep an old copy of a kernel it
# inlined. The forward passes in models/ and backends/ compile the kernels into themselves, so
# their sources are part of the fingerprint. This runs before anything loads a cached function.
# A cache baked into a wheel (`lmengine warmup --portable`) was compiled for a portable CPU level:
# this process compiles and loads for that level too, so that the cache matches (jit_cache.py).
_here = _os.path.dirname(_os.path.abspath(__file__))
_KERNELS_DIR = _os.path.dirname(_os.path.abspath(_jit_cache.__file__))
COMPILED_SOURCE_DIRS = (_KERNELS_DIR, _os.path.join(_here, "models"), _os.path.join(_here, "backends"))
_jit_cache.purge_stale_cache(list(COMPILED_SOURCE_DIRS))
_jit_cache.choose_target(_KERNELS_DIR)

from .errors import LMEngineError  # noqa: E402
from .generator import Completion, Generator, StreamChunk
from .llm import LLM
from .params import SamplingParams

__all__ = ["LLM", "SamplingParams", "Generator", "Completion", "StreamChunk", "LMEngineError"]
__version__ = "0.1.0"   # kept equal to pyproject.toml's version (tests/integration/test_cli.py checks)
