"""`lmengine convert`: pick the converter for a source and a target format.

    HF llama/qwen2 directory        -> GGUF   (converters/hf.py)
    Keras .keras/.h5, PyTorch .pt   -> GGUF   (LSTM language models; converters/lstm_gguf.py)
    GGUF file or bundled name       -> ONNX   (converters/onnx_export.py, onnx_lstm.py)
"""
from __future__ import annotations

import os
from typing import Callable

from .errors import InvalidParameterError


def convert(source: str, dest: str, to: str | None = None, weights: str | None = None,
            description: str | None = None, vocab: str | None = None,
            progress: Callable[[str], None] | None = None, accuracy_level: int = 0) -> str:
    from lmengine.converters.lstm_import import convert_lstm_model, is_lstm_source

    if to is None:
        to = "gguf" if str(dest).endswith(".gguf") else "onnx"
    if to not in ("gguf", "onnx"):
        raise InvalidParameterError(f"--to must be gguf or onnx, got {to!r}")

    if to == "gguf":
        from lmengine.converters.hf_encoder import convert_encoder, is_encoder_source
        if os.path.isdir(source) and is_encoder_source(source):   # bert / sentence-transformers / gpt2
            convert_encoder(source, dest, weights or "f32", progress)
            return dest
        if os.path.isdir(source) and os.path.exists(os.path.join(source, "config.json")):
            from lmengine.converters.hf import convert_hf
            convert_hf(source, dest, weights or "f32", progress)
            return dest
        if is_lstm_source(source):
            convert_lstm_model(source, dest, vocab=vocab, description=description,
                               out_type=(weights or "f32").upper(), progress=progress)
            return dest
        raise InvalidParameterError(
            f"don't know how to convert {source!r} to GGUF: give a Hugging Face model directory "
            f"(config.json + weights), a Keras .keras/.h5 file or a PyTorch LSTM state_dict (.pt)")

    # to ONNX: the source is anything LLM() loads from GGUF
    from lmengine.converters.gguf_file import GGUFFile

    from .models.registry import resolve_model
    path = resolve_model(source)
    if GGUFFile(path).get("general.architecture") == "lstm":
        from lmengine.converters.onnx_lstm import export_lstm_onnx
        if weights not in (None, "f32"):
            raise InvalidParameterError("LSTM models export to ONNX with float32 weights only (--weights f32)")
        return export_lstm_onnx(path, dest, progress=progress)
    from .export import export_onnx_model
    return export_onnx_model(path, dest, weights=weights or "f32", accuracy_level=accuracy_level,
                             progress=progress)
