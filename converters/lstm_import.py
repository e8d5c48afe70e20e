"""`lmengine convert` for LSTM language models: picks the Keras or the PyTorch importer by the
source file's suffix. Both write the layout that lstm_gguf.py defines."""
from __future__ import annotations

import os
from typing import Callable

from .errors import ConversionError
from .lstm_gguf import print_progress

KERAS_SUFFIXES = (".keras", ".h5", ".hdf5")
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


def is_lstm_source(path) -> bool:
    """Whether `lmengine convert` should hand this file to the LSTM converters."""
    return os.fspath(path).lower().endswith(KERAS_SUFFIXES + TORCH_SUFFIXES)


def convert_lstm_model(src, dst, vocab=None, description=None, out_type: str = "F32", name: str = "",
                       progress: Callable | None = print_progress) -> dict:
    """Convert a Keras file (.keras, .h5, .weights.h5) or a PyTorch state_dict (.pt, .pth, .bin, .ckpt)
    of an LSTM language model to GGUF `dst`. See converters/keras_lstm.py and converters/torch_lstm.py."""
    path = os.fspath(src)
    if path.lower().endswith(KERAS_SUFFIXES):
        from .keras_lstm import convert_keras
        return convert_keras(path, dst, vocab, description, out_type, name, progress)
    if path.lower().endswith(TORCH_SUFFIXES):
        from .torch_lstm import convert_torch_lstm
        return convert_torch_lstm(path, dst, vocab, description, out_type, name, progress)
    raise ConversionError(f"{path}: not a Keras (.keras, .h5) or PyTorch (.pt, .pth, .bin, .ckpt) LSTM model file")
