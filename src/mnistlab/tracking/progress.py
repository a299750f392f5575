"""A sweep's progress, printed by the process that launched it: trials done / total, failures, running.

Launchers run trials in other processes (joblib workers, submitit jobs, SLURM nodes) where Hydra's per-job
callbacks fire, so the launching process learns nothing until the end; it polls the sweep's MLflow children
instead (one search every few seconds), which works the same on every launcher. No library does this for a
Hydra multirun (hydra-joblib's verbose flag only counts batches inside one joblib call, not across launchers).
"""

from __future__ import annotations

import logging
import threading
from collections import Counter

from mnistlab.tracking.tags import PARENT_TAG

log = logging.getLogger("mnistlab.sweep")
DONE = ("FINISHED", "FAILED", "KILLED")


def sweep_size(config) -> int | None:
    """How many trials the basic sweeper will launch (grid of hydra.sweeper.params and command-line sweeps)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from mnistlab.compat import basic_sweep_batches

    if "BasicSweeper" not in str(config.hydra.sweeper.get("_target_", "")):
        return None
    params = [f"{k}={v}" for k, v in (config.hydra.sweeper.get("params") or {}).items()]
    parsed = OverridesParser.create().parse_overrides(params + list(config.hydra.overrides.task))
    return sum(len(batch) for batch in basic_sweep_batches(parsed))


def progress_line(client, experiment_id: str, parent_id: str, total: int | None) -> str:
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}'", max_results=5000)
    status = Counter(r.info.status for r in runs)
    done = sum(status[s] for s in DONE)
    failed = status["FAILED"] + status["KILLED"]
    return (f"sweep: {done}/{total if total is not None else '?'} trials done "
            f"({status['FINISHED']} finished, {failed} failed), {status['RUNNING']} running")


class SweepProgress:
    """A daemon thread logging progress_line() whenever it changes, every `interval` seconds, until stop()."""

    def __init__(self, client, experiment_id: str, parent_id: str, total: int | None, interval: float = 5.0):
        self.args = (client, experiment_id, parent_id, total)
        self.interval = interval
        self._stop = threading.Event()
        self._last = ""
        self._thread = threading.Thread(target=self._run, name="sweep-progress", daemon=True)

    def _report(self) -> None:
        try:
            line = progress_line(*self.args)
        except Exception as e:  # a busy store must not stop the sweep; the next poll tries again
            log.debug("sweep progress unavailable: %s", e)
            return
        if line != self._last:
            log.info(line)
            self._last = line

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._report()

    def start(self) -> "SweepProgress":
        self._report()
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop polling and log the final count."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        self._report()
