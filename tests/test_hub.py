"""Models by name (nanoseek/hub.py): a Hub id loads the same model as its directory, from a pre-filled Hugging Face
cache with the Hub offline (no network in tests); errors name the fix."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanoseek import load
from nanoseek.hub import is_hub_id, resolve_model_dir
from nanoseek.tokenizer import Tokenizer

from .hf_ref import make_tiny_model_dir

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fill_cache(cache: Path, repo_id: str, src: Path, revision: str = "main", commit: str = COMMIT) -> Path:
    """The Hugging Face cache layout (models--owner--name/{refs,snapshots}) as `hf download` leaves it."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / commit
    shutil.copytree(src, snap)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    return snap


@pytest.fixture
def offline_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    import huggingface_hub.constants as c

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def test_hub_ids_are_told_from_paths() -> None:
    assert is_hub_id("deepseek-ai/DeepSeek-V2-Lite") and is_hub_id("deepseek-community/Janus-Pro-1B")
    assert not is_hub_id("./runs/x") and not is_hub_id("/abs/path") and not is_hub_id("a/b/c")
    assert not is_hub_id("model") and not is_hub_id("../x")


def test_a_hub_id_loads_the_same_model_as_its_directory(tmp_path: Path, offline_cache: Path) -> None:
    src = make_tiny_model_dir(tmp_path)
    snap = fill_cache(offline_cache, "nanoseek-test/tiny", src)
    assert resolve_model_dir("nanoseek-test/tiny") == snap
    a, b = load(src, device="cpu"), load("nanoseek-test/tiny", device="cpu")
    assert a.config == b.config
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert load("nanoseek-test/tiny", device="cpu", revision=COMMIT).config == a.config  # a commit as revision
    if (src / "tokenizer.json").exists():
        assert Tokenizer.load("nanoseek-test/tiny").vocab_size == Tokenizer.load(src).vocab_size


def test_errors_name_the_fix(tmp_path: Path, offline_cache: Path) -> None:
    with pytest.raises(ValueError, match=r"not in the local Hugging Face cache .*`hf download owner/missing`"):
        resolve_model_dir("owner/missing")
    with pytest.raises(ValueError, match="no such directory, and not a Hub id"):
        resolve_model_dir("./not/here/at/all")
    (tmp_path / "f.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="is a file: pass the model's directory"):
        resolve_model_dir(tmp_path / "f.bin")
    with pytest.raises(ValueError, match="--revision applies to Hub ids only"):
        resolve_model_dir(tmp_path, revision="v1")
    fill_cache(offline_cache, "nanoseek-test/tiny", make_tiny_model_dir(tmp_path))
    with pytest.raises(ValueError, match="not in the local Hugging Face cache"):
        resolve_model_dir("nanoseek-test/tiny", revision="v2")  # a revision the cache does not have


def test_cli_takes_a_hub_id(tmp_path: Path, offline_cache: Path) -> None:
    src = make_tiny_model_dir(tmp_path)
    fill_cache(offline_cache, "nanoseek-test/tiny", src)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(offline_cache)}
    run = [sys.executable, "-m", "nanoseek.cli", "generate", "--prompt-ids", "1,2,3", "--max-tokens", "4",
           "--temperature", "0", "--device", "cpu"]
    by_dir = subprocess.run([*run, "--model", str(src)], capture_output=True, text=True, env=env, timeout=600)
    by_id = subprocess.run([*run, "--model", "nanoseek-test/tiny"], capture_output=True, text=True, env=env,
                           timeout=600)
    assert by_dir.returncode == 0, by_dir.stderr
    assert by_id.returncode == 0 and by_id.stdout == by_dir.stdout, by_id.stderr
    bad = subprocess.run([*run, "--model", "owner/missing"], capture_output=True, text=True, env=env, timeout=600)
    assert bad.returncode == 2 and "hf download owner/missing" in bad.stderr.replace("\n", " ")
