"""Models by Hugging Face Hub id: `LLM.from_pretrained(repo_id, filename=glob)` and the model name
`hf:REPO_ID[:GLOB]` (CLI `--model hf:...`).

The download, cache, revisions, token and offline mode are huggingface_hub's own (an optional
dependency: `pip install "lmengine[hub]"`): `snapshot_download` fetches only the files that
match the glob into the usual hub cache (~/.cache/huggingface/hub, or HF_HUB_CACHE), shows its
progress bar, and with HF_HUB_OFFLINE=1 (or no network) answers from the cache alone. Exactly one
file must match: a repository usually holds one GGUF per quantization type, so a glob like
"*Q4_K_M.gguf" picks one.
"""
from __future__ import annotations

import fnmatch
import os

from ..errors import InvalidParameterError, ModelNotFoundError

HUB_PREFIX = "hf:"
DEFAULT_GLOB = "*.gguf"


def parse_hub_name(name: str) -> tuple[str, str]:
    """'hf:owner/repo[:glob]' -> (repo_id, glob)."""
    rest = name[len(HUB_PREFIX):]
    repo_id, _, glob = rest.partition(":")
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise InvalidParameterError(f"{name!r}: a hub model is hf:OWNER/REPO or hf:OWNER/REPO:GLOB "
                                    f"(e.g. hf:bartowski/SmolLM2-135M-Instruct-GGUF:*Q4_K_M.gguf)")
    return repo_id, glob or DEFAULT_GLOB


def hub_model_path(repo_id: str, filename: str = DEFAULT_GLOB, revision: str | None = None,
                   token: str | bool | None = None, cache_dir: str | os.PathLike | None = None) -> str:
    """The local path of the one file of `repo_id` (at `revision`) whose path matches the glob
    `filename`, downloaded into the hub cache if it is not there yet."""
    for field, value in (("repo_id", repo_id), ("filename", filename)):
        if not isinstance(value, str) or not value:
            raise InvalidParameterError(f"{field} must be a non-empty string, got {value!r}")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError:
        raise ModelNotFoundError(f"hf:{repo_id}: loading by hub id needs huggingface_hub: "
                                 f'pip install "lmengine[hub]"') from None
    where = f"hf:{repo_id}" + (f"@{revision}" if revision else "")
    try:
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=[filename], token=token,
                                   cache_dir=cache_dir)
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as e:
        raise ModelNotFoundError(f"{where}: no file matching {filename!r} could be found or downloaded "
                                 f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
    matches = sorted(path for path in _files_under(folder) if fnmatch.fnmatch(path, filename))
    if not matches:
        raise ModelNotFoundError(f"{where}: no file matches {filename!r}")
    if len(matches) > 1:
        listed = ", ".join(matches[:8]) + (", ..." if len(matches) > 8 else "")
        raise ModelNotFoundError(f"{where}: {len(matches)} files match {filename!r} ({listed}); "
                                 f"give a glob that matches one")
    return os.path.join(folder, matches[0])


def _files_under(folder: str) -> list[str]:
    """Paths of the files under folder, relative to it, with '/' separators."""
    out = []
    for root, _, files in os.walk(folder):
        for name in files:
            out.append(os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/"))
    return out
