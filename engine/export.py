"""`lmengine convert MODEL DIR --to onnx`: a GGUF model -> an ONNX export directory that both our
onnxruntime backend and onnxruntime-genai run unchanged.

    DIR/model.onnx (+ model.onnx.data past 2 GiB)   the decoder (converters/onnx_export.py)
    DIR/genai_config.json                           sizes, I/O names, special tokens
    DIR/tokenizer.json, DIR/tokenizer_config.json   the GGUF's tokenizer and chat template (HF format)
"""
from __future__ import annotations

import os
from typing import Callable

from lmengine.converters.gguf_file import GGUFFile
from lmengine.converters.onnx_export import export_onnx

from .config import TransformerConfig, config_from_gguf
from .errors import ConversionError
from .models.registry import resolve_model


def export_onnx_model(model: str | os.PathLike | None, out_dir: str | os.PathLike, weights: str = "f32",
                      use_contrib_ops: bool = True, accuracy_level: int = 0, max_positions: int | None = None,
                      progress: Callable[[str], None] | None = None) -> str:
    """Export `model` (a .gguf path or a bundled name such as "smollm2") to `out_dir`.

    weights: "f32" or "int4" (4-bit MatMulNBits blocks carried over from Q4_0/Q4_1/Q4_K blocks).
    use_contrib_ops: onnxruntime's fused RotaryEmbedding / RMSNorm / GroupQueryAttention (faster)
        instead of standard ONNX ops. accuracy_level: MatMulNBits activation precision for 4-bit
        blocks (0: float32, the GGUF's exact numbers; 4: int8 activations, faster, llama.cpp-like).
    Returns the path of model.onnx."""
    path = resolve_model(model)
    if os.path.isdir(path) or not path.endswith(".gguf"):
        raise ConversionError(f"{path}: ONNX export reads a GGUF file (a .gguf path or a bundled model name)")
    out_dir = os.fspath(out_dir)
    f = GGUFFile(path)
    try:
        config = config_from_gguf(f)
        if not isinstance(config, TransformerConfig) and getattr(config, "arch", None) != "gpt2":
            raise ConversionError(f"{path}: architecture {getattr(config, 'arch', '?')!r} has no ONNX decoder export "
                                  f"(supported: llama, qwen2, qwen3, gpt2)")
        tokenizer = None
        if "tokenizer.ggml.tokens" in f.metadata:   # built first: a bad vocabulary fails before anything is written
            from .tokenizer import Tokenizer
            tokenizer = Tokenizer.from_gguf(f)
        model_path = export_onnx(f, config, out_dir, weights=weights, use_contrib_ops=use_contrib_ops,
                                 accuracy_level=accuracy_level, max_positions=max_positions, progress=progress)
        if tokenizer is not None:
            tokenizer.save_pretrained(out_dir)
            if progress is not None:
                progress(f"wrote the tokenizer to {out_dir}")
    finally:
        f.close()
    return model_path
