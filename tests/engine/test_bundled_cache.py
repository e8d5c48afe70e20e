"""The bundled encoder's cached GGUF (engine/models/bundled_encoder.py) is named by the zip's
contents: a reinstall of the same package (a new modification time) finds the same file, a changed
zip gets another, and the files of the older size-and-mtime naming are removed."""
from __future__ import annotations

import os
import shutil
import zipfile

import pytest

from lmengine.converters.gguf_file import GGUFFile
from lmengine.models import bundled_encoder


@pytest.fixture
def installed_zip(tmp_path, monkeypatch):
    """A copy of the installed package's zip that the test may touch, and an empty cache."""
    try:
        original = bundled_encoder.bundled_zip("minilm")
    except Exception as e:     # ModelNotFoundError: the package is not installed
        pytest.fail(f"the bundled encoder package is needed: {e}")
    copy = tmp_path / "model.zip"
    shutil.copy(original, copy)
    monkeypatch.setattr(bundled_encoder, "bundled_zip", lambda name: str(copy))
    monkeypatch.setenv("LMENGINE_CACHE", str(tmp_path / "cache"))
    return copy


def test_cache_named_by_contents_survives_reinstall(installed_zip, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    legacy = [cache / "minilm-90000000-1700000000.f32.gguf", cache / "minilm-1-2.f32.gguf"]
    for path in legacy:
        path.write_bytes(b"old")
    kept = cache / "other-1-2.f32.gguf"          # another model's file is not ours to remove
    kept.write_bytes(b"x")

    first = bundled_encoder.bundled_encoder_path("minilm")
    assert os.path.basename(first) == f"minilm-{bundled_encoder.zip_digest(str(installed_zip))}.f32.gguf"
    assert GGUFFile(first).metadata["general.architecture"] == "bert"
    assert not any(p.exists() for p in legacy) and kept.exists()

    stamp = os.stat(first).st_mtime_ns
    os.utime(installed_zip, (1, 1))              # a reinstall: same bytes, another mtime
    assert bundled_encoder.bundled_encoder_path("minilm") == first
    assert os.stat(first).st_mtime_ns == stamp   # not converted again


def test_changed_zip_gets_another_name(installed_zip, tmp_path):
    before = bundled_encoder.zip_digest(str(installed_zip))
    with zipfile.ZipFile(installed_zip, "a") as z:
        z.writestr("extra.txt", "a changed package")
    assert bundled_encoder.zip_digest(str(installed_zip)) != before
