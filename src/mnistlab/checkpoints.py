"""Checks before a run resumes from a checkpoint: a damaged or foreign checkpoint is refused at start-up (naming the
member or key), never trained on. Light (no torch import): config.py runs them before anything starts."""

from __future__ import annotations

import zipfile
from pathlib import Path

NET_PREFIX = "net."  # MnistMLP keeps its network under .net
KEYWORDS = ("last", "best", "hpc", "registry")  # ckpt_path values Lightning resolves itself rather than as a file


def is_file_path(ckpt_path) -> bool:
    """A `ckpt_path` naming a local file (not one of Lightning's keywords, not a URL)."""
    return bool(ckpt_path) and str(ckpt_path) not in KEYWORDS and "://" not in str(ckpt_path)


def integrity_problem(path: Path) -> str | None:
    """The zip's own CRCs (torch.save writes a zip): damage inside an archive that still opens."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (OSError, zipfile.BadZipFile) as e:
        return f"damaged archive ({e})"
    return f"damaged: the CRC of its member {bad!r} does not match its content" if bad else None


def fit_problem(state_dict: dict, net_state: dict) -> str | None:
    """The first key or shape where a checkpoint's network differs from the configured one."""
    saved = {k[len(NET_PREFIX):]: v for k, v in state_dict.items() if k.startswith(NET_PREFIX)}
    for key, want in net_state.items():
        have = saved.get(key)
        if have is None:
            return f"it has no {NET_PREFIX}{key} (another model)"
        if tuple(have.shape) != tuple(want.shape):
            return (f"{NET_PREFIX}{key} has shape {list(have.shape)} there and {list(want.shape)} in the configured "
                    f"model (another model size)")
    extra = sorted(set(saved) - set(net_state))
    return f"it has {NET_PREFIX}{extra[0]}, which the configured model lacks (another model)" if extra else None



def resume_problem(path: Path, net_state: dict) -> str | None:
    """Whether the configured network can take the checkpoint's weights (train.py, once the model is built)."""
    import torch

    state = torch.load(path, map_location="cpu", weights_only=False, mmap=True).get("state_dict", {})
    misfit = fit_problem(state, net_state)
    if misfit is None:
        return None
    return (f"ckpt_path={str(path)!r} does not fit the configured model: {misfit}. Resume with the config it was "
            f"trained with (a checkpoint in a run dir of ours brings that run's overrides along; drop the ones you "
            f"added), or start fresh without ckpt_path")
