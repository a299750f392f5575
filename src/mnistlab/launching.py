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
import select
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

from mnistlab.exits import install_sigterm_handler
from mnistlab.threads import PARALLEL_ENV, available_cores
from mnistlab.trial_status import mark_died, read_trial_status, write_trial_status

log = logging.getLogger("mnistlab.launching")

GIB = 1024**3
_PRELOAD = ["mnistlab.train", "torch", "lightning.pytorch", "mlflow", "hydra_plugins.mnistlab_launchers.launchers"]


def trial_capacity(requested: int, mem_per_trial_gb: float, threads: int | None = None) -> int:
    """How many trials to run at once: `requested`, capped by the cores (by cores // `threads` when the user fixed
    each trial's torch threads, so processes x threads never exceed the cores) and by available memory / per-trial
    peak; the log line says which cap holds."""
    import psutil

    cores = available_cores()
    by_cores = max(1, cores // threads) if threads else cores
    available = psutil.virtual_memory().available
    by_memory = max(1, int(available // (mem_per_trial_gb * GIB)))
    n = max(1, min(requested, by_cores, by_memory))
    each = f"{threads} torch threads each (num_threads)" if threads else f"{max(1, cores // n)} torch threads each"
    if n < requested:
        log.warning(
            "running %d trials at a time, not %d, %s: %d cores%s, %.1f GB available / %.1f GB per trial = %d "
            "(set hydra.launcher.mem_per_trial_gb to change the per-trial estimate)",
            n, requested, each, cores, f" / {threads} threads = {by_cores}" if threads else "", available / GIB,
            mem_per_trial_gb, by_memory,
        )
    else:
        log.info("running up to %d trials at a time, %s (%d cores, %.1f GB available)", n, each, cores, available / GIB)
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
    """The dead trial's status file says DIED (trial_status.mark_died; the sweep's exit code reads it) and its MLflow
    run is FAILED; a trial that died before it started (no pid: a stacked member killed in its stack's fit) gets a
    FAILED run with the reason (tracking.trial.record_unstarted_trial)."""

    if read_trial_status(trial_dir).get("status", "RUNNING") != "RUNNING":
        return  # it wrote its own verdict and closed its run before its process ended (a stopped stack's members)
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


def record_stopped_trials(cfgs, code: int) -> None:
    """A stack stopped by Ctrl-C or SIGTERM in its fit: each member's status file and MLflow run say KILLED (its
    run had not opened: a member's run opens after the stack's fit). Signals wait until they are recorded."""
    why = "SIGTERM (scancel, preemption or a time limit)" if code == 143 else "Ctrl-C"
    reason = f"stopped by {why} in its stack's fit"
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for cfg in cfgs:
            write_trial_status(Path(str(cfg.hydra.sweep.dir)) / str(cfg.hydra.sweep.subdir), "KILLED", reason)
            if cfg.logger.enabled:
                try:
                    from mnistlab.tracking.trial import record_unstarted_trial

                    record_unstarted_trial(cfg, reason, stopped=True)
                except Exception as e:  # the status file still carries the verdict
                    log.warning("could not record the stopped trial's KILLED MLflow run: %s", e)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _stop_with_launcher(conn, done: threading.Event) -> None:
    """SIGTERM this trial process when the launcher's end of `conn` closes before the result was sent (the sweep was
    killed, e.g. kill -9): the trial ends KILLED instead of training on into a sweep that is gone. The process's
    parent is the forkserver, which outlives the sweep while trials run, so the pipe is what tells."""

    def watch() -> None:
        poller = select.poll()
        poller.register(conn.fileno(), select.POLLERR | select.POLLHUP)
        poller.poll()  # a pipe's write end reports POLLERR once its read end is closed
        if not done.is_set():
            os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, daemon=True, name="launcher-watch").start()


def _child(payload: bytes, conn, parallel: int) -> None:
    """In the trial process: run the Hydra job, send back its JobReturn."""
    import cloudpickle

    os.environ[PARALLEL_ENV] = str(parallel)
    install_sigterm_handler()
    done = threading.Event()
    _stop_with_launcher(conn, done)
    job, args = cloudpickle.loads(payload)
    ret = job(*args)
    done.set()
    conn.send_bytes(cloudpickle.dumps(ret))
    conn.close()


class ContainedTrials:
    """Runs Hydra jobs `job(*args)` in their own processes, `n` at a time; stop() ends the live ones with SIGTERM."""

    def __init__(self, n: int, preload: bool = True):
        """preload: the forkserver imports torch, Lightning and MLflow once, for mnistlab's trials (another app's
        jobs would pay seconds of imports they never use)."""
        self.n = n
        self.ctx = multiprocessing.get_context("forkserver")
        self.ctx.set_forkserver_preload(_PRELOAD if preload else [])
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

        payload = cloudpickle.dumps((job, args))
        for attempt in range(3):
            receiver, sender = self.ctx.Pipe(duplex=False)
            proc = self.ctx.Process(target=_child, args=(payload, sender, self.n), daemon=False)
            try:
                proc.start()
                break
            except (OSError, EOFError) as e:  # the forkserver died (kill -9) as it forked: the next start makes anew
                receiver.close()
                sender.close()
                if attempt == 2:
                    return on_death(index, None, f"trial process could not be started ({type(e).__name__}: {e})")
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
