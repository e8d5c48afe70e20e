"""Exceptions for model files and conversions.

They live here because `converters` must not import `engine`; `engine.errors` re-exports them,
so users import everything from `engine.errors`.
"""


class LMEngineError(Exception):
    """Base class of every error lmengine raises on purpose."""


class ModelFileError(LMEngineError, ValueError):
    """A model file that cannot be read: corrupt, truncated, or inconsistent."""


class TruncatedFileError(ModelFileError):
    """A length, offset or tensor that runs past the end of the file."""


class BadMagicError(ModelFileError):
    """The file does not start with the GGUF magic."""


class UnsupportedVersionError(ModelFileError):
    """A GGUF version this reader does not know."""


class UnsupportedQuantTypeError(ModelFileError):
    """A tensor type (quant format) that no kernel implements."""


class UnsupportedArchitectureError(ModelFileError):
    """`general.architecture` names a model family the engine does not run."""


class TensorShapeError(ModelFileError):
    """A tensor whose shape disagrees with the model config, or a missing tensor."""


class MetadataError(ModelFileError):
    """A metadata key that is missing or holds a value of the wrong type."""


class ConversionError(LMEngineError, ValueError):
    """A source model (Keras, PyTorch, HF) that cannot be converted."""
