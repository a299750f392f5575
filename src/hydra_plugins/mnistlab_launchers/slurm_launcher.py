"""hydra-submitit-launcher's SLURM launcher, except that one trial's job ending without a result does not end
the sweep (a Hydra plugin must live in the hydra_plugins package; the logic is in mnistlab.cluster)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, List, Sequence

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher import submitit_launcher

from mnistlab.trial_status import mark_died

log = logging.getLogger(__name__)


class SlurmLauncher(submitit_launcher.SlurmLauncher):
    """Submits the trials as one job array, like upstream; then waits with squeue (no sacct needed) and turns a
    trial whose job was cancelled, preempted for good or lost with its node into a KILLED/FAILED MLflow run and
    a None result, so the sweep goes on and reports it. Upstream's `[j.results()[0] for j in jobs]` raises on the
    first such job (or, without sacct, waits forever), which drops the whole sweep and its report."""

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from hydra_plugins.mnistlab_launchers.launchers import submitit_executor

        from mnistlab.cluster import close_trial_run, wait_for_jobs

        # Up to map_array: upstream's BaseSubmititLauncher.launch (hydra-submitit-launcher 1.2), unchanged.
        assert self.config is not None and len(job_overrides) > 0
        executor = submitit_executor(self)
        log.info(f"Submitit 'slurm' sweep output dir : {self.config.hydra.sweep.dir}")
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in self.config.hydra.sweep:
            os.chmod(sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))
        job_params: List[Any] = []
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
            job_params.append((list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}", Singleton.get_state()))
        jobs = executor.map_array(self, *zip(*job_params))

        states = wait_for_jobs(jobs)
        results: List[JobReturn] = []
        for job, params in zip(jobs, job_params):
            if job.paths.result_pickle.exists():
                try:
                    results.append(job.results()[0])
                    continue
                except Exception as e:  # the job raised outside the trial's own error handling
                    state = f"FAILED ({type(e).__name__}: {str(e)[-300:]})"
            else:
                state = states.get(job.job_id, "ENDED (no longer known to slurmctld)")
            status = close_trial_run(self.config, params[2], job.job_id, state.split()[0])
            mark_died(sweep_dir / str(params[2]), f"SLURM job {job.job_id} ended {state} without a result")
            log.warning("trial %s (job %s) ended %s without a result; its MLflow run is %s", params[2], job.job_id,
                        state, status)
            ret = JobReturn(overrides=params[0], status=JobStatus.COMPLETED, task_name=str(self.config.hydra.job.name))
            ret.return_value = None
            results.append(ret)
        return results
