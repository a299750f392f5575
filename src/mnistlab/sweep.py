"""Hydra callback that makes a multirun one MLflow parent run, hands its id to every trial and reports at the end."""

from __future__ import annotations

import atexit
import logging
import os
import sys
import time
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from mnistlab.paths import resolve, root_of
from mnistlab.report import write_sweep_report
from mnistlab.run_info import environment_tags, git_tags
from mnistlab.tracking.status import end_run
from mnistlab.tracking.store import open_store, store_uri
from mnistlab.tracking.tags import (
    PARENT_TAG,
    STAGE_TAG,
    STUDY_RUN_ENV,
    STUDY_STAGE_ENV,
    SWEEP_DIR_TAG,
    SWEEP_TAG,
)
from mnistlab.trial_status import (
    TRIAL_STATUS_FILE,
    read_trial_status,
    read_trial_statuses,
    write_trial_status,
)

log = logging.getLogger("mnistlab.sweep")


class MlflowSweepCallback(Callback):
    """on_multirun_start opens the parent run (creating the store once, before any trial writes to it);
    on_multirun_end writes the sweep report and closes it. Works with every launcher: trials find the
    parent id in a file in the sweep dir and in the environment."""

    def __init__(self) -> None:
        self.parent_id: str | None = None
        self.client = None
        self.progress = None

    def __getstate__(self) -> dict:
        """joblib and submitit pickle Hydra's callbacks into every job; the progress thread stays here."""
        return {**self.__dict__, "progress": None}

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        for stale in Path(str(config.hydra.sweep.dir)).glob(f"**/{TRIAL_STATUS_FILE}"):  # a re-used sweep dir
            stale.unlink()
        if not config.logger.enabled:
            return
        from mlflow import MlflowClient

        from mnistlab.cluster import local_store_problem
        from mnistlab.tracking.run import PARENT_ENV, PARENT_FILE

        root = root_of(config.paths.root)
        problem = local_store_problem(config, store_uri(config.paths.mlruns_dir, config.logger.tracking_uri, root)[0])
        if problem:  # before the store or any job exists; SystemExit, as Hydra turns callback errors into warnings
            print(f"error: {problem}", file=sys.stderr)
            raise SystemExit(2)
        uri, exp_id = open_store(config.paths.mlruns_dir, config.logger.tracking_uri, config.logger.experiment_name, root)
        self.client = MlflowClient(uri)
        sweep_dir = Path(str(config.hydra.sweep.dir))
        overrides = " ".join(config.hydra.overrides.task)
        tags = {
            SWEEP_TAG: "true",
            SWEEP_DIR_TAG: str(sweep_dir.resolve()),
            "mnistlab.launcher": str(config.hydra.launcher.get("_target_", "")),
            "mnistlab.sweeper_params": str(dict(config.hydra.sweeper.get("params") or {})),
            **git_tags(root),
            **environment_tags(),
        }
        study_run = os.environ.get(STUDY_RUN_ENV)
        if study_run:  # a stage of mnistlab-study: nested under the study's run
            tags.update({PARENT_TAG: study_run, STAGE_TAG: os.environ.get(STUDY_STAGE_ENV, "")})
        name = (f"stage {os.environ.get(STUDY_STAGE_ENV, '')} " if study_run else "") + f"sweep {config.task_name} {time.strftime('%Y-%m-%d %H:%M:%S')}" + (f" [{overrides}]" if overrides else "")
        run = self.client.create_run(exp_id, run_name=name[:250], tags=tags)
        self.parent_id = run.info.run_id
        sweep_dir.mkdir(parents=True, exist_ok=True)
        (sweep_dir / PARENT_FILE).write_text(self.parent_id + "\n")
        os.environ[PARENT_ENV] = self.parent_id
        atexit.register(self._kill_if_open)
        log.info("MLflow parent run %s (%s)", self.parent_id, name)
        from mnistlab.tracking.progress import SweepProgress, sweep_size

        self.progress = SweepProgress(self.client, exp_id, self.parent_id, sweep_size(config)).start()

    def _kill_if_open(self) -> None:
        """Ctrl-C or a crash skips on_multirun_end: the parent must not stay RUNNING."""
        if self.parent_id and self.client is not None:
            if self.client.get_run(self.parent_id).info.status == "RUNNING":
                end_run(self.client, self.parent_id, "KILLED")

    def _register(self, run_id: str, config: DictConfig) -> None:
        """The selected trial's model becomes mnist-mlp@champion; a registry error is reported, not fatal."""
        from mnistlab.tracking.registry import register_champion, test_examples

        try:
            examples = test_examples(resolve(config.data.processed_dir, root_of(config.paths.root)))
            register_champion(self.client, run_id, self.parent_id, examples)
        except Exception as e:  # the sweep's results stand without the registry entry
            log.error("could not register the best model of run %s: %s", run_id, e)

    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        if _in_sweep(config):
            write_trial_status(Path(config.hydra.runtime.output_dir), "RUNNING", pid=os.getpid())

    def on_job_end(self, config: DictConfig, job_return=None, **kwargs) -> None:
        """The trial's own verdict, in its dir: the exit code must not depend on MLflow being usable. A trial
        that failed inside train's main already wrote FAILED with its error (its objective is None either way:
        a validation-free run has none)."""
        from hydra.core.utils import JobStatus

        trial_dir = Path(config.hydra.runtime.output_dir)
        if not _in_sweep(config) or job_return is None:
            return
        if read_trial_status(trial_dir).get("status") == "RUNNING":
            ok = job_return.status == JobStatus.COMPLETED
            write_trial_status(trial_dir, "FINISHED" if ok else "FAILED", "" if ok else _job_error(job_return))

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if self.parent_id:
            self._report(config, sweep_dir)
        statuses = read_trial_statuses(sweep_dir)
        finished = sum(s["status"] == "FINISHED" for s in statuses)
        died = [s for s in statuses if s["status"] not in ("FINISHED", "FAILED")]
        # Failed trials are study outcomes (e.g. a diverging lr) and leave the exit code 0; a sweep where nothing
        # trained, or where a trial's process died (killed, OOM), is incomplete: exit 1. SystemExit, because Hydra
        # turns callback exceptions into warnings.
        if statuses and not finished:
            print(f"error: all {len(statuses)} trials of the sweep failed; see each trial's log in {sweep_dir}",
                  file=sys.stderr)
            raise SystemExit(1)
        if died:
            print(f"error: {len(died)} of {len(statuses)} trials were stopped or died before they ended: "
                  + "; ".join(f"{s['dir']}: {s['status']} ({s.get('error') or 'no verdict'})" for s in died), file=sys.stderr)
            raise SystemExit(1)

    def _report(self, config: DictConfig, sweep_dir: Path) -> None:
        from mnistlab.tracking.run import PARENT_ENV

        if self.progress is not None:
            self.progress.stop()
        root = root_of(config.paths.root)
        out_dirs = [sweep_dir]
        if config.paths.get("sweep_reports_dir"):
            out_dirs.append(resolve(config.paths.sweep_reports_dir, root))
        status = "FAILED"
        try:
            summary = write_sweep_report(self.client, self.parent_id, out_dirs)
            status = "FINISHED" if summary["finished"] else "FAILED"
            best = summary["best"] or {}
            log.info(
                "sweep: %d trials, %d finished, %d failed, %d reused; chosen on validation: %s "
                "(val/acc_best mean %.4f, test/acc mean %.4f); report in %s",
                summary["trials"], summary["finished"], summary["failed"], summary["reused"], best.get("config"),
                best.get("val_mean", float("nan")), best.get("test_mean", float("nan")),
                ", ".join(str(d) for d in out_dirs),
            )
            # only a study moves the champion (logger.register_champion, set by sweep=optimizers), not an ad-hoc sweep
            if (summary.get("best_run_id") and config.logger.get("register_champion")
                    and not os.environ.get(STUDY_RUN_ENV)):  # a study registers once, after its last stage
                self._register(summary["best_run_id"], config)  # the chosen config's best seed, on validation
        finally:
            end_run(self.client, self.parent_id, status)
            os.environ.pop(PARENT_ENV, None)
            self.parent_id = None


def _job_error(job_return) -> str:
    """A FAILED job's exception as text (JobReturn.return_value re-raises it: the public way to read it)."""
    try:
        job_return.return_value
    except Exception as e:  # noqa: BLE001 - whatever the job raised is its error
        return f"{type(e).__name__}: {e}"
    return ""


def _in_sweep(config: DictConfig) -> bool:
    return str(config.hydra.mode) == "RunMode.MULTIRUN"
