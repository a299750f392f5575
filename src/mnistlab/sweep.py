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
from mnistlab.tracking.tags import SWEEP_TAG

log = logging.getLogger("mnistlab.sweep")


class MlflowSweepCallback(Callback):
    """on_multirun_start opens the parent run (creating the store once, before any trial writes to it);
    on_multirun_end writes the sweep report and closes it. Works with every launcher: trials find the
    parent id in a file in the sweep dir and in the environment."""

    def __init__(self) -> None:
        self.parent_id: str | None = None
        self.client = None

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        if not config.logger.enabled:
            return
        from mlflow import MlflowClient

        from mnistlab.run_info import environment_tags, git_state
        from mnistlab.tracking.run import PARENT_ENV, PARENT_FILE
        from mnistlab.tracking.store import open_store

        root = root_of(config.paths.root)
        uri, exp_id = open_store(config.paths.mlruns_dir, config.logger.tracking_uri, config.logger.experiment_name, root)
        self.client = MlflowClient(uri)
        sweep_dir = Path(str(config.hydra.sweep.dir))
        overrides = " ".join(config.hydra.overrides.task)
        commit, dirty = git_state(root)
        tags = {
            SWEEP_TAG: "true",
            "mnistlab.sweep_dir": str(sweep_dir),
            "mnistlab.launcher": str(config.hydra.launcher.get("_target_", "")),
            "mnistlab.sweeper_params": str(dict(config.hydra.sweeper.get("params") or {})),
            "mlflow.source.git.commit": commit,
            "mnistlab.git_dirty": str(dirty).lower(),
            **environment_tags(),
        }
        name = f"sweep {config.task_name} {time.strftime('%Y-%m-%d %H:%M:%S')}" + (f" [{overrides}]" if overrides else "")
        run = self.client.create_run(exp_id, run_name=name[:250], tags=tags)
        self.parent_id = run.info.run_id
        sweep_dir.mkdir(parents=True, exist_ok=True)
        (sweep_dir / PARENT_FILE).write_text(self.parent_id + "\n")
        os.environ[PARENT_ENV] = self.parent_id
        atexit.register(self._kill_if_open)
        log.info("MLflow parent run %s (%s)", self.parent_id, name)

    def _kill_if_open(self) -> None:
        """Ctrl-C or a crash skips on_multirun_end: the parent must not stay RUNNING."""
        if self.parent_id and self.client is not None:
            if self.client.get_run(self.parent_id).info.status == "RUNNING":
                self.client.set_terminated(self.parent_id, "KILLED")

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        if not self.parent_id:
            return
        from mnistlab.report import write_sweep_report
        from mnistlab.tracking.run import PARENT_ENV

        root = root_of(config.paths.root)
        out_dirs = [Path(str(config.hydra.sweep.dir))]
        if config.paths.get("sweep_reports_dir"):
            out_dirs.append(resolve(config.paths.sweep_reports_dir, root))
        status, summary = "FAILED", None
        try:
            summary = write_sweep_report(self.client, self.parent_id, out_dirs)
            status = "FINISHED" if summary["finished"] else "FAILED"
            log.info(
                "sweep: %d trials, %d finished, %d failed; best %s test/acc=%.4f; report in %s",
                summary["trials"], summary["finished"], summary["failed"],
                summary.get("best", {}).get("run_name"), summary.get("best", {}).get("test/acc", float("nan")),
                ", ".join(str(d) for d in out_dirs),
            )
        finally:
            self.client.set_terminated(self.parent_id, status)
            os.environ.pop(PARENT_ENV, None)
            self.parent_id = None
        if summary is not None and summary["trials"] and not summary["finished"]:
            # Single failed trials are study outcomes (e.g. a diverging lr) and leave the exit code 0; a sweep
            # where nothing trained is an error. SystemExit, because Hydra turns callback exceptions into warnings.
            print(f"error: all {summary['trials']} trials of the sweep failed; see {out_dirs[-1] / 'sweep.csv'} "
                  f"and each trial's log in {out_dirs[0]}", file=sys.stderr)
            raise SystemExit(1)
