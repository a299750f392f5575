"""Running on a SLURM cluster, the launcher's side (hydra_plugins/mnistlab_launchers): the store check before a cluster
sweep, the wait for a job array that outlives a cancelled trial, closing a trial whose job ended without a result. The
trial's side of a requeue is mnistlab.requeue."""

from __future__ import annotations

import logging
import subprocess
import time
from pathlib import Path
from urllib.parse import urlparse

from mnistlab.paths import root_of
from mnistlab.tracking.status import end_run
from mnistlab.tracking.store import open_store
from mnistlab.tracking.tags import PARENT_TAG

log = logging.getLogger("mnistlab.cluster")

# squeue states after which a job will not run again (a requeued job goes REQUEUED -> PENDING instead).
ENDED = {"COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
         "SPECIAL_EXIT", "REVOKED"}
KILLED_STATES = {"CANCELLED", "PREEMPTED", "REVOKED"}  # ended by someone, not by the trial: MLflow KILLED


def is_slurm_launcher(config) -> bool:
    return "SlurmLauncher" in str(config.hydra.launcher.get("_target_", ""))


def local_store_problem(config, uri: str) -> str | None:
    """Why a SLURM sweep must not track to `uri` (a local SQLite/file store), or None."""
    if not is_slurm_launcher(config) or not config.logger.enabled:
        return None
    if (config.get("cluster") or {}).get("allow_local_store"):
        return None
    scheme = urlparse(uri).scheme
    if scheme not in ("sqlite", "file", ""):
        return None
    return (
        f"launcher=slurm would track every trial to the local MLflow store {uri}: SQLite (or file) stores on a "
        "cluster's shared filesystem corrupt under concurrent writers from several nodes (file locking over NFS). "
        "Point the jobs at the team server instead: `export MLFLOW_TRACKING_URI=http://<server>:5000` (or "
        "`logger.tracking_uri=http://<server>:5000`; `make server` starts one, see README \"Scaling out\"). On a "
        "single-node SLURM where every job runs on this machine, add `cluster.allow_local_store=true`. "
        "Nothing was submitted."
    )


# --- the launcher's side: wait for a job array without sacct, report trials that ended without a result ---

def squeue_states(job_ids: list[str]) -> dict[str, str]:
    """{"123_4": "RUNNING", ...} for the array tasks slurmctld still knows (it forgets them after MinJobAge)."""
    bases = sorted({j.split("_")[0] for j in job_ids})
    out = subprocess.run(["squeue", "-h", "-r", "-t", "all", "-o", "%i %T", "-j", ",".join(bases)],
                         capture_output=True, text=True, timeout=60)
    if out.returncode != 0 and "Invalid job id" in out.stderr:  # forgotten after MinJobAge: ended
        return {}
    if out.returncode != 0:  # slurmctld busy or restarting: an empty answer would read as "every job ended"
        raise subprocess.CalledProcessError(out.returncode, "squeue", out.stdout, out.stderr)
    return dict(line.split()[:2] for line in out.stdout.splitlines() if len(line.split()) >= 2)


def wait_for_jobs(jobs: list, poll_s: float = 2.0) -> dict[str, str]:
    """Wait until every submitit job has a result file or SLURM says it ended; returns the last states seen.

    submitit's own wait asks `sacct`, which needs SLURM accounting (slurmdbd) and, without it, waits forever
    for a cancelled job; squeue answers from slurmctld itself and keeps ended jobs for MinJobAge (300 s default).
    """
    pending = list(jobs)
    states: dict[str, str] = {}
    while pending:
        try:
            states = squeue_states([j.job_id for j in pending])
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
            log.warning("squeue did not answer (%s); asking again in %.0f s", str(getattr(e, "stderr", e)).strip()[:200], poll_s)
            time.sleep(poll_s)
            continue
        pending = [j for j in pending if not j.paths.result_pickle.exists()
                   and j.job_id in states and states[j.job_id] not in ENDED]
        if pending:
            time.sleep(poll_s)
    return states


def close_trial_run(config, job_num: int, job_id: str, state: str) -> str:
    """The MLflow run of a trial whose job ended without a result: KILLED (scancel, preemption) or FAILED (node
    failure, time limit, crash) instead of RUNNING forever; created if the job died before opening it."""
    from mlflow import MlflowClient

    from mnistlab.tracking.run import parent_run_id

    status = "KILLED" if state in KILLED_STATES else "FAILED"
    message = f"SLURM job {job_id} ended {state} without a result (trial {job_num})"
    uri, exp_id = open_store(config.paths.mlruns_dir, config.logger.tracking_uri, config.logger.experiment_name,
                             root_of(config.paths.root))
    client = MlflowClient(uri)
    parent = parent_run_id(Path(str(config.hydra.sweep.dir)))
    found = client.search_runs([exp_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent}' and tags.`mnistlab.trial` = '{job_num}'",
                               max_results=10) if parent else []
    if found:
        run = found[0]
        if run.info.status != "RUNNING":
            return run.info.status  # the trial closed its own run (e.g. KILLED on SIGTERM)
        run_id = run.info.run_id
    else:
        run_id = client.create_run(exp_id, run_name=f"trial {job_num} ({state.lower()})",
                                   tags={**({PARENT_TAG: parent} if parent else {}), "mnistlab.trial": str(job_num)}).info.run_id
    end_run(client, run_id, status, message)
    return status
