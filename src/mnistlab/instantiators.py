"""Objects built from config groups that need the run's context (as lightning-hydra-template's instantiators)."""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from mnistlab.outputs import OutputDirs
from mnistlab.requeue import lightning_plugins

# data.validation=false: Lightning runs no validation loop (not even the sanity check).
NO_VALIDATION = {"limit_val_batches": 0, "num_sanity_val_steps": 0}

def build_callbacks(callbacks_cfg: DictConfig, checkpoint_dir: Path, progress_bar: bool, validation: bool = True) -> list:
    """Lightning callbacks from cfg.callbacks (a null entry is off): the checkpoint goes to `checkpoint_dir` unless
    configured, ranks nothing without validation; a progress bar only when `progress_bar` (and none when none is
    configured: Lightning would add its own, which redraws after every batch)."""
    from lightning.pytorch.callbacks import ProgressBar

    out = []
    for name, cb_cfg in (callbacks_cfg or {}).items():
        if cb_cfg is None:
            continue
        kwargs = {}
        if name == "model_checkpoint" and cb_cfg.get("dirpath") is None:
            kwargs["dirpath"] = str(checkpoint_dir)
        if name == "model_checkpoint" and not validation:
            kwargs["monitor"] = None  # nothing to rank by: its file holds the latest epoch
        cb = hydra.utils.instantiate(cb_cfg, **kwargs)
        if isinstance(cb, ProgressBar) and not progress_bar:
            continue
        out.append(cb)
    return out


def build_trainer(cfg: DictConfig, run, history, dirs: OutputDirs, hc):
    """The Lightning Trainer of cfg.trainer with `history` and the configured callbacks, logging into `run` (if
    any), its default root the trial's output dir."""
    from lightning.pytorch.callbacks import ProgressBar

    from mnistlab.checkpoint_io import AtomicCheckpointIO

    # one place for "no progress bars in a sweep": its trials share a console (or have none), and the sweep
    # prints trials done / total instead (tracking/progress.py)
    bar = bool(cfg.trainer.enable_progress_bar) and not (hc is not None and str(hc.mode) == "RunMode.MULTIRUN")
    validation = cfg.data.validation
    callbacks = [history] + build_callbacks(cfg.callbacks, dirs.checkpoints, bar, validation)
    bar = bar and any(isinstance(cb, ProgressBar) for cb in callbacks)
    logger = False
    if run is not None:
        callbacks.append(run.callback())
        logger = run.logger()
    return hydra.utils.instantiate(
        cfg.trainer, callbacks=callbacks, logger=logger, default_root_dir=str(dirs.out), enable_progress_bar=bar,
        plugins=[AtomicCheckpointIO(), *(lightning_plugins() or [])], **({} if validation else NO_VALIDATION),
    )
