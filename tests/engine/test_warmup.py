"""The compiled-code cache: content fingerprints, the portable target, compile progress, warmup,
and baking a cache into a wheel (kernels/jit_cache.py, engine/warmup.py). The whole wheel route
(build, warm up for x86-64-v3, bake, install elsewhere, start without compiling) runs in
.ci/wheel; these tests check each piece on its own."""
from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import os
import zipfile

import pytest
from numba import njit

import lmengine
from lmengine import warmup as warmup_mod
from lmengine.errors import InvalidParameterError
from lmengine.kernels import jit_cache


# -- fingerprints: contents, not timestamps ------------------------------------------------------------

def _tree(tmp_path):
    src = tmp_path / "kernels"
    (src / "__pycache__").mkdir(parents=True)
    (src / "a.py").write_text("x = 1\n")
    (src / "__pycache__" / "a.f-1.py311.nbi").write_bytes(b"index")
    return src


def test_purge_ignores_timestamps_and_follows_contents(tmp_path):
    src = _tree(tmp_path)
    assert jit_cache.purge_stale_cache([str(src)])                 # first sight: stamped (and purged)
    (src / "__pycache__" / "a.f-1.py311.nbi").write_bytes(b"index")
    (src / "__pycache__" / jit_cache.TARGET_FILE).write_text("{}")
    os.utime(src / "a.py", (1, 1))                                  # a reinstall: new mtime, same bytes
    assert not jit_cache.purge_stale_cache([str(src)])
    assert (src / "__pycache__" / "a.f-1.py311.nbi").exists()
    (src / "a.py").write_text("x = 2\n")                            # new contents: the cache goes
    assert jit_cache.purge_stale_cache([str(src)])
    assert not (src / "__pycache__" / "a.f-1.py311.nbi").exists()
    assert not (src / "__pycache__" / jit_cache.TARGET_FILE).exists()   # and its target record


def test_the_package_is_stamped_with_its_fingerprint():
    stamp = os.path.join(lmengine.COMPILED_SOURCE_DIRS[0], "__pycache__", jit_cache.FINGERPRINT_FILE)
    with open(stamp, encoding="ascii") as fh:
        assert fh.read().strip() == jit_cache.fingerprint(list(lmengine.COMPILED_SOURCE_DIRS))


# -- the portable target ---------------------------------------------------------------------------------

def test_no_target_switch_once_numba_has_compiled(tmp_path):
    """After this process compiled something, its code generator is fixed: switching the name
    would label host code as portable. Both entry points refuse, and change nothing."""
    import numba
    njit(lambda x: x + 1)(1)
    before = (numba.config.CPU_NAME, numba.config.CPU_FEATURES)
    assert not jit_cache.set_portable_target()
    src = _tree(tmp_path)
    info = {"cpu_name": jit_cache.PORTABLE_CPU, "numba": numba.__version__, "python": "3.0"}
    (src / "__pycache__" / jit_cache.TARGET_FILE).write_text(json.dumps(info))
    assert not jit_cache.use_baked_target(str(src))           # wrong Python, and compiled already
    assert not jit_cache.use_baked_target(str(tmp_path / "missing"))
    assert (numba.config.CPU_NAME, numba.config.CPU_FEATURES) == before


def test_portable_level_is_a_subset_of_the_host_where_claimed():
    import llvmlite.binding as ll
    features = ll.get_host_cpu_features()
    assert jit_cache.host_supports_portable_target() == all(features.get(f, False)
                                                            for f in jit_cache.PORTABLE_FEATURES)


# -- progress --------------------------------------------------------------------------------------------

def test_compile_progress_counts_compiles_and_is_silent_when_warm():
    def add(a, b):
        return a + b
    fresh = njit(add)                          # not cached: compiles in this process
    out = io.StringIO()
    with jit_cache.CompileProgress(stream=out, interval=0.0) as progress:
        assert fresh(1, 2) == 3
        assert fresh(1.0, 2.0) == 3.0
    assert progress.n_compiled >= 2
    assert "functions compiled in" in out.getvalue()
    quiet = io.StringIO()
    with jit_cache.CompileProgress(stream=quiet, interval=0.0) as progress:
        assert fresh(3, 4) == 7                # already compiled for ints
    assert progress.n_compiled == 0 and quiet.getvalue() == ""


# -- warmup ----------------------------------------------------------------------------------------------

def test_tiny_warmup_model_runs(tmp_path):
    path = str(tmp_path / "tiny.gguf")
    warmup_mod.write_tiny_llama(path)
    with lmengine.LLM(path, n_ctx=64) as llm:
        warmup_mod._exercise(llm)
        assert llm.config.n_layers == 2 and llm.vocab_size == 288


def test_warmup_portable_refused_in_a_process_that_compiled():
    njit(lambda: 1)()
    with pytest.raises(InvalidParameterError, match="x86-64-v3"):
        warmup_mod.warmup(portable=True, progress=False)


# -- baking into a wheel ---------------------------------------------------------------------------------

def _wheel_of_this_package(path) -> str:
    """A minimal wheel holding the compiled sources as installed here, with a RECORD."""
    root = os.path.dirname(os.path.abspath(lmengine.__file__))
    rows = []
    with zipfile.ZipFile(path, "w") as z:
        for d in lmengine.COMPILED_SOURCE_DIRS:
            for src in jit_cache._source_files([d]):
                name = "lmengine/" + os.path.relpath(src, root).replace(os.sep, "/")
                data = open(src, "rb").read()
                z.writestr(name, data)
                rows.append(name)
        z.writestr("lmengine-0.1.0.dist-info/METADATA", "Name: lmengine\n")
        rows.append("lmengine-0.1.0.dist-info/METADATA")
        z.writestr("lmengine-0.1.0.dist-info/RECORD", "\n".join(f"{r},," for r in rows) + "\n")
    return str(path)


def _check_record(wheel) -> dict:
    """Every file but RECORD is listed with its sha256 and size, as pip checks them."""
    with zipfile.ZipFile(wheel) as z:
        names = [n for n in z.namelist() if not n.endswith("RECORD")]
        record = next(n for n in z.namelist() if n.endswith("RECORD"))
        rows = {r[0]: r for r in csv.reader(io.StringIO(z.read(record).decode())) if r}
        assert set(names) <= set(rows), set(names) - set(rows)
        for name, (_, digest, size) in ((n, rows[n]) for n in names if rows[n][1]):
            data = z.read(name)
            assert digest == "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            assert int(size) == len(data)
        return {n: z.read(n) for n in names}


def test_bake_wheel_adds_the_cache_with_a_valid_record(tmp_path, monkeypatch):
    wheel = _wheel_of_this_package(tmp_path / "lmengine-0.1.0-py3-none-any.whl")
    cache = tmp_path / "cache"
    cache.mkdir()
    fake = {"lmengine/kernels/__pycache__/matmul.matmul-1.py311.nbi": b"index bytes",
            "lmengine/kernels/__pycache__/matmul.matmul-1.py311.1.nbc": bytes(range(256)) * 4,
            f"lmengine/kernels/__pycache__/{jit_cache.TARGET_FILE}": b'{"cpu_name": "x86-64-v3"}'}
    files = {}
    for name, data in fake.items():
        path = cache / name.replace("/", "_")
        path.write_bytes(data)
        files[name] = str(path)
    monkeypatch.setattr(warmup_mod, "cache_files", lambda: files)
    assert warmup_mod.bake_wheel(wheel) == 3
    contents = _check_record(wheel)
    for name, data in fake.items():
        assert contents[name] == data
    assert warmup_mod.bake_wheel(wheel) == 3          # baking again replaces, never duplicates
    with zipfile.ZipFile(wheel) as z:
        assert len(z.namelist()) == len(set(z.namelist()))
    _check_record(wheel)


def test_bake_wheel_refuses_other_sources_and_a_missing_portable_cache(tmp_path, monkeypatch):
    wheel = _wheel_of_this_package(tmp_path / "w.whl")
    monkeypatch.setattr(warmup_mod, "cache_files", lambda: {})
    with pytest.raises(InvalidParameterError, match="warmup --portable"):
        warmup_mod.bake_wheel(wheel)
    target = tmp_path / "target.json"
    target.write_text("{}")
    monkeypatch.setattr(warmup_mod, "cache_files",
                        lambda: {f"lmengine/kernels/__pycache__/{jit_cache.TARGET_FILE}": str(target)})
    other = tmp_path / "other.whl"
    with zipfile.ZipFile(wheel) as zin, zipfile.ZipFile(other, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            zout.writestr(info, data + b"# changed\n" if info.filename.endswith("kernels/matmul.py") else data)
    before = other.read_bytes()
    with pytest.raises(InvalidParameterError, match="matmul.py differs"):
        warmup_mod.bake_wheel(str(other))
    assert other.read_bytes() == before                # refused: the wheel is left as it was
