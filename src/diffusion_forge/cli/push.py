"""`dforge push`: upload an exported diffusers folder to the Hugging Face hub."""
from __future__ import annotations

from . import HelpFormatter

EXAMPLES = """examples:
  dforge export runs/mnist --out exported/mnist-ddpm
  dforge push exported/mnist-ddpm --repo you/mnist-ddpm
  HF_TOKEN=hf_... dforge push exported/mnist-ddpm --repo you/mnist-ddpm --private
The token is HF_TOKEN, else the login cache (`huggingface-cli login`). The repository is created when missing;
the folder goes up in one commit.
"""


def register(sub) -> None:
    p = sub.add_parser("push", help="upload an exported folder to the Hugging Face hub",
                       description="Create the hub repository (if missing) and upload a folder written by "
                                   "`dforge export` (model card included) in one commit.",
                       formatter_class=HelpFormatter, epilog=EXAMPLES)
    p.add_argument("folder", help="folder written by `dforge export`")
    p.add_argument("--repo", required=True, help="hub repository id, user/name")
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..interop.hub import push_folder

    url = push_folder(args.folder, args.repo, private=args.private)
    print(f"pushed {args.folder} to {url}")
    return 0
