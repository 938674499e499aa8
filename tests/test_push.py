"""`dforge push`: create_repo + upload_folder through huggingface_hub's HfApi, replaced here at the boundary."""
from __future__ import annotations

import pytest

from diffusion_forge.cli import main
from diffusion_forge.interop.export import export_denoiser
from diffusion_forge.interop.pipelines import load_pipeline
from diffusion_forge.interop.tiny import save_tiny_ddpm

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning")


class FakeApi:
    """Records what HfApi would be asked to do, and the files of the folder at upload time."""
    calls: list = []

    def __init__(self, *args, **kwargs):
        pass

    def create_repo(self, repo_id, private=False, exist_ok=False, repo_type=None, token=None):
        self.calls.append(("create_repo", repo_id, private, exist_ok, token))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, folder_path, repo_id, repo_type=None, commit_message=None, token=None,
                      ignore_patterns=None):
        from pathlib import Path

        files = {p.relative_to(folder_path).as_posix(): p.read_bytes() for p in Path(folder_path).rglob("*") if p.is_file()}
        self.calls.append(("upload_folder", repo_id, files, token, ignore_patterns))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("push")
    D = load_pipeline(save_tiny_ddpm(root / "pipe"))
    return export_denoiser(D, root / "exported", name="tiny-ddpm", ema=False)


@pytest.fixture
def api(monkeypatch):
    import huggingface_hub

    FakeApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return FakeApi


def test_push_uploads_the_folder_and_its_card(exported, api, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    assert main(["push", str(exported), "--repo", "someone/tiny-ddpm", "--private"]) == 0
    assert "https://huggingface.co/someone/tiny-ddpm" in capsys.readouterr().out
    (create, repo, private, exist_ok, token), upload = api.calls[0], api.calls[1]
    assert (create, repo, private, exist_ok, token) == ("create_repo", "someone/tiny-ddpm", True, True, "hf_test_token")
    _, repo, files, token, _ = upload
    assert repo == "someone/tiny-ddpm" and token == "hf_test_token"
    assert {"model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
            "scheduler/scheduler_config.json", "README.md", "samples.png"} <= set(files)
    card = files["README.md"].decode()
    assert card.startswith("---\nlibrary_name: diffusers\n") and "pipeline_tag: unconditional-image-generation" in card
    assert "# tiny-ddpm" in card and "the trained weights (no EMA average)" in card


def test_push_bad_input_and_offline(exported, api, monkeypatch, tmp_path, capsys):
    def error(*argv):
        assert main(["push", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1
        return err

    assert "export a run first" in error(str(tmp_path / "missing"), "--repo", "a/b")
    (tmp_path / "plain").mkdir()
    assert "not a diffusers folder" in error(str(tmp_path / "plain"), "--repo", "a/b")
    assert "user/name" in error(str(exported), "--repo", "not a repo")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert "offline" in error(str(exported), "--repo", "a/b")
    assert api.calls == []                                                    # nothing was sent
