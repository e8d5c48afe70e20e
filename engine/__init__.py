"""lmengine: a performance-focused LLM inference engine for CPU-only machines.

    from engine import LLM, SamplingParams
    llm = LLM("smollm2")
    print(llm.generate("Once upon a time", SamplingParams(temperature=0, max_tokens=32)).text)
"""
from .errors import LMEngineError
from .generator import Completion, Generator, StreamChunk
from .llm import LLM
from .params import SamplingParams

__all__ = ["LLM", "SamplingParams", "Generator", "Completion", "StreamChunk", "LMEngineError"]
__version__ = "0.1.0"
