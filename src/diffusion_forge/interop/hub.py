"""Share an exported folder on the Hugging Face hub: ``push_folder(folder, repo)`` = create_repo + upload_folder.

The token is HF_TOKEN, else the login cache of ``huggingface-cli login`` (huggingface_hub finds both). Offline
(HF_HUB_OFFLINE) or without a connection it fails fast with one clear line; the upload is one commit, so the
repository never holds half a model.
"""
from __future__ import annotations

from pathlib import Path

__all__ = ["push_folder", "check_folder"]


def check_folder(folder) -> Path:
    """An exported diffusers folder: a model card and model_index.json or unet/ + scheduler/."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"no folder at {folder}; export a run first: dforge export RUN --out {folder}")
    if not ((folder / "model_index.json").is_file() or (folder / "unet" / "config.json").is_file()):
        raise ValueError(f"{folder} is not a diffusers folder (no model_index.json nor unet/); write one with "
                         "dforge export RUN --out DIR")
    if not (folder / "README.md").is_file():
        raise ValueError(f"{folder} has no model card README.md; write the folder with dforge export")
    return folder


def push_folder(folder, repo: str, private: bool = False, token: str | None = None, api=None,
                message: str = "Upload diffusion model exported by Diffusion Forge") -> str:
    """Create ``repo`` (user/name; kept if it exists) and upload ``folder`` in one commit; returns the repo's URL.
    ``api``: an ``HfApi`` (tests pass a stand-in)."""
    import os

    from .pipelines import HUB_ID, hub_error, is_offline

    folder = check_folder(folder)
    if not HUB_ID.match(repo):
        raise ValueError(f"--repo must be a hub repository id user/name, got {repo!r}")
    if is_offline():
        raise ValueError("cannot push: offline (HF_HUB_OFFLINE is set); unset it and check the connection")
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    token = token or os.environ.get("HF_TOKEN") or None
    try:
        url = api.create_repo(repo, private=private, exist_ok=True, repo_type="model", token=token)
        api.upload_folder(folder_path=str(folder), repo_id=repo, repo_type="model", commit_message=message,
                          token=token, ignore_patterns=["*.tmp", ".*"])
    except Exception as e:
        if hub_error(e) or type(e).__name__ in ("LocalTokenNotFoundError", "HTTPError"):
            why = "no token (set HF_TOKEN or run `huggingface-cli login`)" if "Token" in type(e).__name__ else \
                f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
            raise ValueError(f"cannot push {folder} to {repo}: {why}") from None
        raise
    return str(url)
