"""Local parallel sweeps that survive a dead trial and fit the machine (used by hydra_plugins/mnistlab_launchers),
and each trial's share of the machine: how many run at once, how many torch threads each gets.

Why by hand: loky (joblib) and concurrent.futures mark the whole pool broken when one worker dies, failing every
in-flight and queued trial (a `kill -9` or the OOM killer ended the study with TerminatedWorkerError). Here each
trial is its own process, forked from a forkserver that has torch/Lightning/MLflow imported once (what loky's
reused workers saved), and supervised by a thread: a dead trial is recorded FAILED and the others go on.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

log = logging.getLogger("mnistlab.launching")

GIB = 1024**3
PARALLEL_ENV = "MNISTLAB_PARALLEL_TRIALS"  # how many trials run at once: configure_threads gives each cores // this
_PRELOAD = ["mnistlab.train", "torch", "lightning.pytorch", "mlflow", "hydra_plugins.hydra_joblib_launcher._core"]


def available_cores() -> int:
    """Cores this process may use (respects taskset/cgroup/SLURM affinity, unlike os.cpu_count())."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def parallel_jobs(hc) -> int:
    """How many trials run at once on this machine under the current Hydra launcher."""
    if hc is None or str(hc.mode) != "RunMode.MULTIRUN":
        return 1
    if os.environ.get(PARALLEL_ENV):  # set by mnistlab's launchers after capping (trial_capacity)
        return max(1, int(os.environ[PARALLEL_ENV]))
    launcher = hc.launcher
    target = str(launcher.get("_target_", ""))
    cores = available_cores()
    if "joblib" in target:
        n = launcher.get("n_jobs", -1)
        return cores if n is None or n < 0 else max(1, n)
    if "LocalLauncher" in target:  # submitit_local starts every trial at once
        return cores
    return 1


def configure_threads(num_threads: int | None, jobs: int, flush_denormal: bool) -> int:
    """Torch intra-op threads: the configured number, else cores / parallel jobs (no oversubscription), with denormals
    flushed to zero or not (cfg.flush_denormal), before the process's first parallel op.

    torch.set_flush_denormal sets the calling thread's FTZ/DAZ only; OpenMP's pool threads copy it when the first
    parallel op starts them, and never again. train() calls this first, so a run's threads all flush
    (tests/test_train.py). A process that ran a parallel op before (the epoch benchmark's floor did, until this
    session) keeps denormals in its second thread, whose share of each epoch then slows as RMSprop's square averages
    of never-lit pixels decay into the denormal range (benchmarks/README.md)."""
    import torch

    torch.set_flush_denormal(flush_denormal)
    n = num_threads or max(1, available_cores() // jobs)
    torch.set_num_threads(n)
    return n


def trial_capacity(requested: int, mem_per_trial_gb: float) -> int:
    """How many trials to run at once: `requested`, capped by the cores and by available memory / per-trial peak."""
    import psutil

    cores = available_cores()
    available = psutil.virtual_memory().available
    by_memory = max(1, int(available // (mem_per_trial_gb * GIB)))
    n = max(1, min(requested, cores, by_memory))
    if n < requested:
        log.warning(
            "running %d trials at a time, not %d: %d cores, %.1f GB available / %.1f GB per trial = %d "
            "(set hydra.launcher.mem_per_trial_gb to change the per-trial estimate)",
            n, requested, cores, available / GIB, mem_per_trial_gb, by_memory,
        )
    else:
        log.info("running up to %d trials at a time (%d cores, %.1f GB available)", n, cores, available / GIB)
    return n


def death_reason(exitcode: int | None) -> str:
    if exitcode is None:  # submitit's local jobs do not pass on how their task process ended
        return "trial process died without a result (killed, e.g. kill -9 or the out-of-memory killer?)"
    if exitcode is not None and exitcode < 0:
        name = signal.Signals(-exitcode).name
        hint = " (killed, or the out-of-memory killer)" if -exitcode == signal.SIGKILL else ""
        return f"trial process died: {name}{hint}"
    return f"trial process ended without a result (exit status {exitcode})"


def record_dead_trial(config, trial_dir: Path, pid: int | None, reason: str) -> None:
    """The dead trial's status file says DIED (sweep.mark_died; the sweep's exit code reads it) and its MLflow run
    is FAILED; a trial that died before it started (no pid: a stacked member killed in its stack's fit) gets a
    FAILED run with the reason (tracking.trial.record_unstarted_trial)."""
    from mnistlab.sweep import mark_died

    pid = mark_died(trial_dir, reason, pid)
    log.error("%s: %s", trial_dir, reason)
    if not config.logger.enabled:
        return
    if pid is None:
        try:
            from mnistlab.tracking.trial import record_unstarted_trial

            record_unstarted_trial(config, reason)
        except Exception as e:  # the status file still carries the verdict
            log.warning("could not record the dead trial's FAILED MLflow run: %s", e)
        return
    try:
        from mlflow import MlflowClient

        from mnistlab.paths import root_of
        from mnistlab.tracking.cli import end_runs_of_process
        from mnistlab.tracking.store import open_store

        uri, _ = open_store(config.paths.mlruns_dir, config.logger.tracking_uri, config.logger.experiment_name,
                            root_of(config.paths.root))
        end_runs_of_process(MlflowClient(uri), pid, "FAILED", reason)
    except Exception as e:  # the status file still carries the verdict
        log.warning("could not mark the dead trial's MLflow run FAILED: %s", e)


def _child(payload: bytes, conn, parallel: int) -> None:
    """In the trial process: run the Hydra job, send back its JobReturn."""
    import cloudpickle

    from mnistlab.exits import install_sigterm_handler

    os.environ[PARALLEL_ENV] = str(parallel)
    install_sigterm_handler()
    job, args = cloudpickle.loads(payload)
    ret = job(*args)
    conn.send_bytes(cloudpickle.dumps(ret))
    conn.close()


class ContainedTrials:
    """Runs Hydra jobs `job(*args)` in their own processes, `n` at a time; stop() ends the live ones with SIGTERM."""

    def __init__(self, n: int):
        self.n = n
        self.ctx = multiprocessing.get_context("forkserver")
        self.ctx.set_forkserver_preload(_PRELOAD)
        self.live: dict[int, Any] = {}
        self.lock = threading.Lock()

    def run(self, job: Callable, jobs: Sequence[tuple], on_death: Callable[[int, int | None, str], Any]) -> list:
        """`jobs` are job(*args) argument tuples; on_death(index, pid, reason) gives the result of a dead trial."""
        with ThreadPoolExecutor(self.n, thread_name_prefix="trial") as pool:
            futures = [pool.submit(self._supervise, i, job, args, on_death) for i, args in enumerate(jobs)]
            try:
                return [f.result() for f in futures]
            except BaseException:  # Ctrl-C / SIGTERM of the sweep: stop the trials (they end KILLED) first
                for f in futures:
                    f.cancel()
                self.stop()
                raise

    def stop(self) -> None:
        with self.lock:
            procs = list(self.live.values())
        for p in procs:
            if p.is_alive():
                os.kill(p.pid, signal.SIGTERM)
        for p in procs:
            p.join(timeout=60)

    def _supervise(self, index: int, job: Callable, args: tuple, on_death):
        import cloudpickle

        receiver, sender = self.ctx.Pipe(duplex=False)
        proc = self.ctx.Process(target=_child, args=(cloudpickle.dumps((job, args)), sender, self.n), daemon=False)
        proc.start()
        sender.close()
        with self.lock:
            self.live[index] = proc
        try:
            result = cloudpickle.loads(receiver.recv_bytes())
        except EOFError:  # the process died before sending its result
            result = None
        proc.join()
        with self.lock:
            self.live.pop(index, None)
        if result is not None:
            return result
        return on_death(index, proc.pid, death_reason(proc.exitcode))
