"""One training trial in MLflow: its run opened with provenance tags, its params and config, its results.

train.py calls these in order: open_trial_run (or reuse_finished), log_run_start, log_device, log_results;
record_failed_trial gives a sweep trial that failed before its run opened a FAILED run anyway.
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from mnistlab.checkpoints import is_file_path
from mnistlab.config import MLP_TARGET, effective_test_ckpt, task_config
from mnistlab.data.preprocess import read_data_checksum
from mnistlab.metrics import OBJECTIVE, SUMMARY_KEYS, TEST_KEYS
from mnistlab.outputs import write_summary
from mnistlab.paths import resolve, root_of
from mnistlab.requeue import RUN_ID_FILE, previous_run_id, restart_count
from mnistlab.run_info import device_name, environment_tags, git_tags, run_name
from mnistlab.tracking.lineage import dataset_inputs, dvc_import_source
from mnistlab.tracking.resume import config_hash, copy_results, file_digest, find_finished
from mnistlab.tracking.store import open_store
from mnistlab.tracking.tags import CHECKPOINT_TAG, CONFIG_HASH_TAG, PARENT_TAG

log = logging.getLogger("mnistlab.train")
# optimizer config keys that are Hydra's, not the optimizer's; `name` is logged as the `optimizer` param
_NOT_OPTIMIZER_PARAMS = ("name", "_target_", "_partial_")


def task_overrides(hc) -> list[str]:
    """The command line's overrides of this trial (none outside Hydra)."""
    return list(hc.overrides.task) if hc is not None else []


def model_params(model: DictConfig) -> dict:
    """The chosen net's own settings (its config's keys; its class when it is not the book's MLP), so a new model
    needs no change here. The data fixes input_size and num_classes: not a choice, not a param."""
    plain = OmegaConf.to_container(model, resolve=True)
    target = plain.pop("_target_", MLP_TARGET)
    return {**({} if target == MLP_TARGET else {"model": target.rpartition(".")[2]}),
            **{k: v for k, v in plain.items() if k not in ("input_size", "num_classes")}}


def curated_params(cfg: DictConfig) -> dict:
    """The flat parameters a user compares runs by in the MLflow UI; the optimizer's are its config's own keys,
    so a new optimizer (or a new optimizer setting) needs no change here."""
    opt = OmegaConf.to_container(cfg.optimizer, resolve=True)
    return {
        "optimizer": opt["name"],
        **{k: v for k, v in opt.items() if k not in _NOT_OPTIMIZER_PARAMS},
        "batch_size": cfg.data.batch_size,
        "max_epochs": cfg.trainer.max_epochs,
        "seed": cfg.seed,
        **model_params(cfg.model),
        "accelerator": cfg.trainer.accelerator,
        "val_size": cfg.data.val_size,
        "split_seed": cfg.data.split_seed,
        "validation": cfg.data.validation,
        "test_ckpt": effective_test_ckpt(cfg),
    }


RESUMED_TAG, RESUMED_SHA_TAG, RESUMED_RUN_TAG = (
    "mnistlab.resumed_from", "mnistlab.resumed_from_sha256", "mnistlab.resumed_run_id")


def resumed_from(ckpt_path: str | None, root: Path) -> dict[str, str]:
    """What a `ckpt_path=` run continues: the file, its sha256 (part of the config hash, so a resumed run is never
    reused as a fresh trial) and, when the checkpoint is in a run dir of ours, the run it continues."""
    if not ckpt_path:
        return {}
    if not is_file_path(ckpt_path):
        return {RESUMED_TAG: str(ckpt_path), RESUMED_SHA_TAG: str(ckpt_path)}
    path = resolve(ckpt_path, root)
    tags = {RESUMED_TAG: str(path), RESUMED_SHA_TAG: file_digest(path)}
    run_file = path.parent.parent / RUN_ID_FILE  # <run dir>/checkpoints/<file>.ckpt
    if run_file.is_file():
        tags[RESUMED_RUN_TAG] = run_file.read_text().strip()
    return tags


def open_trial_run(cfg: DictConfig, root: Path, meta: dict, hc, out_dir: Path | None = None):
    """The trial's TrackedRun (not yet started): provenance tags, its sweep parent, its config hash, a unique
    name; a requeued SLURM trial (a run id remembered in `out_dir`) reopens its own run instead."""
    from mnistlab.tracking.run import TrackedRun, parent_run_id, unique_run_name

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
    resumed = resumed_from(cfg.get("ckpt_path"), root)
    tags.update(resumed)
    tags[CONFIG_HASH_TAG] = config_hash(cfg, meta["data_checksum"], resumed.get(RESUMED_SHA_TAG))
    reopen = previous_run_id(out_dir) if out_dir is not None else None
    if reopen:  # a requeued SLURM trial continues its own run (cluster.py)
        tags["mnistlab.slurm_restarts"] = str(restart_count())
    run = TrackedRun(uri, exp_id, "", tags, synchronous=cfg.logger.synchronous, reopen=reopen,
                     system_metrics=cfg.logger.get("system_metrics", False),
                     inputs=dataset_inputs(meta, dvc_import_source(root)) if "counts" in meta else [])
    if reopen:
        return run
    base = cfg.logger.run_name or run_name(cfg.optimizer.name, cfg.optimizer.lr, cfg.data.batch_size, task_overrides(hc))
    run.run_name = unique_run_name(run.client, exp_id, base)
    return run


def reuse_finished(run, out_dir: Path) -> dict[str, float] | None:
    """A trial whose config hash already FINISHED is not retrained: its run becomes a copy of that one."""

    original = find_finished(run.client, run.experiment_id, run.tags[CONFIG_HASH_TAG])
    if original is None:
        return None
    with run:
        copy_results(run.client, original, run.run_id)
    metrics = {k: v for k, v in original.data.metrics.items() if k in SUMMARY_KEYS}
    write_summary(out_dir, metrics)
    log.info("reused run %s (%s): same config hash, not retrained; val/acc_best=%.4f test/acc=%.4f",
             original.info.run_id, original.info.run_name, metrics.get(OBJECTIVE, float("nan")),
             metrics.get("test/acc", float("nan")))
    return metrics


def log_run_start(run, cfg: DictConfig, threads: int, overrides: list[str]) -> None:
    """Before training: the curated params, the thread count, whether it validates, the resolved config and the
    overrides that made it (so even a run that fails in fit says what it was)."""
    run.log_params(curated_params(cfg))
    run.client.set_tag(run.run_id, "mnistlab.torch_threads", str(threads))
    run.client.set_tag(run.run_id, "mnistlab.validation", str(cfg.data.validation).lower())
    run.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
    run.log_text("\n".join(overrides) + "\n", "overrides.txt")


def log_device(run, trainer) -> None:
    """The device the trainer's strategy put the model on and the precision it trains in (known only once the trainer
    exists: Lightning turns trainer.precision=16 into bf16-mixed on a CPU)."""
    run.client.set_tag(run.run_id, "mnistlab.device", device_name(trainer.strategy.root_device))
    run.log_params({"precision": trainer.precision})


def log_results(run, cfg: DictConfig, trainer, model, dm, rows: list[dict], metrics: dict[str, float]) -> None:
    """After test: the summary metrics the logger has not logged, the per-class table, the plots, the best
    checkpoint and the model, as cfg.logger asks."""
    import matplotlib.pyplot as plt

    from mnistlab.model import plain_net
    from mnistlab.tracking import plots

    # test/* came through the logger during trainer.test, val/acc_best per epoch during fit
    run.log_metrics({k: v for k, v in metrics.items() if k not in (*TEST_KEYS, OBJECTIVE)}, step=trainer.global_step)
    confusion = model.test_confusion_matrix.numpy()  # computed on every rank in on_test_epoch_end (DDP)
    run.log_table(plots.per_class_table(confusion), "test_acc_per_class.json")
    if cfg.logger.plots:
        figures = {
            "curves.png": plots.curves_figure(rows, run.run_name),
            "confusion_matrix.png": plots.confusion_figure(model.test_confusion, model.test_confusion_matrix),
        }
        x_test, y_test = dm.split("test")
        # this rank's test samples: its DDP shard (every world_size-th), cut by trainer.limit_test_batches
        n, world_size = model.test_predictions.shape[0], trainer.world_size
        figures["misclassified.png"] = plots.misclassified_figure(
            x_test[::world_size][:n].cpu(), model.test_predictions, y_test[::world_size][:n].cpu(), cfg.logger.misclassified_max
        )
        for name, fig in figures.items():
            run.log_figure(fig, name)
            plt.close(fig)
    ckpt_cb = trainer.checkpoint_callback
    if cfg.logger.log_checkpoint and ckpt_cb is not None and ckpt_cb.best_model_path:
        run.log_artifact(Path(ckpt_cb.best_model_path), "checkpoints")
    tested = tested_checkpoint(cfg, ckpt_cb)
    if tested:  # the registry logs a model from it later when this run logged none (logger.log_model=false)
        run.client.set_tag(run.run_id, CHECKPOINT_TAG, str(Path(tested).resolve()))
    if cfg.logger.log_model:
        net = plain_net(model.hparams["model"], model.state_dict())
        run.log_model(net, example_input(dm))


def tested_checkpoint(cfg: DictConfig, ckpt_cb) -> str | None:
    """The checkpoint holding the weights the test scored (best or last), when one was written."""
    if ckpt_cb is None:
        return None
    if effective_test_ckpt(cfg) == "best" and ckpt_cb.best_model_path:
        return ckpt_cb.best_model_path
    return ckpt_cb.last_model_path or None


def example_input(dm):
    """Five test images as the model takes them: the logged model's input example."""
    return dm.split("test")[0][:5].cpu().float().numpy()


class TrialDied(RuntimeError):
    """A trial's process ended without a verdict of its own (SIGKILL, the out-of-memory killer)."""


def record_unstarted_trial(cfg: DictConfig, reason: str, stopped: bool = False) -> None:
    """A sweep trial whose process died before the trial opened its run (a launcher=stacked member whose stack
    process died in the stack's fit) still gets its run: FAILED with the reason, its params and config, so MLflow
    holds every trial of the sweep; KILLED when a signal stopped the stack (`stopped`). `cfg` is the job's composed
    config (its `hydra` node says sweep dir and job)."""

    root = root_of(cfg.paths.root)
    task_cfg = task_config(cfg)
    try:
        checksum = read_data_checksum(resolve(cfg.data.processed_dir, root))
    except (OSError, ValueError, KeyError):
        checksum = "unknown"
    error = KeyboardInterrupt(reason) if stopped else TrialDied(reason)
    try:
        with open_trial_run(task_cfg, root, {"data_checksum": checksum}, cfg.hydra) as run:
            run.log_params(curated_params(task_cfg))
            run.log_text(OmegaConf.to_yaml(task_cfg, resolve=True), "config.yaml")
            raise error
    except (TrialDied, KeyboardInterrupt) as e:
        if e is not error:
            raise


def record_failed_trial(cfg: DictConfig, error: Exception, hc) -> None:
    """A sweep trial that failed before its run opened (bad value, missing data) still gets a FAILED run."""

    meta = {"data_checksum": "unknown"}
    try:
        with open_trial_run(cfg, root_of(cfg.paths.root), meta, hc):
            raise error
    except Exception:
        pass
