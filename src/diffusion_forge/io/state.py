"""What a checkpoint holds besides weights, as tensors + JSON (never a pickle): the global RNG states and
the optimiser's state split into flat tensors ``state.<i>.<name>`` and a JSON part; and the checks of what
it holds (file hashes, weights that fit a module), with the error they raise."""
from __future__ import annotations

import base64
import hashlib
import random
from pathlib import Path

import numpy as np
import torch


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, foreign, or from an unknown format version."""


def sha256(path: Path) -> str:
    """The SHA-256 of a file, hex (what state.json records for each tensor file)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_strict(module, tensors: dict, where: Path) -> None:
    """Load ``tensors`` into ``module``: every weight must be there, with its shape (else CheckpointError)."""
    check_fits(module, tensors, where)
    module.load_state_dict(tensors)


def check_fits(module, tensors: dict, where: Path) -> None:
    expected = module.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(k for k in set(expected) & set(tensors) if expected[k].shape != tensors[k].shape)
    if missing or unexpected or wrong:
        parts = [f"{label}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
                 for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape differs", wrong))
                 if keys]
        raise CheckpointError(f"{where} does not fit this model ({'; '.join(parts)}); "
                              "was it written for another model configuration?")


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def rng_state() -> dict:
    """The global RNG states (torch CPU, CUDA, NumPy, Python) as JSON-able values."""
    np_state = np.random.get_state(legacy=False)
    np_state["state"]["key"] = np_state["state"]["key"].tolist()
    py_version, py_internal, py_gauss = random.getstate()
    state = {"torch": _b64(torch.get_rng_state()), "numpy": np_state,
             "python": [py_version, list(py_internal), py_gauss]}
    if torch.cuda.is_available():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(_unb64(state["torch"]))
    np_state = dict(state["numpy"])
    np_state["state"] = dict(np_state["state"], key=np.asarray(np_state["state"]["key"], dtype=np.uint32))
    np.random.set_state(np_state)
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([_unb64(s) for s in state["cuda"]])


# ---------------------------------------------------------------------------------------------
# Optimiser state <-> (flat tensors, JSON)

def flatten_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split ``optimizer.state_dict()`` into flat tensors ``state.<i>.<name>`` and a JSON part."""
    tensors, scalars = {}, {}
    for idx, per_param in state_dict["state"].items():
        for name, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{idx}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[name] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in state_dict["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    for idx, per_param in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(per_param)
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}
