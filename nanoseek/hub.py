"""Models by name: every `--model` / `--teacher` / `--student` and `nanoseek.load` take a local directory or a
Hugging Face Hub id (`deepseek-ai/DeepSeek-V2-Lite`), as transformers, vLLM and TRL users expect.

A Hub id goes through `huggingface_hub.snapshot_download`: the shared Hugging Face cache (`HF_HOME` /
`HF_HUB_CACHE`), `--revision` (a branch, tag or commit), its own progress bars, `HF_TOKEN` for gated or private
repositories, and `HF_HUB_OFFLINE=1` to use only what is cached. Only what nanoseek reads is downloaded: configs,
safetensors, tokenizer files and chat templates (DeepSeek's Janus repositories ship `.bin` weights: those are
fetched only when a repository has no safetensors).
"""

from __future__ import annotations

import re
from pathlib import Path

# what nanoseek reads from a model repository (no *.py: nanoseek never runs a repository's code)
ALLOW_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.jinja", "*.txt"]
BIN_PATTERNS = ["*.bin", "*.bin.index.json"]
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")


def is_hub_id(name: str) -> bool:
    """`owner/name`, as the Hub spells repository ids (a path like `runs/x` that does not exist looks like one too:
    the error then names both readings)."""
    return bool(_HUB_ID.fullmatch(name)) and ".." not in name and not name.endswith((".", "-"))


def resolve_model_dir(name: str | Path, revision: str | None = None, *, flag: str = "--model",
                      weights: bool = True) -> Path:
    """The local directory of a model: `name` itself when it is a directory, else the Hub snapshot of that id
    (downloaded once into the cache, then read from it). `weights=False` fetches the configs only (what
    `nanoseek params` and `cost` read). Raises ValueError naming the fix."""
    path = Path(name).expanduser()
    if path.is_dir():
        if revision is not None:
            raise ValueError(f"{flag} {name} is a local directory: --revision applies to Hub ids only")
        return path
    if path.exists():
        raise ValueError(f"{flag} {name} is a file: pass the model's directory (config.json + weights)")
    if not is_hub_id(str(name)):
        raise ValueError(f"{flag} {name}: no such directory, and not a Hub id (owner/name, e.g. "
                         "deepseek-ai/DeepSeek-V2-Lite)")
    return _snapshot(str(name), revision, flag, weights)


def _snapshot(repo_id: str, revision: str | None, flag: str, weights: bool) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    at = f"{repo_id}{f'@{revision}' if revision else ''}"
    try:
        if not weights:
            return Path(snapshot_download(repo_id, revision=revision, allow_patterns=["*.json"]))
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=ALLOW_PATTERNS))
        if not any(folder.glob("*.safetensors")) and not (folder / "model.safetensors.index.json").exists():
            folder = Path(snapshot_download(repo_id, revision=revision,
                                            allow_patterns=ALLOW_PATTERNS + BIN_PATTERNS))
    except GatedRepoError as e:  # before RepositoryNotFoundError: it is one
        raise ValueError(f"{flag} {at}: the repository is gated: accept its terms on the Hub, then log in "
                         "(`hf auth login`) or set HF_TOKEN") from e
    except RepositoryNotFoundError as e:
        raise ValueError(f"{flag} {repo_id}: no such directory, and no such model on the Hugging Face Hub (a "
                         "private one needs `hf auth login` or HF_TOKEN)") from e
    except RevisionNotFoundError as e:
        raise ValueError(f"{flag} {repo_id}: the Hub has no revision {revision!r} (a branch, tag or commit)") from e
    except LocalEntryNotFoundError as e:
        raise ValueError(f"{flag} {at} is not in the local Hugging Face cache and the Hub cannot be reached "
                         "(offline, HF_HUB_OFFLINE=1, or a network error): download it once where the Hub is "
                         f"reachable (`hf download {repo_id}`), point HF_HUB_CACHE at a cache that has it, or "
                         "pass a local directory") from e
    except HfHubHTTPError as e:
        raise ValueError(f"{flag} {at}: the Hub answered {e}") from e
    return folder
