"""Training entry point: `python -m mnistlab.train [overrides]` (Hydra), a thin main over a testable train(cfg)."""

from __future__ import annotations

import copy
import logging
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from mnistlab.config import ConfigError, validate, validate_inputs
from mnistlab.launching import configure_threads, parallel_jobs
from mnistlab.outputs import CURVES_FILE, METRICS_FILE, SUMMARY_KEYS, output_dirs, write_curves_csv, write_summary
from mnistlab.paths import CONF_DIR, resolve, root_of

log = logging.getLogger("mnistlab.train")
# `${sweep_values:${study.lrs}}` turns a YAML list into a Hydra sweep ("0.001,0.01"), so the study's grid is
# plain config that `dvc exp run -S 'study.lrs=[0.01,0.1]'` can set.
OmegaConf.register_new_resolver("sweep_values", lambda xs: ",".join(str(x) for x in xs), replace=True)
# data.validation=false: Lightning runs no validation loop (not even the sanity check).
NO_VALIDATION = {"limit_val_batches": 0, "num_sanity_val_steps": 0}


def _hydra():
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get() if HydraConfig.initialized() else None


def effective_test_ckpt(cfg: DictConfig) -> str:
    """Which weights the test scores: cfg.test_ckpt, but always "last" without validation (there is no best)."""
    return cfg.test_ckpt if cfg.data.validation else "last"


def curated_params(cfg: DictConfig) -> dict:
    """The flat parameters a user compares runs by in the MLflow UI."""
    opt = cfg.optimizer
    return {
        "optimizer": opt.name,
        "lr": opt.lr,
        "momentum": opt.get("momentum", 0.0),
        "nesterov": opt.get("nesterov", False),
        "alpha": opt.get("alpha", ""),
        "eps": opt.get("eps", ""),
        "weight_decay": opt.get("weight_decay", 0.0),
        "batch_size": cfg.data.batch_size,
        "max_epochs": cfg.trainer.max_epochs,
        "seed": cfg.seed,
        "hidden_sizes": list(cfg.model.hidden_sizes),
        "activation": cfg.model.activation,
        "init": cfg.model.init,
        "dropout": cfg.model.dropout,
        "precision": cfg.trainer.precision,
        "accelerator": cfg.trainer.accelerator,
        "val_size": cfg.data.val_size,
        "split_seed": cfg.data.split_seed,
        "validation": cfg.data.validation,
        "test_ckpt": effective_test_ckpt(cfg),
    }


def build_callbacks(callbacks_cfg: DictConfig, checkpoint_dir: Path, progress_bar: bool, validation: bool = True) -> list:
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


def train(cfg: DictConfig) -> dict[str, float]:
    """Validate `cfg`, train and test the MLP, write metrics.json + curves.csv, track it all in MLflow."""
    validate(cfg)
    import lightning.pytorch as pl
    import torch

    from mnistlab.callbacks import EpochHistory
    from mnistlab.data.datamodule import MnistDataModule
    from mnistlab.logging_setup import quiet_lightning
    from mnistlab.model import MnistMLP

    quiet_lightning()
    hc = _hydra()
    root = root_of(cfg.paths.root)
    validate_inputs(cfg, root)
    dirs = output_dirs(cfg.paths, root, hc)
    out_dir, reports_dir, ckpt_dir = dirs.out, dirs.reports, dirs.checkpoints
    threads = configure_threads(cfg.num_threads, parallel_jobs(hc))
    torch.set_flush_denormal(bool(cfg.flush_denormal))
    pl.seed_everything(cfg.seed, workers=True, verbose=False)

    dm = MnistDataModule(
        resolve(cfg.data.processed_dir, root), cfg.data.batch_size, cfg.data.eval_batch_size, cfg.seed, cfg.data.validation
    )
    meta = dm.load()  # fails here, before any run opens, when data/processed is missing
    model = MnistMLP(
        model=OmegaConf.to_container(cfg.model, resolve=True),
        optimizer=OmegaConf.to_container(cfg.optimizer, resolve=True),
    )
    history = EpochHistory()
    overrides = list(hc.overrides.task) if hc is not None else []

    from mnistlab.tracking.run import keep_tracking_uri_env, restore_sigint

    # Under DDP, Lightning re-launches this script once per extra GPU (RANK/LOCAL_RANK set): one run, on rank 0.
    rank_zero = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0
    tracked = _open_run(cfg, root, overrides, meta, hc, out_dir) if cfg.logger.enabled and rank_zero else nullcontext(None)
    if cfg.reuse_finished and cfg.logger.enabled and rank_zero:
        reused = _reuse_finished(tracked, out_dir)
        if reused is not None:
            return reused
    try:
        with keep_tracking_uri_env():
            return _fit_and_test(cfg, tracked, model, dm, meta, history, overrides, threads, out_dir, reports_dir, ckpt_dir)
    finally:
        restore_sigint()


def _fit_and_test(cfg, tracked, model, dm, meta, history, overrides, threads, out_dir, reports_dir, ckpt_dir):
    """Inside the tracked run: fit, test, then write and log the results."""
    import hydra

    from mnistlab.cluster import lightning_plugins, remember_run, resume_checkpoint

    from mnistlab.callbacks import clean_float

    hc = _hydra()
    # one place for "no progress bars in a sweep": its trials share a console (or have none), and the sweep
    # prints trials done / total instead (tracking/progress.py)
    bar = bool(cfg.trainer.enable_progress_bar) and not (hc is not None and str(hc.mode) == "RunMode.MULTIRUN")
    with tracked as run:
        if run is not None:
            remember_run(out_dir, run.run_id)  # a requeued start of this SLURM job continues this run
        validation = cfg.data.validation
        callbacks = [history] + build_callbacks(cfg.callbacks, ckpt_dir, bar, validation)
        logger = False
        if run is not None:
            callbacks.append(run.callback())
            logger = run.logger()
            run.log_params(curated_params(cfg))
            run.client.set_tag(run.run_id, "mnistlab.torch_threads", str(threads))
            run.client.set_tag(run.run_id, "mnistlab.validation", str(validation).lower())
            run.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
            run.log_text("\n".join(overrides) + "\n", "overrides.txt")
        trainer = hydra.utils.instantiate(
            cfg.trainer, callbacks=callbacks, logger=logger, default_root_dir=str(out_dir), enable_progress_bar=bar,
            plugins=lightning_plugins(), **({} if validation else NO_VALIDATION),
        )
        if run is not None:
            from mnistlab.run_info import device_name

            run.client.set_tag(run.run_id, "mnistlab.device", device_name(trainer.strategy.root_device))

        start = time.perf_counter()
        trainer.fit(model, datamodule=dm, ckpt_path=resume_checkpoint(cfg.ckpt_path, ckpt_dir))
        fit_seconds = time.perf_counter() - start
        if trainer.interrupted:
            raise KeyboardInterrupt("training was interrupted")
        fit_metrics = {k: clean_float(v) for k, v in trainer.callback_metrics.items()}
        rows = list(history.rows)  # test(ckpt_path="best") restores callback state from that checkpoint
        epochs_run = len(rows)
        ckpt_cb = trainer.checkpoint_callback
        best = effective_test_ckpt(cfg) == "best" and ckpt_cb is not None and ckpt_cb.best_model_path
        test_ckpt = "best" if best else None  # None: the weights in memory, i.e. the last epoch's
        trainer.test(model, datamodule=dm, ckpt_path=test_ckpt, verbose=False)
        test_metrics = {k: clean_float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}

        metrics = {  # keys: SUMMARY_KEYS
            "test/acc": test_metrics["test/acc"],
            "test/loss": test_metrics["test/loss"],
            **({"val/acc_best": fit_metrics.get("val/acc_best", float("nan"))} if validation else {}),
            "epochs": epochs_run,
            "fit_seconds": round(fit_seconds, 3),
            "samples_per_second": round(model.samples_seen / fit_seconds, 1),
            "samples_seen": model.samples_seen,  # every rank's under DDP
        }
        if run is not None:
            _log_results(run, cfg, model, dm, rows, metrics, test_metrics, ckpt_cb, trainer.global_step, trainer.world_size)
        if trainer.is_global_zero:  # DDP's other ranks share the output dir
            write_curves_csv(reports_dir / CURVES_FILE, rows)
            write_summary(reports_dir, metrics)
    log.info("test/acc=%.4f test/loss=%.4f in %.1fs (%d epochs); metrics in %s",
             metrics["test/acc"], metrics["test/loss"], fit_seconds, epochs_run, reports_dir / METRICS_FILE)
    return metrics


def _open_run(cfg: DictConfig, root: Path, overrides: list[str], meta: dict, hc, out_dir: Path | None = None):
    from mnistlab.cluster import previous_run_id, restart_count
    from mnistlab.run_info import environment_tags, git_tags, run_name
    from mnistlab.tracking.lineage import dataset_inputs, dvc_import_source
    from mnistlab.tracking.run import TrackedRun, parent_run_id, unique_run_name
    from mnistlab.tracking.resume import config_hash
    from mnistlab.tracking.store import open_store
    from mnistlab.tracking.tags import CONFIG_HASH_TAG, PARENT_TAG

    uri, exp_id = open_store(cfg.paths.mlruns_dir, cfg.logger.tracking_uri, cfg.logger.experiment_name, root)
    tags = {
        **git_tags(root),
        "mnistlab.data_checksum": meta["data_checksum"],
        "mnistlab.data_verified": str(meta.get("verified", True)).lower(),
        "mnistlab.task": cfg.task_name,
        **environment_tags(),
    }
    sweep_dir = Path(hc.sweep.dir) if hc is not None and str(hc.mode) == "RunMode.MULTIRUN" else None
    run = TrackedRun(uri, exp_id, "", tags, synchronous=cfg.logger.synchronous)
    parent = parent_run_id(sweep_dir, run.client)
    if parent:
        tags[PARENT_TAG] = parent
        tags["mnistlab.trial"] = str(hc.job.num) if hc is not None else ""
    tags[CONFIG_HASH_TAG] = config_hash(cfg, meta["data_checksum"])
    reopen = previous_run_id(out_dir) if out_dir is not None else None
    if reopen:  # a requeued SLURM trial continues its own run (cluster.py)
        tags["mnistlab.slurm_restarts"] = str(restart_count())
    run = TrackedRun(uri, exp_id, "", tags, synchronous=cfg.logger.synchronous, reopen=reopen,
                     system_metrics=cfg.logger.get("system_metrics", False),
                     inputs=dataset_inputs(meta, dvc_import_source(root)) if "counts" in meta else [])
    if reopen:
        return run
    base = cfg.logger.run_name or run_name(cfg.optimizer.name, cfg.optimizer.lr, cfg.data.batch_size, overrides)
    run.run_name = unique_run_name(run.client, exp_id, base)
    return run


def _reuse_finished(run, out_dir: Path) -> dict[str, float] | None:
    """A trial whose config hash already FINISHED is not retrained: its run becomes a copy of that one."""
    from mnistlab.tracking.resume import copy_results, find_finished
    from mnistlab.tracking.tags import CONFIG_HASH_TAG

    original = find_finished(run.client, run.experiment_id, run.tags[CONFIG_HASH_TAG])
    if original is None:
        return None
    with run:
        copy_results(run.client, original, run.run_id)
    metrics = {k: v for k, v in original.data.metrics.items() if k in SUMMARY_KEYS}
    write_summary(out_dir, metrics)
    log.info("reused run %s (%s): same config hash, not retrained; val/acc_best=%.4f test/acc=%.4f",
             original.info.run_id, original.info.run_name, metrics.get("val/acc_best", float("nan")),
             metrics.get("test/acc", float("nan")))
    return metrics


def _log_results(run, cfg, model, dm, rows, metrics, test_metrics, ckpt_cb, step, world_size) -> None:
    import matplotlib.pyplot as plt
    import numpy as np
    import torch

    from mnistlab.tracking import plots

    run.log_metrics({k: v for k, v in metrics.items() if k not in test_metrics}, step=step)
    confusion = model.test_confusion_matrix.numpy()  # computed on every rank in on_test_epoch_end (DDP)
    run.log_table(plots.per_class_table(confusion), "test_acc_per_class.json")
    if cfg.logger.plots:
        figures = {
            "curves.png": plots.curves_figure(rows, run.run_name),
            "confusion_matrix.png": plots.confusion_figure(model.test_confusion, model.test_confusion_matrix),
        }
        x_test, y_test = dm.split("test")
        # this rank's test samples: its DDP shard (every world_size-th), cut by trainer.limit_test_batches
        n = model.test_predictions.shape[0]
        figures["misclassified.png"] = plots.misclassified_figure(
            x_test[::world_size][:n].cpu(), model.test_predictions, y_test[::world_size][:n].cpu(), cfg.logger.misclassified_max
        )
        for name, fig in figures.items():
            run.log_figure(fig, name)
            plt.close(fig)
    if cfg.logger.log_checkpoint and ckpt_cb is not None and ckpt_cb.best_model_path:
        run.log_artifact(Path(ckpt_cb.best_model_path), "checkpoints")
    if cfg.logger.log_model:
        net = copy.deepcopy(model.net).cpu().float().eval()
        example = dm.split("test")[0][:5].cpu().numpy().astype(np.float32)
        run.log_model(net, example, [f"torch=={torch.__version__.split('+')[0]}"])


def record_failed_trial(cfg: DictConfig, error: Exception) -> None:
    """A sweep trial that failed before its run opened (bad value, missing data) still gets a FAILED run."""
    hc = _hydra()
    root = root_of(cfg.paths.root)
    meta = {"data_checksum": "unknown"}
    try:
        with _open_run(cfg, root, list(hc.overrides.task) if hc else [], meta, hc):
            raise error
    except Exception:
        pass


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def hydra_main(cfg: DictConfig) -> float | None:
    from mnistlab.data.mnist_files import MnistDataError

    hc = _hydra()
    in_sweep = hc is not None and str(hc.mode) == "RunMode.MULTIRUN"
    from mnistlab.exits import interrupt_exit_code
    from mnistlab.sweep import write_trial_status

    try:
        # The sweep objective: never the test accuracy (tuning on test is optimistic by construction); a
        # validation-free run (data.validation=false) has none and returns None.
        return train(cfg).get("val/acc_best")
    except BaseException as e:
        code = interrupt_exit_code(e)
        if in_sweep and code is not None:  # scancel, preemption, a time limit, Ctrl-C: the trial says so itself
            why = "SIGTERM (scancel, preemption or a time limit)" if code == 143 else "Ctrl-C"
            write_trial_status(Path(hc.runtime.output_dir), "KILLED", f"stopped by {why}")
            raise
        if not isinstance(e, Exception):
            raise
        if not in_sweep:
            if isinstance(e, (ConfigError, MnistDataError)):
                print(f"error: {e}", file=sys.stderr)
                sys.exit(2)
            raise
        # A sweep goes on past a failed trial: the run is FAILED in MLflow, the sweep callback reports it
        # and makes the multirun exit non-zero at the end.
        log.exception("trial %s failed: %s", hc.job.num, e)
        write_trial_status(Path(hc.runtime.output_dir), "FAILED", f"{type(e).__name__}: {e}")
        if cfg.logger.enabled and not getattr(e, "mlflow_run_id", None):
            record_failed_trial(cfg, e)
        return None


def main() -> None:
    """`mnistlab-train`: Hydra's main with the shell's exit statuses, 130 after Ctrl-C and 143 after SIGTERM
    (for a single run and for a whole sweep), so a scheduler or `dvc repro` never reads an interrupt as success."""
    from mnistlab.exits import install_sigterm_handler, interrupt_exit_code

    install_sigterm_handler()
    try:
        hydra_main()
    except BaseException as e:
        code = interrupt_exit_code(e)
        if code is None:
            raise
        print(f"mnistlab-train: stopped by {'SIGTERM' if code == 143 else 'Ctrl-C'}; exit status {code}", file=sys.stderr)
        sys.exit(code)


if __name__ == "__main__":
    main()
