"""A trial's share of the machine: how many trials run at once (what the launcher says), how many torch threads
each gets. Read by the trial and set by the launchers, so neither imports the other."""

from __future__ import annotations

import os

PARALLEL_ENV = "MNISTLAB_PARALLEL_TRIALS"  # how many trials run at once: configure_threads gives each cores // this


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
    if os.environ.get(PARALLEL_ENV):  # set by mnistlab's launchers after capping (launching.trial_capacity)
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
    (tests/test_train.py). A process that ran a parallel op before keeps denormals in its second thread, whose share
    of each epoch then slows as RMSprop's square averages of never-lit pixels decay into the denormal range
    (benchmarks/README.md)."""
    import torch

    torch.set_flush_denormal(flush_denormal)
    n = num_threads or max(1, available_cores() // jobs)
    torch.set_num_threads(n)
    return n
