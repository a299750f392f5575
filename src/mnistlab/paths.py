"""Where the project lives, so every process (Hydra job, DVC temp experiment, subprocess) agrees."""

from __future__ import annotations

import os
from pathlib import Path

from hydra.core.hydra_config import HydraConfig

# DVC runs queued/temp experiments in a copy under this folder of the workspace.
_DVC_EXP_TMP = os.sep + os.path.join(".dvc", "tmp", "exps") + os.sep


def project_root(start: Path | None = None) -> Path:
    """The nearest folder up from `start` (default: cwd) holding dvc.yaml and conf/; else `start`."""
    start = Path(start or Path.cwd()).resolve()
    for folder in (start, *start.parents):
        if (folder / "dvc.yaml").is_file() and (folder / "conf").is_dir():
            return folder
    return start


def conf_dir() -> Path:
    """The conf/ of the project the command runs in (a clone, a DVC temp copy), else the checkout installed."""
    here = project_root() / "conf"
    return here if here.is_dir() else Path(__file__).resolve().parents[2] / "conf"


CONF_DIR = conf_dir()


def workspace_root(start: Path | None = None) -> Path:
    """Like project_root, but a DVC temp-experiment copy maps back to the workspace that owns it."""
    if os.environ.get("MNISTLAB_ROOT"):
        return Path(os.environ["MNISTLAB_ROOT"]).resolve()
    root = project_root(start)
    text = str(root) + os.sep
    if _DVC_EXP_TMP in text:
        return Path(text.split(_DVC_EXP_TMP)[0])
    return root


def launch_dir() -> Path:
    """Where the command was started: inside a Hydra job, Hydra's runtime.cwd (hydra.job.chdir=true moves the
    working directory into the job's dir, which may lie outside the project), else the working directory."""
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.cwd)
    return Path.cwd()


def root_of(configured: str | None) -> Path:
    """The project root: `paths.root` when set, else found from where the command was started."""
    return Path(configured).resolve() if configured else project_root(launch_dir())


def unique_stamp() -> str:
    """`2026-11-24_15-40-01_123456_3fa9c2`: a run or sweep dir name that stays unique for simultaneous starts
    (Hydra's `${now:}` has 1-second resolution: two sweeps started together shared a dir and a parent run)."""
    import datetime
    import secrets

    return f"{datetime.datetime.now():%Y-%m-%d_%H-%M-%S_%f}_{secrets.token_hex(3)}"


def _register_resolvers() -> None:
    """`${mnistlab.stamp:}` for conf/hydra. Cached like Hydra's `${now:}`: the value lives in the config's resolver
    cache, which Hydra copies into every trial's config (load_sweep_config) and which travels with the pickled
    config to joblib/submitit workers, so a trial never computes a different dir than its parent."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("mnistlab.stamp"):
        OmegaConf.register_new_resolver("mnistlab.stamp", unique_stamp, use_cache=True)


_register_resolvers()


def resolve(path: str | os.PathLike, root: Path) -> Path:
    """An absolute path: `path` itself if absolute, else relative to `root`."""
    p = Path(os.path.expanduser(str(path)))
    return p if p.is_absolute() else (root / p)
