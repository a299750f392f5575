"""Facts a run records about where it came from: git state, environment, a readable name from its overrides."""

from __future__ import annotations

import getpass
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path

from mnistlab.tracking.tags import HOST_TAG, PID_TAG, PROC_START_TAG

# Overrides that say where a run writes or how it logs, not what it trains: left out of run names.
_NAME_SKIP_PREFIXES = (
    "paths.", "logger", "hydra", "launcher", "callbacks.rich", "trainer.enable_progress_bar", "data.processed_dir",
    "data.raw_dir", "num_threads", "sweep", "callbacks.model_checkpoint", "experiment", "study", "reuse_finished",
)
_NAME_CORE_KEYS = ("optimizer", "optimizer.lr", "data.batch_size")


# What DVC writes (its lock and import files, the stage metrics/plots) and params.yaml (conf/ composed, rewritten
# by `make repro` and `dvc exp run`): changes there are results or derived config, not a dirty checkout.
DVC_MANAGED = (":(exclude,glob)**/dvc.lock", ":(exclude,glob)**/*.dvc", ":(exclude)params.yaml", ":(exclude)reports")


def git_state(root: Path) -> tuple[str, bool]:
    """(commit, dirty): dirty when tracked code or config differs from the commit; ("unknown", False) outside git."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", *DVC_MANAGED],
            cwd=root, capture_output=True, text=True, check=True,
        ).stdout.strip()
        return commit, bool(dirty)
    except (OSError, subprocess.CalledProcessError):
        return "unknown", False


def git_tags(root: Path) -> dict[str, str]:
    """MLflow's standard git tags (commit, branch) and ours (dirty), for a run or a sweep."""
    commit, dirty = git_state(root)
    branch = subprocess.run(["git", "rev-parse", "--abbrev-ref", "HEAD"], cwd=root, capture_output=True, text=True)
    return {"mlflow.source.git.commit": commit, "mnistlab.git_dirty": str(dirty).lower(),
            **({"mlflow.source.git.branch": branch.stdout.strip()} if branch.returncode == 0 else {})}


def device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def environment_tags() -> dict[str, str]:
    import lightning
    import mlflow
    import torch

    import psutil

    command = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
    return {
        HOST_TAG: socket.gethostname(),
        PID_TAG: str(os.getpid()),
        PROC_START_TAG: f"{psutil.Process().create_time():.3f}",
        "mnistlab.command": command[:5000],
        "mlflow.source.name": command[:500],
        "mlflow.source.type": "LOCAL",
        "mlflow.user": getpass.getuser(),
        "version.torch": torch.__version__,
        "version.lightning": lightning.__version__,
        "version.mlflow": mlflow.__version__,
        "version.python": platform.python_version(),
        **({"dvc.exp_name": os.environ["DVC_EXP_NAME"]} if os.environ.get("DVC_EXP_NAME") else {}),
    }


def run_name(optimizer: str, lr: float, batch_size: int, overrides: list[str]) -> str:
    """e.g. 'rmsprop lr=0.001 bs=128 seed=3': the core of the study, then any other override that changes training."""
    extra = []
    for o in overrides:
        key = o.split("=", 1)[0].lstrip("+~")
        if key in _NAME_CORE_KEYS or key.startswith(_NAME_SKIP_PREFIXES):
            continue
        extra.append(o.lstrip("+~").replace("trainer.", "").replace("data.", "").replace("optimizer.", ""))
    dvc_exp = os.environ.get("DVC_EXP_NAME")  # set by `dvc exp run`, whose -S values reach us via params.yaml
    return " ".join([f"{optimizer} lr={lr:g} bs={batch_size}", *extra] + ([f"[dvc exp {dvc_exp}]"] if dvc_exp else []))
