"""`lmengine convert`: pick the converter for a source and a target format.

    HF decoder directory            -> GGUF   (converters/hf.py; bert/gpt2: converters/hf_encoder.py)
    ... with --weights Q4_K_M etc.  -> an F32 GGUF beside DEST, then `lmengine quantize` into DEST
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
        from lmengine.converters import hf_encoder
        if os.path.isdir(source) and hf_encoder.is_encoder_source(source):   # bert / sentence-transformers / gpt2
            _convert_hf_dir(hf_encoder.convert_encoder, source, dest, weights, hf_encoder.WEIGHT_TYPES, progress)
            return dest
        if os.path.isdir(source) and os.path.exists(os.path.join(source, "config.json")):
            from lmengine.converters import hf
            _convert_hf_dir(hf.convert_hf, source, dest, weights, hf.WEIGHT_TYPES, progress)
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


def _convert_hf_dir(convert_fn: Callable, source: str, dest: str, weights: str | None,
                    direct: tuple, progress: Callable[[str], None] | None) -> None:
    """Convert a Hugging Face directory with convert_fn. Weight types the converter writes itself
    (`direct`) go straight to DEST; any other `lmengine quantize` type (Q4_K_M, Q6_K, IQ4_XS, ...)
    is written as an F32 GGUF beside DEST first (no rounding before the quantizer sees the
    values), quantized into DEST with llama.cpp's per-tensor mix, and the F32 file removed, also
    when a step fails. DEST appears only once complete (the quantizer writes a temporary file and
    renames it)."""
    weights = weights or "f32"
    if weights.lower() in direct:
        convert_fn(source, dest, weights.lower(), progress)
        return
    from lmengine.converters.quantize import file_type, quantize_gguf
    ft = file_type(weights)             # an unknown type fails here, before anything is read
    if os.path.exists(dest):
        from lmengine.converters.errors import DestinationExistsError
        raise DestinationExistsError(f"{dest} already exists; remove it first")
    staging = f"{dest}.f32-staging.gguf"
    try:
        convert_fn(source, staging, "f32", progress)
        last = [0.0]

        def report(p) -> None:          # one line a tensor, or every ~2 s inside a large one
            if progress is not None and (p.tensor_done or p.elapsed_s - last[0] >= 2.0):
                last[0] = p.elapsed_s
                progress(f"quantize {ft.name}: {p}")
        quantize_gguf(staging, dest, ft.name, progress=report,
                      warn=(lambda msg: progress(f"warning: {msg}")) if progress else None)
    finally:
        if os.path.exists(staging):
            os.remove(staging)
