"""A stacked member's trial, inside train(): its results adopted from the stack's fit instead of fitting again.

The launcher trained the member in a stack and left its result file; train() runs as for any trial (config checks,
its MLflow run, params, trainer, test, artifacts, metrics.json, curves.csv) and calls the AdoptedFit the launcher
installed around its job (mnistlab.launch_context) where it would fit.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig

from mnistlab.checkpoint_io import AtomicCheckpointIO
from mnistlab.compat import set_fit_progress
from mnistlab.config import effective_test_ckpt
from mnistlab.metrics import CURVE_KEYS, OBJECTIVE, STEP_LOSS, TEST_KEYS


class AdoptedFit:
    """The fit of a member's trial (launch_context.Fit): its results adopted from its result file."""

    def __init__(self, path: Path):
        self.path = path

    def __call__(self, cfg: DictConfig, trainer, model, dm, history, ckpt_dir: Path) -> tuple[dict, list[dict]]:
        return adopt(self.path, cfg, trainer, model, dm, ckpt_dir)


def _log_curves(trainer, r: dict) -> None:
    """The fit's metrics through the run's Lightning logger, with the keys and steps MnistMLP's fit logs them at:
    train/loss_step (+ epoch) at its global steps, then per epoch the val and the train metrics (+ epoch)."""
    for logger in trainer.loggers:
        for e, row in enumerate(r["rows"]):
            for epoch, step, value in r["step_losses"]:
                if epoch == e:
                    logger.log_metrics({STEP_LOSS: value, "epoch": e}, step=step)
            val = {k: row[k] for k in (*CURVE_KEYS, OBJECTIVE) if k.startswith("val/") and k in row}
            if val:
                logger.log_metrics({**val, "epoch": e}, step=e + 1)
            train = {k: row[k] for k in CURVE_KEYS if k.startswith("train/")}
            logger.log_metrics({**train, "epoch": e}, step=e + 1)
        logger.save()


def _save_checkpoint(path: Path, model, r: dict) -> None:
    """A weights-only Lightning checkpoint of the ordinary model (what MnistMLP.load_from_checkpoint and
    trainer.test(ckpt_path=...) read); a stacked trial cannot be resumed from it (no optimizer or loop state)."""
    import lightning.pytorch as pl

    AtomicCheckpointIO().save_checkpoint(
        {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
         "pytorch-lightning_version": pl.__version__, "epoch": r["current_epoch"] - 1,
         "global_step": r["global_step"], "mnistlab_stacked": True}, path)


def adopt(path: Path, cfg: DictConfig, trainer, model, dm, ckpt_dir: Path) -> tuple[dict[str, float], list[dict]]:
    """In place of train._fit_and_test: log the member's curves, fail as its fit failed, else write its checkpoints
    and test the weights the ordinary run would test. Returns (metrics.json's summary, the per-epoch rows)."""
    from mnistlab.callbacks import NonFiniteLossError, clean_float

    r = torch.load(path, map_location="cpu", weights_only=False)
    _log_curves(trainer, r)
    if r["error"]:
        raise NonFiniteLossError(r["error"])
    set_fit_progress(trainer, r["current_epoch"], r["global_step"])
    model.samples_seen = r["samples_seen"]
    ckpt_cb = trainer.checkpoint_callback
    folder = Path(ckpt_cb.dirpath) if ckpt_cb is not None and ckpt_cb.dirpath else ckpt_dir
    model.net.load_state_dict(r["last"])
    if ckpt_cb is not None and ckpt_cb.save_last:
        ckpt_cb.last_model_path = str(folder / "last.ckpt")
        _save_checkpoint(folder / "last.ckpt", model, r)
    best = effective_test_ckpt(cfg) == "best" and ckpt_cb is not None and r["best"] is not None
    if ckpt_cb is not None and r["best"] is not None:
        model.net.load_state_dict(r["best"])
        ckpt_cb.best_model_path = str(folder / f"{ckpt_cb.filename}.ckpt")
        _save_checkpoint(Path(ckpt_cb.best_model_path), model, r)
    model.net.load_state_dict(r["best"] if best else r["last"])
    trainer.test(model, datamodule=dm, verbose=False)
    rows = [{k: v for k, v in row.items() if k != OBJECTIVE} for row in r["rows"]]
    return {
        **{k: clean_float(trainer.callback_metrics[k]) for k in TEST_KEYS},
        OBJECTIVE: clean_float(max((row["val/acc"] for row in rows), default=float("nan"))),
        "epochs": len(rows),
        "fit_seconds": round(r["fit_seconds"], 3),
        "samples_per_second": round(r["samples_seen"] / r["fit_seconds"], 1),
        "samples_seen": r["samples_seen"],
    }, rows
