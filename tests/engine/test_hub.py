"""Models by Hugging Face Hub id, offline: the test builds a hub cache in huggingface_hub's own
layout (models--OWNER--REPO/refs/main -> snapshots/<commit>/files) in a temporary folder and
turns the network off, so `snapshot_download` answers from the cache as it does for a user whose
file is already downloaded. The model file is the bundled SmolLM2 (linked, not copied)."""
import subprocess
import sys

import pytest

pytest.importorskip("huggingface_hub")
from huggingface_hub import constants as hub_constants  # noqa: E402

from lmengine import LLM  # noqa: E402
from lmengine.errors import InvalidParameterError, ModelNotFoundError  # noqa: E402
from lmengine.models.hub import hub_model_path, parse_hub_name  # noqa: E402

REPO = "lmengine-test/SmolLM2-GGUF"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
FILES = ["SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct.Q8_0.gguf", "README.md"]


@pytest.fixture
def hub_cache(tmp_path, monkeypatch, smollm2_path):
    """A hub cache holding REPO at COMMIT (the ref "main"), with the network disabled."""
    repo_dir = tmp_path / ("models--" + REPO.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(COMMIT)
    for name in FILES:
        if name.endswith(".gguf"):
            (snapshot / name).symlink_to(smollm2_path)
        else:
            (snapshot / name).write_text("# a model card\n")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    return tmp_path, snapshot


def test_one_match_resolves_to_the_cached_file(hub_cache):
    _, snapshot = hub_cache
    assert hub_model_path(REPO, "*Q4_1.gguf") == str(snapshot / FILES[0])


def test_from_pretrained_loads_and_generates(hub_cache, smollm2_path):
    with LLM.from_pretrained(REPO, "*Q4_1.gguf", n_ctx=64, warmup=False) as llm, \
            LLM(smollm2_path, n_ctx=64, warmup=False) as direct:
        assert llm.generate("Hi", max_tokens=4, temperature=0).token_ids == \
            direct.generate("Hi", max_tokens=4, temperature=0).token_ids


def test_errors_name_the_repo_and_the_glob(hub_cache):
    with pytest.raises(ModelNotFoundError, match=r"2 files match '\*\.gguf'.*Q4_1.*Q8_0"):
        hub_model_path(REPO, "*.gguf")
    with pytest.raises(ModelNotFoundError, match=r"hf:lmengine-test/SmolLM2-GGUF: no file matches '\*Q6_K\.gguf'"):
        hub_model_path(REPO, "*Q6_K.gguf")
    with pytest.raises(ModelNotFoundError, match="hf:someone/absent"):
        hub_model_path("someone/absent", "*.gguf")
    with pytest.raises(ModelNotFoundError, match="@v9"):
        hub_model_path(REPO, "*Q4_1.gguf", revision="v9")
    with pytest.raises(InvalidParameterError, match="hf:OWNER/REPO"):
        parse_hub_name("hf:no-slash")


def test_cli_model_by_hub_id(hub_cache):
    proc = subprocess.run([sys.executable, "-m", "lmengine", "generate", "Hi", "--model", f"hf:{REPO}:*Q4_1.gguf",
                           "--max-tokens", "3", "--temperature", "0", "--n-ctx", "64"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Hi")
