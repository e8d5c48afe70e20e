"""Exceptions for model files and conversions.

They live here because `converters` must not import `engine`; `lmengine.errors` re-exports them,
so users import everything from `lmengine.errors`.
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


class CorruptTensorError(ModelFileError):
    """A tensor whose blocks hold values no model has: NaN or inf scales."""


class MetadataError(ModelFileError):
    """A metadata key that is missing or holds a value of the wrong type."""


class ConversionError(LMEngineError, ValueError):
    """A source model (Keras, PyTorch, HF) that cannot be converted."""


class QuantizeError(ConversionError):
    """`lmengine quantize` cannot do what was asked."""


class UnknownFileTypeError(QuantizeError):
    """An output type name `lmengine quantize` does not write."""


class RequantizeError(QuantizeError):
    """A source tensor in a lossy (block) type would be quantized again without allow_requantize."""


class DestinationExistsError(QuantizeError):
    """DST exists and force was not given."""


class DiskFullError(QuantizeError):
    """The destination's file system has no room for the output."""
