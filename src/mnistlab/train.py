"""Training entry point: `python -m mnistlab.train [overrides]` (Hydra), a thin main over a testable train(cfg),
a recipe: validate the composed config, build data, model and trainer, fit, test, record (outputs.py, tracking/)."""

from __future__ import annotations

import logging
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from mnistlab.checkpoints import is_file_path, resume_problem
from mnistlab.config import (
    RUN_MIN_FREE, ConfigError, effective_test_ckpt, low_disk_problem, override_problems, validate, validate_inputs,
    with_run_overrides,
)
from mnistlab.data.mnist_files import MnistDataError
from mnistlab.exits import (
    EXIT_NOT_RECORDED, disk_full, disk_full_message, install_sigterm_handler, interrupt_exit_code,
)
from mnistlab.instantiators import build_trainer
from mnistlab.launch_context import installed_fit
from mnistlab.metrics import OBJECTIVE, TEST_KEYS
from mnistlab.outputs import CURVES_FILE, METRICS_FILE, output_dirs, write_curves_csv, write_summary
from mnistlab.paths import CONF_DIR, resolve, root_of
from mnistlab.requeue import remember_run, resume_checkpoint
from mnistlab.threads import configure_threads, parallel_jobs
from mnistlab.tracking.status import first_line
from mnistlab.tracking.trial import (
    log_device,
    log_results,
    log_run_start,
    open_trial_run,
    record_failed_trial,
    reuse_finished,
    task_overrides,
)
from mnistlab.trial_status import write_trial_status

log = logging.getLogger("mnistlab.train")
# `${sweep_values:${study.lrs}}` turns a YAML list into a Hydra sweep ("0.001,0.01"), so the study's grid is
# plain config that `dvc exp run -S 'study.lrs=[0.01,0.1]'` can set.
OmegaConf.register_new_resolver("sweep_values", lambda xs: ",".join(str(x) for x in xs), replace=True)
OmegaConf.register_new_resolver("seed_range", lambda first, n: f"range({first},{int(first) + int(n)})", replace=True)


def _hydra():
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get() if HydraConfig.initialized() else None


def train(cfg: DictConfig) -> dict[str, float]:
    """Validate `cfg`, train and test the MLP, write metrics.json + curves.csv, track it all in MLflow."""
    validate(cfg)
    import lightning.pytorch as pl

    from mnistlab.callbacks import EpochHistory
    from mnistlab.data.datamodule import MnistDataModule
    from mnistlab.logging_setup import quiet_lightning
    from mnistlab.model import MnistMLP, use_automatic_optimization
    from mnistlab.tracking.run import keep_tracking_uri_env, restore_sigint

    quiet_lightning()
    hc = _hydra()
    root = root_of(cfg.paths.root)
    validate_inputs(cfg, root)
    dirs = output_dirs(cfg.paths, root, hc)
    short = low_disk_problem(dirs.checkpoints, "paths.output_dir", RUN_MIN_FREE, "checkpoints, plots, curves")
    if short:
        raise ConfigError(short)
    threads = configure_threads(cfg.num_threads, parallel_jobs(hc), bool(cfg.flush_denormal))
    pl.seed_everything(cfg.seed, workers=True, verbose=False)

    dm = MnistDataModule(
        resolve(cfg.data.processed_dir, root), cfg.data.batch_size, cfg.data.eval_batch_size, cfg.seed, cfg.data.validation
    )
    meta = dm.load()  # fails here, before any run opens, when data/processed is missing
    model = MnistMLP(
        model=OmegaConf.to_container(cfg.model, resolve=True),
        optimizer=OmegaConf.to_container(cfg.optimizer, resolve=True),
    )
    model.automatic_optimization = use_automatic_optimization(cfg.trainer)
    if is_file_path(cfg.get("ckpt_path")):  # before the run opens: the weights must fit the configured net
        misfit = resume_problem(resolve(cfg.ckpt_path, root), model.net.state_dict())
        if misfit:
            raise ConfigError(misfit)
    if cfg.get("compile"):
        model.net.compile(mode=cfg.compile)  # in place: the state_dict keys (checkpoints, stacked adoption) stay

    # Under DDP, Lightning re-launches this script once per extra GPU (RANK/LOCAL_RANK set): one run, on rank 0.
    rank_zero = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0
    # Lightning's smoke test (a batch of each loop, no logger, no checkpoints): no run and no result files
    smoke = bool(cfg.trainer.get("fast_dev_run"))
    track = cfg.logger.enabled and rank_zero and not smoke
    tracked = open_trial_run(cfg, root, meta, hc, dirs.out) if track else nullcontext(None)
    if cfg.reuse_finished and track:
        reused = reuse_finished(tracked, dirs.out)
        if reused is not None:
            return reused
    try:
        with keep_tracking_uri_env(), tracked as run:
            if run is not None:
                remember_run(dirs.out, run.run_id)  # a requeued start of this SLURM job continues this run
                log_run_start(run, cfg, threads, task_overrides(hc))
            history = EpochHistory()
            trainer = build_trainer(cfg, run, history, dirs, hc)
            if run is not None:
                run.recording(lambda: log_device(run, trainer))
            # a launch that trained this trial elsewhere (launcher=stacked) installed the fit that adopts its results
            fit = installed_fit() or _fit_and_test
            metrics, rows = fit(cfg, trainer, model, dm, history, dirs.checkpoints)
            if smoke:
                log.info("fast_dev_run: the loops ran on %s batch(es); a smoke test, so no MLflow run, metrics.json or "
                         "curves.csv was written", int(cfg.trainer.fast_dev_run))
                return metrics
            if trainer.is_global_zero:  # DDP's other ranks share the output dir; local first, whatever the store does
                write_curves_csv(dirs.reports / CURVES_FILE, rows)
                write_summary(dirs.reports, metrics)
            if run is not None:
                run.recording(lambda: log_results(run, cfg, trainer, model, dm, rows, metrics))
    finally:
        restore_sigint()
    if run is not None and run.store_error is not None:  # the local status file says how it ended
        error = StoreFailed(run, dirs)
        write_trial_status(Path(hc.runtime.output_dir) if hc is not None else dirs.out, "FINISHED",
                           f"not recorded in MLflow: {error}")
        raise error
    log.info("test/acc=%.4f test/loss=%.4f in %.1fs (%d epochs); metrics in %s", metrics["test/acc"],
             metrics["test/loss"], metrics["fit_seconds"], metrics["epochs"], dirs.reports / METRICS_FILE)
    return metrics


class StoreFailed(RuntimeError):
    """Training and test finished and their results are on disk, but the MLflow store failed during the run."""

    def __init__(self, run, dirs):
        super().__init__(
            f"the MLflow store {run.tracking_uri} failed during the run ({first_line(run.store_error)}), so run "
            f"{run.run_id} is not fully recorded there; it shows RUNNING until `make clean-stale` (mnistlab-runs "
            f"clean-stale) closes it once the store works again. Training and test finished: the results are in "
            f"{dirs.reports} (metrics.json, curves.csv, timing.json) and the checkpoints in {dirs.checkpoints}. Fix "
            f"the store (disk space, permissions, the database file), then re-run to record the run.")


def _fit_and_test(cfg: DictConfig, trainer, model, dm, history, ckpt_dir: Path) -> tuple[dict[str, float], list[dict]]:
    """Fit (resuming a requeued job's checkpoint), test the configured weights: the summary metrics.json holds
    and the per-epoch rows of fit."""
    from mnistlab.callbacks import clean_float

    start = time.perf_counter()
    trainer.fit(model, datamodule=dm, ckpt_path=resume_checkpoint(cfg.ckpt_path, ckpt_dir))
    fit_seconds = time.perf_counter() - start
    if trainer.interrupted:
        raise KeyboardInterrupt("training was interrupted")
    fit_metrics = {k: clean_float(v) for k, v in trainer.callback_metrics.items()}
    rows = list(history.rows)  # test(ckpt_path="best") restores callback state from that checkpoint
    ckpt_cb = trainer.checkpoint_callback
    best = effective_test_ckpt(cfg) == "best" and ckpt_cb is not None and ckpt_cb.best_model_path
    test_ckpt = "best" if best else None  # None: the weights in memory, i.e. the last epoch's
    trainer.test(model, datamodule=dm, ckpt_path=test_ckpt, verbose=False)
    metrics = {  # keys: metrics.SUMMARY_KEYS
        **{k: clean_float(trainer.callback_metrics[k]) for k in TEST_KEYS},
        **({OBJECTIVE: fit_metrics.get(OBJECTIVE, float("nan"))} if cfg.data.validation else {}),
        "epochs": len(rows),
        "fit_seconds": round(fit_seconds, 3),
        "samples_per_second": round(model.samples_seen / fit_seconds, 1),
        "samples_seen": model.samples_seen,  # every rank's under DDP
    }
    return metrics, rows


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def hydra_main(cfg: DictConfig) -> float | None:

    hc = _hydra()
    in_sweep = hc is not None and str(hc.mode) == "RunMode.MULTIRUN"

    try:
        # The sweep objective: never the test accuracy (tuning on test is optimistic by construction); a
        # validation-free run (data.validation=false) has none and returns None.
        return train(cfg).get(cfg.get("optimized_metric") or OBJECTIVE)
    except BaseException as e:
        code = interrupt_exit_code(e)
        if hc is not None and code is not None:  # scancel, preemption, a time limit, Ctrl-C: the run says so itself
            why = "SIGTERM (scancel, preemption or a time limit)" if code == 143 else "Ctrl-C"
            write_trial_status(Path(hc.runtime.output_dir), "KILLED", f"stopped by {why}")
            raise
        if not isinstance(e, Exception):
            raise
        if isinstance(e, StoreFailed):  # one paragraph; its status file says FINISHED, not recorded
            print(f"error: {e}", file=sys.stderr)
            if in_sweep:
                return None
            sys.exit(EXIT_NOT_RECORDED)
        if not in_sweep:
            if isinstance(e, (ConfigError, MnistDataError)):
                print(f"error: {e}", file=sys.stderr)
                sys.exit(2)
            if disk_full(e):  # one paragraph, not Lightning's traceback
                print(f"error: {disk_full_message(disk_full(e))}", file=sys.stderr)
                sys.exit(1)
            raise
        # A sweep goes on past a failed trial: the run is FAILED in MLflow, the sweep callback reports it
        # and makes the multirun exit non-zero at the end.
        log.exception("trial %s failed: %s", hc.job.num, e)
        write_trial_status(Path(hc.runtime.output_dir), "FAILED", f"{type(e).__name__}: {e}")
        if cfg.logger.enabled and not getattr(e, "mlflow_run_id", None):
            record_failed_trial(cfg, e, hc)
        return None


def main() -> None:
    """`mnistlab-train`: Hydra's main with the shell's exit statuses, 130 after Ctrl-C and 143 after SIGTERM
    (for a single run and for a whole sweep), so a scheduler or `dvc repro` never reads an interrupt as success."""

    install_sigterm_handler()
    bad = override_problems(sys.argv[1:], CONF_DIR)
    if bad:  # before Hydra starts: nothing is created, and a bad config exits 2 as the README says
        lines = "\n".join(f"  - {p}" for p in bad)
        print(f"error: Invalid command line ({len(bad)} problem(s)); nothing was started:\n{lines}", file=sys.stderr)
        sys.exit(2)
    sys.argv = with_run_overrides(sys.argv)
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
