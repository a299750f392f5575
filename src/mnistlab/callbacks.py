"""Lightning callbacks no library provides (a non-finite-loss guard, the per-epoch history) and the metric
names and values they share with the model, the CSV, the plots and MLflow."""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch

from mnistlab.checkpoints import integrity_problem
from mnistlab.metrics import CURVE_KEYS


def clean_float(v) -> float:
    """A metric computed in float32 as the number it stands for (0.978, not 0.9779999852180481).

    Lightning hands loggers float32 tensors already turned into Python floats; a float that float32 represents
    exactly is written as the shortest decimal that round-trips in float32 (numpy's repr). Others pass unchanged.
    """
    v = float(v.item() if hasattr(v, "item") else v)
    f32 = np.float32(v)
    return float(str(f32)) if np.isfinite(f32) and float(f32) == v else v


class ModelCheckpoint(pl.callbacks.ModelCheckpoint):
    """Lightning's, with two fixes. last.ckpt holds the last validated epoch: Lightning >= 2.6 writes it only when a
    top-k checkpoint was saved at the same step, so it stayed the best epoch's, a SLURM requeue resumed from there
    (training those epochs again) and test_ckpt=last tested the best weights. And a run resumed into another
    checkpoint dir keeps the best it resumes from: Lightning drops best_model_score there, so the first resumed epoch
    replaced best.ckpt however it scored; the old best file is copied in (verified, atomically), its files untouched."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._top_k_at_epoch_start: dict = {}

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        self._top_k_at_epoch_start = dict(self.best_k_models)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        """After Lightning's own saves of this epoch (its checkpoint point with one validation per epoch): when they
        left last.ckpt behind, write it, from the same loop state Lightning saves from."""
        super().on_train_epoch_end(trainer, pl_module)
        saved = self.best_k_models != self._top_k_at_epoch_start  # Lightning wrote last.ckpt too
        if (not self.save_last or saved or self.monitor is None or self.dirpath is None
                or trainer.sanity_checking or trainer.fast_dev_run):
            return
        self.last_model_path = str(Path(self.dirpath) / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}")
        trainer.save_checkpoint(self.last_model_path, self.save_weights_only)

    def load_state_dict(self, state_dict: dict) -> None:
        old = Path(state_dict.get("best_model_path") or "")
        if state_dict.get("dirpath", self.dirpath) == self.dirpath or self.dirpath is None or not old.is_file() or (
                state_dict.get("best_model_score") is None or self.save_top_k != 1 or integrity_problem(old)):
            return super().load_state_dict(state_dict)  # Lightning's own rules (and its warning)
        new = Path(self.dirpath) / old.name
        new.parent.mkdir(parents=True, exist_ok=True)
        tmp = new.with_name(f".{new.name}.tmp-{os.getpid()}")
        shutil.copyfile(old, tmp)
        os.replace(tmp, new)
        self.best_model_score = state_dict["best_model_score"]
        self.best_model_path = self.kth_best_model_path = str(new)
        self.kth_value = self.best_model_score
        self.best_k_models = {str(new): self.best_model_score}


class NonFiniteLossError(FloatingPointError):
    """Training produced NaN/inf loss; the run is marked FAILED."""


def non_finite_message(value, epoch: int, step: int, optimizer: dict) -> str:
    """What a diverged run's error says (FiniteLossGuard, and each member of a stack)."""
    return (f"Training loss became {value} at epoch {epoch}, step {step} (optimizer {optimizer.get('name')}, "
            f"lr={optimizer.get('lr')}): the run diverged. Lower optimizer.lr or set trainer.gradient_clip_val.")


class FiniteLossGuard(pl.Callback):
    """Stops with a clear error when the training loss is NaN/inf.

    Lightning's EarlyStopping(check_finite) only stops quietly on a validation metric; a diverged
    lr (a common sweep outcome) should fail fast and visibly. Checked every N steps to avoid a
    device sync per step.
    """

    def __init__(self, check_every_n_steps: int = 50):
        self.every = check_every_n_steps

    def _fail(self, trainer, value) -> None:
        opt = trainer.lightning_module.hparams.get("optimizer", {})
        raise NonFiniteLossError(non_finite_message(value, trainer.current_epoch, trainer.global_step, opt))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx % self.every == 0:
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            if not bool(torch.isfinite(loss)):
                self._fail(trainer, float(loss))

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        loss = trainer.callback_metrics.get("train/loss")
        if loss is not None and not math.isfinite(float(loss)):
            self._fail(trainer, float(loss))


class EpochHistory(pl.Callback):
    """One row per finished epoch of train/val loss and accuracy (for curves.csv and curves.png).

    Lightning runs this hook before the LightningModule's on_train_epoch_end (where the train metrics are
    logged and reset), so the train values are read from the module's epoch sums (train_epoch_metrics), the val
    values from what validation logged; it runs before ModelCheckpoint saves, so a resumed run keeps its rows.
    """

    def __init__(self):
        self.rows: list[dict[str, float]] = []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        m = trainer.callback_metrics
        loss, acc = pl_module.train_epoch_metrics()
        row = {"epoch": trainer.current_epoch + 1, "train/loss": float(loss), "train/acc": float(acc)}
        row.update({k: float(m[k]) for k in CURVE_KEYS if k.startswith("val/") and k in m})
        self.rows.append(row)

    def state_dict(self):
        return {"rows": self.rows}

    def load_state_dict(self, state_dict):
        self.rows = list(state_dict.get("rows", []))


class RichProgressBar(pl.callbacks.RichProgressBar):
    """Lightning's RichProgressBar, updated every `update_every_n_batches` training batches (and at an epoch's last).

    Lightning's updates the bar and re-reads the progress-bar metrics after EVERY training batch, which costs about
    as much as a tenth of this MLP's step on a CPU; `refresh_rate` (renders per second) does not change that. At
    ~100-1000 steps/s an update every 10 batches still moves the bar many times a second.
    """

    def __init__(self, update_every_n_batches: int = 10, **kwargs):
        super().__init__(**kwargs)
        self.update_every_n_batches = max(1, int(update_every_n_batches))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        n = batch_idx + 1
        if n % self.update_every_n_batches == 0 or n >= self.total_train_batches:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
