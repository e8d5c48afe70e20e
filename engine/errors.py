"""Every error a user can cause, as one exception family.

All exceptions derive from `LMEngineError`, so `except LMEngineError` catches anything the engine
raises on purpose. Where a built-in exception is the natural type (a bad value is a `ValueError`,
a missing file a `FileNotFoundError`), the engine's class inherits from both, so existing
`except ValueError` code keeps working.

Messages say what was wrong and where: the file, the field or tensor name, and the numbers.

`converters` and `kernels` never import `engine`; converters raise their own `lmengine.converters.errors`
classes, which are the *same* classes re-exported here (see `converters/errors.py`), so a user
sees one family whichever layer noticed the problem.
"""
from lmengine.converters.errors import (  # noqa: F401  (re-exported: the one family of exceptions)
    LMEngineError,
    ModelFileError,
    TruncatedFileError,
    BadMagicError,
    UnsupportedVersionError,
    UnsupportedQuantTypeError,
    UnsupportedArchitectureError,
    TensorShapeError,
    CorruptTensorError,
    MetadataError,
    ConversionError,
    QuantizeError,
    UnknownFileTypeError,
    RequantizeError,
    DestinationExistsError,
    DiskFullError,
)


class ModelNotFoundError(LMEngineError, FileNotFoundError):
    """A model path or bundled model name that does not resolve to a file."""


class ContextLengthError(LMEngineError, ValueError):
    """A prompt (plus requested tokens) longer than the context window `n_ctx`."""


class InvalidParameterError(LMEngineError, ValueError):
    """An invalid argument (sampling parameter, thread count, backend name...)."""


class TokenIdError(InvalidParameterError):
    """Something given as a token id that is not one: not an integer (booleans included), or
    outside `[0, vocab_size)`. Raised by `lmengine.validation.check_token_ids`, wherever ids enter;
    an invalid argument like any other, so `except InvalidParameterError` catches it too."""


class BackendError(LMEngineError, RuntimeError):
    """A backend that cannot run: missing execution provider, model directory without config..."""


class TokenizerError(LMEngineError, ValueError):
    """A tokenizer that cannot be built from the file's metadata, or text it cannot encode."""


class ChatTemplateError(LMEngineError, ValueError):
    """A chat template that fails to render, or messages it cannot take."""


class NonFiniteLogitsError(LMEngineError, ArithmeticError):
    """The model produced NaN or infinite logits for a request (a corrupt weight or an overflow):
    that request ends with this error instead of sampling from garbage; others go on."""


class LLMClosedError(LMEngineError, RuntimeError):
    """A call on an `LLM` after `close()` (or after its `with` block), or a request that was still
    waiting or running when the LLM was closed."""


class BatchFileError(LMEngineError, ValueError):
    """A batch job's INPUT or OUTPUT file that cannot be used as a whole (`lmengine batch`): an
    unknown format, an OUTPUT written for another INPUT, a corrupt line in the middle of OUTPUT.
    A problem of one row is an error row of the output instead."""


class LMEngineWarning(UserWarning):
    """Something accepted but probably not what the caller meant (e.g. more threads than cores)."""
