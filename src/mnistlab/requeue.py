"""A trial restarted in place by its scheduler (SLURM requeue, preemption, node failure): the next start of the same
job reopens the run the previous start opened and continues from its last checkpoint. The trial's side only; the
launcher's side (submitting, waiting, closing a job that ended without a result) is mnistlab.cluster."""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger("mnistlab.requeue")

RUN_ID_FILE = ".mlflow_run_id"  # in the trial's job dir: the run a requeued start of the same job reopens
LAST_CKPT = "last.ckpt"


def lightning_plugins() -> list | None:
    """Inside a SLURM job: Lightning's SLURM environment without its auto-requeue.

    submitit owns requeueing (USR2 before the time limit or on preemption: it resubmits the trial, which then
    continues from last.ckpt, see below). Lightning's auto-requeue would add a second requeue on USR1 and make
    Lightning ignore SIGTERM, so a scancelled or preempted trial would train on until SIGKILL; without it,
    SIGTERM stops training at the next batch and the run is closed KILLED right away.
    """
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    return [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else None


def restart_count() -> int:
    """How often SLURM restarted this job (requeue, preemption, node failure); 0 outside SLURM."""
    try:
        return int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    except ValueError:
        return 0


def previous_run_id(job_dir: Path) -> str | None:
    """The MLflow run of this job's previous start, when SLURM restarted it in the same job dir."""
    f = Path(job_dir) / RUN_ID_FILE
    if restart_count() < 1 or not f.is_file():
        return None
    return f.read_text().strip() or None


def remember_run(job_dir: Path, run_id: str) -> None:
    """Leave the run id in the job dir, for a restart of this job to find (atomically)."""
    job_dir.mkdir(parents=True, exist_ok=True)
    tmp = job_dir / f".{RUN_ID_FILE}.tmp-{os.getpid()}"
    tmp.write_text(run_id + "\n")
    tmp.replace(job_dir / RUN_ID_FILE)


def resume_checkpoint(configured: str | None, ckpt_dir: Path) -> str | None:
    """`ckpt_path` as configured; on a SLURM restart without one, the last checkpoint the previous start saved."""
    if configured or restart_count() < 1:
        return configured
    last = Path(ckpt_dir) / LAST_CKPT
    if last.is_file():
        log.info("SLURM restart %d: resuming from %s", restart_count(), last)
        return str(last)
    return None
