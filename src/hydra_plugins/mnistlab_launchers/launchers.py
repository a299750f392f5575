"""Hydra's JoblibLauncher and submitit LocalLauncher, with each trial contained (a dead trial is FAILED and the
sweep goes on) and concurrency capped by cores and memory (mnistlab.launching); the stacked launcher
(mnistlab.stacked)."""

from __future__ import annotations

import logging
import os
import threading
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Sequence

from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher
from omegaconf import OmegaConf, open_dict

from mnistlab.exits import interrupt_exit_code
from mnistlab.launch_context import fitted_elsewhere
from mnistlab.paths import root_of
from mnistlab.threads import PARALLEL_ENV, available_cores

log = logging.getLogger(__name__)
RESULT_FILE = ".mnistlab_stacked.pt"  # a stacked member's results, in its job dir until its job adopts them
_config_lock = threading.Lock()


def execute_job(idx: int, overrides: Sequence[str], hydra_context, config, task_function, singleton_state) -> JobReturn:
    """One Hydra job in a worker process, as Hydra's joblib launcher runs it, from Hydra's public API only (the
    joblib plugin's own execute_job is private: hydra_plugins.hydra_joblib_launcher._core)."""
    setup_globals()
    Singleton.set_state(singleton_state)
    sweep_config = hydra_context.config_loader.load_sweep_config(config, list(overrides))
    with open_dict(sweep_config):
        sweep_config.hydra.job.id = f"{sweep_config.hydra.job.name}_{idx}"
        sweep_config.hydra.job.num = idx
    HydraConfig.instance().set_config(sweep_config)
    return run_job(hydra_context=hydra_context, config=sweep_config, task_function=task_function,
                   job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")


def submitit_executor(launcher):
    """The submitit executor of a submitit launcher's params, set up as upstream's BaseSubmititLauncher.launch does
    (hydra-submitit-launcher 1.2) up to its map_array; the local and the SLURM launcher both start from it."""
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    from mnistlab.compat import submitit_cluster

    cluster = submitit_cluster(launcher)
    specific_init_keys = {"max_num_timeout"}
    init_params = {"folder": launcher.params["submitit_folder"]}
    init_params.update({f"{cluster}_{k}": v for k, v in launcher.params.items() if k in specific_init_keys})
    executor = submitit.AutoExecutor(cluster=cluster, **init_params)
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    init_keys = specific_init_keys | {"submitit_folder"}
    executor.update_parameters(**{k if k in base else f"{cluster}_{k}": v
                                  for k, v in launcher.params.items() if k not in init_keys})
    return executor


def _is_trial_app(config) -> bool:
    """Whether the sweep runs mnistlab's training (and its processes should start with torch and MLflow imported)."""
    return all(key in config for key in ("model", "optimizer", "trainer"))


def _fixed_threads(config) -> int | None:
    """The torch threads the user fixed per trial (num_threads), if any: the launchers run fewer trials at once."""
    threads = OmegaConf.select(config, "num_threads", default=None)
    return threads if isinstance(threads, int) and threads > 0 else None


def _dead_trial(launcher, overrides: Sequence[str], num: int, pid: int | None, reason: str) -> JobReturn:
    """Record a trial whose process died; COMPLETED with no value (what a failed trial returns), because Hydra's
    sweeper re-raises a FAILED JobReturn and that would end the sweep."""
    from mnistlab.launching import record_dead_trial

    with _config_lock:
        cfg = launcher.hydra_context.config_loader.load_sweep_config(launcher.config, list(overrides))
        with open_dict(cfg):
            cfg.hydra.job.num = num
    record_dead_trial(cfg, Path(str(cfg.hydra.sweep.dir)) / str(cfg.hydra.sweep.subdir), pid, reason)
    ret = JobReturn(overrides=list(overrides), cfg=cfg, status=JobStatus.COMPLETED)
    ret.return_value = None
    return ret


def _announce(launcher, job_overrides, initial_job_idx: int) -> None:
    """Hydra's launchers' start: logging re-applied (MLflow's import in the sweep callback reconfigures it), the
    sweep dir, one line per trial."""
    setup_globals()
    configure_log(launcher.config.hydra.hydra_logging, launcher.config.hydra.verbose)
    sweep_dir = Path(str(launcher.config.hydra.sweep.dir))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    log.info("Launching %d jobs, sweep output dir : %s", len(job_overrides), sweep_dir)
    for i, overrides in enumerate(job_overrides):
        log.info("\t#%d : %s", initial_job_idx + i, " ".join(filter_overrides(overrides)))


class ContainedJoblibLauncher(Launcher):
    """n_jobs trials at a time (capped by cores and memory), each in its own process (see mnistlab.launching): Hydra's
    joblib launcher's behaviour and n_jobs, without joblib (its pool fails every trial when one worker dies)."""

    def __init__(self, n_jobs: int, mem_per_trial_gb: float) -> None:
        super().__init__()
        self.n_jobs, self.mem_per_trial_gb = n_jobs, mem_per_trial_gb
        self.config = self.hydra_context = self.task_function = None

    def setup(self, *, hydra_context, task_function, config) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from mnistlab.launching import ContainedTrials, trial_capacity

        _announce(self, job_overrides, initial_job_idx)
        n_jobs = self.n_jobs or -1
        requested = min(len(job_overrides), available_cores() if n_jobs < 0 else n_jobs)
        n = trial_capacity(requested, self.mem_per_trial_gb, _fixed_threads(self.config))
        os.environ[PARALLEL_ENV] = str(n)
        state = Singleton.get_state()
        jobs = [(initial_job_idx + i, list(o), self.hydra_context, self.config, self.task_function, state)
                for i, o in enumerate(job_overrides)]
        return ContainedTrials(n, preload=_is_trial_app(self.config)).run(
            execute_job, jobs,
            lambda i, pid, reason: _dead_trial(self, job_overrides[i], initial_job_idx + i, pid, reason),
        )


class CappedLocalLauncher(LocalLauncher):
    """submitit_local, but at most max_parallel trials (capped by cores and memory) run at once, and a trial
    whose process died is FAILED instead of ending the sweep (Hydra's launcher starts all and re-raises)."""

    def __init__(self, mem_per_trial_gb: float, max_parallel: int | None = None, **params: Any) -> None:
        super().__init__(**params)
        self.mem_per_trial_gb, self.max_parallel = mem_per_trial_gb, max_parallel

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from mnistlab.launching import death_reason, trial_capacity

        _announce(self, job_overrides, initial_job_idx)
        n = trial_capacity(min(len(job_overrides), self.max_parallel or len(job_overrides)), self.mem_per_trial_gb,
                           _fixed_threads(self.config))
        os.environ[PARALLEL_ENV] = str(n)  # submitit's processes inherit it: configure_threads gives each cores // n threads
        executor = submitit_executor(self)
        pending = list(enumerate(job_overrides))
        jobs: list = []
        while pending or any(not j.done() for j in jobs):
            while pending and sum(not j.done() for j in jobs) < n:
                i, overrides = pending.pop(0)
                num = initial_job_idx + i
                jobs.append(executor.submit(self, list(overrides), "hydra.sweep.dir", num, f"job_id_for_{num}",
                                            Singleton.get_state()))
            time.sleep(0.5)
        results = []
        for i, job in enumerate(jobs):
            try:
                results.append(job.results()[0])
            except Exception:  # submitit's UncompletedJobError: the trial's process died without a result
                results.append(_dead_trial(self, job_overrides[i], initial_job_idx + i, None, death_reason(None)))
        return results


def _stack_worker(cfgs, jobs, files: list[Path], root: Path, parallel: int, hydra_context, config, task_function,
                  singleton_state) -> list[JobReturn]:
    """In a stack process: train the stack (mnistlab.stacked.fit), then run each member's Hydra job as joblib's
    workers do (execute_job: run_job with the normal task function), which adopts the member's results from its file;
    if the stack's fit raised (e.g. out of memory), each member trains on its own instead, said in the log."""
    from mnistlab.launching import record_stopped_trials
    from mnistlab.stacked.adopt import AdoptedFit
    from mnistlab.stacked.fit import train_group

    setup_globals()
    configure_log(config.hydra.hydra_logging, config.hydra.verbose)  # a fresh process: the parent's log format
    nums = [num for num, _ in jobs]
    try:
        log.info("stacked fit of trials %s: started", nums)
        seconds = train_group(cfgs, files, root, parallel)
        log.info("stacked fit of trials %s: %.1fs", nums, seconds)
        stacked = True
    except Exception as e:
        log.error("stacked fit of trials %s failed (%s: %s); training them one at a time", nums, type(e).__name__,
                  str(e)[-2000:])
        stacked = False
    except BaseException as e:  # Ctrl-C or SIGTERM in the fit: the members end KILLED, not unrecorded
        code = interrupt_exit_code(e)
        if code is not None:
            record_stopped_trials(cfgs, code)
        raise
    out = []
    for (num, overrides), file in zip(jobs, files):
        try:
            with fitted_elsewhere(AdoptedFit(file)) if stacked else nullcontext():
                out.append(execute_job(num, overrides, hydra_context, config, task_function, singleton_state))
        finally:
            file.unlink(missing_ok=True)
    return out


def _one_job(job: tuple[int, list[str]], hydra_context, config, task_function, singleton_state) -> list[JobReturn]:
    """A trial that is not stacked, in a stack process: Hydra's joblib worker function."""
    return [execute_job(*job, hydra_context, config, task_function, singleton_state)]


class StackedLauncher(Launcher):
    """launcher=stacked: compatible trials trained together, one fit per stack (mnistlab.stacked), n_jobs stacks at
    once, each in its own process with the joblib launcher's containment (mnistlab.launching.ContainedTrials: a dead
    stack process fails its own trials, the others go on), where each member's Hydra job then runs and adopts its
    results; trials that cannot be stacked (any other app's jobs too) run one per process through the same run_job."""

    def __init__(self, max_members: int, mem_per_member_mb: float, n_jobs: int, mem_per_trial_gb: float) -> None:
        super().__init__()
        self.max_members, self.mem_per_member_mb = max_members, mem_per_member_mb
        self.n_jobs, self.mem_per_trial_gb = n_jobs, mem_per_trial_gb
        self.config = self.hydra_context = self.task_function = None

    def setup(self, *, hydra_context, task_function, config) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def _compose(self, overrides: Sequence[str], num: int):
        """The job's config as Hydra's launchers compose it."""
        cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        with open_dict(cfg):
            cfg.hydra.job.num = num
        return cfg

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from mnistlab.launching import ContainedTrials, trial_capacity
        from mnistlab.stacked.plan import plan

        _announce(self, job_overrides, initial_job_idx)
        jobs = [(initial_job_idx + i, list(o)) for i, o in enumerate(job_overrides)]
        cfgs = [self._compose(o, num) for num, o in jobs]
        root = root_of(OmegaConf.select(cfgs[0], "paths.root", default=None))  # None: not an mnistlab app
        workers = trial_capacity(available_cores() if self.n_jobs < 0 else self.n_jobs, self.mem_per_trial_gb,
                                 _fixed_threads(self.config))
        groups, alone = plan(cfgs, self.max_members, self.mem_per_member_mb, root, workers)
        units = groups + [[i] for i in sorted(alone)]
        workers = min(workers, len(units))
        os.environ[PARALLEL_ENV] = str(workers)  # every trial and stack gets cores // workers threads
        shared = (self.hydra_context, self.config, self.task_function, Singleton.get_state())
        args = []
        for unit in units:
            if unit in groups:
                # absolute: the member's job may chdir into its dir (hydra.job.chdir=true) before adopting it
                files = [(Path(str(cfgs[i].hydra.sweep.dir)) / str(cfgs[i].hydra.sweep.subdir) / RESULT_FILE).absolute()
                         for i in unit]
                args.append((_stack_worker, [cfgs[i] for i in unit], [jobs[i] for i in unit], files, root, workers,
                             *shared))
            else:
                args.append((_one_job, jobs[unit[0]], *shared))

        def dead_unit(k: int, pid: int | None, reason: str) -> list[JobReturn]:
            # each member's own pid (in its status file) if its job had started, else none: it gets a FAILED run
            return [_dead_trial(self, jobs[i][1], jobs[i][0], None, reason) for i in units[k]]

        done = ContainedTrials(workers, preload=_is_trial_app(self.config)).run(_call, args, dead_unit)
        results = {i: r for unit, rets in zip(units, done) for i, r in zip(unit, rets)}
        return [results[i] for i in range(len(cfgs))]


def _call(fn, *args):
    """ContainedTrials runs one callable: this one runs a unit's (stack or single trial)."""
    return fn(*args)
